"""`packager bench` on the command line: its arguments, the options they make, and the command itself."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import packager.bench
from packager.bench.options import BenchOptions, Budget, LoadBudget, Shape
from packager.console import say
from packager.errors import UsageError
from packager.recipe import load_recipe
from packager.triton import PROTOCOL_NAMES

BENCH_TASKS = ("embeddings", "sequence-classification")  # single-text tasks: the bench's workloads are texts

DESCRIPTION = packager.bench.__doc__.splitlines()[0]

SERVING_LAUNCHERS = ("local", "docker")  # launchers that serve the repository the bench publishes (not `url`)


def parse_shapes(text: str, option: str = "--shapes") -> tuple[Shape, ...]:
    """`1x128,8x128` -> ((1, 128), (8, 128))."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise UsageError(f"{option} must look like 1x128,8x128; got {text!r}")
    return tuple(shapes)  # type: ignore[return-value]


def parse_counts(text: str) -> tuple[int, ...]:
    """`1,2,4,8` -> (1, 2, 4, 8)."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UsageError(f"--concurrency must look like 1,2,4,8; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `packager bench` arguments."""
    parser.add_argument("model", nargs="?", default="bert",
                        help="a recipe name, a recipe .toml file, or a local Hugging Face model folder (default: bert)")
    parser.add_argument("--task", help="task for a model folder when it cannot be inferred")
    parser.add_argument("--build-dir", default=os.environ.get("PACKAGER_BUILD_DIR", "build"),
                        help="build folder to reuse, or to build into when the model has none (default: build)")
    parser.add_argument("--reports-dir", default="reports",
                        help="reports go to REPORTS_DIR/<model>/ (default: reports)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--shapes", help="in-process batch x sequence list (default: 1 and the profile's opt batch, "
                                       "at its opt sequence, e.g. 1x128,8x128)")
    grid.add_argument("--served-shapes", help="served batch x sequence list (default: 1 x the opt sequence)")
    grid.add_argument("--concurrency", default="1,2,4,8", help="concurrent clients per served point (default 1,2,4,8)")
    grid.add_argument("--protocols", default=",".join(PROTOCOL_NAMES), help="http,grpc (default: both)")
    grid.add_argument("--no-serve", action="store_true", help="in process only: no Triton server")
    grid.add_argument("--launcher", choices=SERVING_LAUNCHERS, default="local",
                      help="the Triton server: local (the nvidia-pytriton wheel's: python backend, onnxruntime once "
                           "`make triton-backends` built it) or docker "
                           "(the NGC image, every backend; needs a docker daemon) (default: local)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--passes", type=int, default=Budget.passes, help="in-process interleaved passes (default 3)")
    limits.add_argument("--rounds", type=int, default=Budget.max_rounds, help="most rounds per pass (default 50)")
    limits.add_argument("--seconds", type=float, default=Budget.seconds, help="seconds per pass (default 8)")
    limits.add_argument("--requests", type=int, default=LoadBudget.max_requests,
                        help="most requests per served point (default 600)")
    limits.add_argument("--point-seconds", type=float, default=LoadBudget.seconds,
                        help="most seconds per served point (default 3)")
    limits.add_argument("--threads", type=int, help="threads for PyTorch and ONNX Runtime (default: all cores)")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        build_root=Path(args.build_dir),
        reports_root=Path(args.reports_dir),
        shapes=parse_shapes(args.shapes) if args.shapes else None,
        served_shapes=parse_shapes(args.served_shapes, "--served-shapes") if args.served_shapes else None,
        concurrency=parse_counts(args.concurrency),
        protocols=tuple(name.strip() for name in args.protocols.split(",") if name.strip()),
        budget=Budget(max_rounds=args.rounds, seconds=args.seconds, passes=args.passes),
        load=LoadBudget(max_requests=args.requests, seconds=args.point_seconds),
        threads=args.threads,
        serve=not args.no_serve,
        launcher=args.launcher,
        command=shlex.join(["python", *sys.orig_argv[1:]]),
    )


def run(args: argparse.Namespace) -> int:
    """`packager bench`: measure, write reports/<model>/bench.{json,md,png}, print the tables."""
    from packager.bench.measure import benchmark

    options = options_from_args(args)
    recipe = load_recipe(args.model, args.task)
    if recipe.task not in BENCH_TASKS:
        raise UsageError(f"packager bench is not supported for task {recipe.task} (its workloads are single texts): "
                         f"it measures {', '.join(BENCH_TASKS)}")
    report = benchmark(recipe, options)
    paths = report.write(options.reports_root / recipe.name)
    say("\n" + report.in_process_table())
    if report.served:
        say("\n" + report.served_table())
        say("\n" + report.backends_table())
    say(f"\nreport: {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0
