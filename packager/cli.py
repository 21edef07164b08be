"""Command line: parse, call the pipeline, print. `python -m packager --help`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from packager import pipeline
from packager.console import error, say, table
from packager.errors import PackagerError
from packager.recipe import Range, Recipe, known_recipes, load_recipe


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = load_recipe(args.model, args.task)
    changes = {}
    if args.opset:
        changes["opset"] = args.opset
    if args.batch or args.sequence:
        profile = recipe.profile
        changes["profile"] = type(profile)(
            batch=Range.parse("--batch", args.batch) if args.batch else profile.batch,
            sequence=Range.parse("--sequence", args.sequence) if args.sequence else profile.sequence,
        )
    return recipe.replace(**changes)


def cmd_package(args: argparse.Namespace) -> int:
    recipe = _recipe_from_args(args)
    result = pipeline.package(recipe, Path(args.build_dir))
    say("")
    say(table(["kind", "name", "dtype", "dims"], result.spec.rows(), title="IO spec"))
    say("")
    rows = [
        [report.variant, output, s["max_abs"], s["max_rel"], s["metric"], s["metric_value"], "pass" if report.passed else "FAIL"]
        for report in result.parity
        for output, s in report.summary()["outputs"].items()
    ]
    shapes = ", ".join(sorted({row.shape for row in result.parity[0].rows}, key=lambda s: tuple(map(int, s.split("x")))))
    say(table(["variant", "output", "max |Δ|", "max rel", "metric", "worst", "gate"], rows,
              title=f"Parity against PyTorch (real tokens; shapes batch x sequence: {shapes})"))
    say("")
    say(f"artifacts: {result.build_dir}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in known_recipes():
        recipe = load_recipe(name)
        profile = recipe.profile
        rows.append([name, recipe.task, recipe.source.describe(),
                     f"{profile.batch.min}/{profile.batch.opt}/{profile.batch.max}",
                     f"{profile.sequence.min}/{profile.sequence.opt}/{profile.sequence.max}"])
    say(table(["recipe", "task", "source", "batch", "sequence"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packager",
        description="Turn a PyTorch / Hugging Face model into a tested Triton Inference Server model repository.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    package = commands.add_parser("package", help="export, validate and package a model",
                                  description="Export MODEL to ONNX, check it against PyTorch, and package it.")
    package.add_argument("model", nargs="?", default="bert",
                         help="a recipe name (see `packager list`), a recipe .toml file, or a local Hugging Face "
                              "model folder (default: bert)")
    package.add_argument("--task", help="task for a model folder when it cannot be inferred "
                                        "(embeddings, sequence-classification)")
    package.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's, 17 for bert)")
    package.add_argument("--batch", help="batch sizes min,opt,max (overrides the recipe's profile)")
    package.add_argument("--sequence", help="sequence lengths min,opt,max; max is also the truncation length")
    package.add_argument("--build-dir", default=os.environ.get("PACKAGER_BUILD_DIR", "build"),
                         help="folder for build artifacts (default: build)")
    package.set_defaults(run=cmd_package)

    listing = commands.add_parser("list", help="list the known model recipes")
    listing.set_defaults(run=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PackagerError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
