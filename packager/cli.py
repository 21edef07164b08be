"""Command line: parse, call the pipeline, print. `python -m packager --help`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from packager import optimize, pipeline, render, tensorrt
from packager.console import error, say, table
from packager.errors import PackagerError
from packager.recipe import Range, Recipe, known_recipes, load_recipe
from packager.triton import smoke
from packager.triton.server import LAUNCHERS


def _recipe(args: argparse.Namespace) -> Recipe:
    recipe = load_recipe(args.model, getattr(args, "task", None))
    changes = {}
    if getattr(args, "opset", None):
        changes["opset"] = args.opset
    if getattr(args, "batch", None) or getattr(args, "sequence", None):
        profile = recipe.profile
        changes["profile"] = dataclasses.replace(
            profile,
            batch=Range.parse("--batch", args.batch) if args.batch else profile.batch,
            sequence=Range.parse("--sequence", args.sequence) if args.sequence else profile.sequence,
        )
    return recipe.replace(**changes)


def _build_options(args: argparse.Namespace) -> pipeline.BuildOptions:
    return pipeline.BuildOptions(
        build_root=Path(args.build_dir),
        device=args.device,
        levels=optimize.parse_levels_option(args.levels) if args.levels else None,
        tensorrt={"precision": args.precision, "triton_release": args.triton_release,
                  "workspace_mib": args.trt_workspace},
        trt_backend=args.trt_backend,
    )


def _launcher_options(args: argparse.Namespace) -> dict:
    options = {"url": args.url, "grpc_url": args.grpc_url, "image": args.image}
    return {key: value for key, value in options.items() if value}


def _release_options(args: argparse.Namespace) -> pipeline.ReleaseOptions:
    return pipeline.ReleaseOptions(
        repository=Path(args.repository),
        version=args.version,
        force=args.force,
        targets=tuple(t.strip() for t in args.target.split(",")) if args.target else None,
        launcher=None if args.no_smoke else args.launcher,
        launcher_options=_launcher_options(args),
    )


def cmd_package(args: argparse.Namespace) -> int:
    pipeline.package(_recipe(args), _build_options(args), _release_options(args))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    pipeline.release(pipeline.Build.read(recipe, Path(args.build_dir)), _release_options(args))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    names, spec = smoke.published_models(args.repository, recipe.name)
    reference = dataclasses.replace(smoke.Reference.for_recipe(recipe, spec),
                                    tolerances=pipeline.shipped_tolerances(Path(args.repository), names[0]))
    result = smoke.smoke(args.repository, reference, args.launcher, models=names, **_launcher_options(args))
    say(result.summary())
    smoke.require(result)
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


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="bert",
                        help="a recipe name (see `packager list`), a recipe .toml file, or a local Hugging Face "
                             "model folder (default: bert)")
    parser.add_argument("--task", help="task for a model folder when it cannot be inferred "
                                       "(embeddings, sequence-classification)")


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("export, validation and optimization")
    group.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's, 17 for bert)")
    group.add_argument("--batch", help="batch sizes min,opt,max (overrides the recipe's profile)")
    group.add_argument("--sequence", help="sequence lengths min,opt,max; max is also the truncation length")
    group.add_argument("--device", choices=optimize.DEVICES,
                       help="device the graph is optimized for (default: the recipe's [serving] device)")
    group.add_argument("--levels", help="optimization levels to try, e.g. plain,fused,int8; the fastest that passes "
                                        "its gate ships (default: the recipe's [optimize] levels for the device)")
    group = parser.add_argument_group("TensorRT engine")
    group.add_argument("--precision", choices=tensorrt.PRECISIONS, help="engine precision (default: the recipe's)")
    group.add_argument("--triton-release", choices=list(tensorrt.TRITON_TENSORRT),
                       help="the Triton release that will serve the plan; warns when the installed TensorRT differs")
    group.add_argument("--trt-workspace", type=int, metavar="MIB", help="builder workspace limit in MiB")
    group.add_argument("--trt-backend", choices=tensorrt.BACKEND_CHOICES, default="auto",
                       help="TensorRT package: tensorrt (deployable plan), tensorrt-rtx (build check only), "
                            "none (skip), auto (the first installed; default)")


def _repository_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=os.environ.get("PACKAGER_REPOSITORY", "model_repository"),
                        help="Triton model repository to publish into (default: model_repository)")


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live Triton server for the smoke test")
    group.add_argument("--launcher", choices=list(LAUNCHERS), default=os.environ.get("PACKAGER_LAUNCHER", "local"),
                       help="local: the tritonserver of the nvidia-pytriton wheel (python backend only); docker: "
                            "the NGC image (all backends); url: a running server (default: local)")
    group.add_argument("--url", help="with --launcher url: the server's HTTP host:port")
    group.add_argument("--grpc-url", help="with --launcher url: the server's gRPC host:port")
    group.add_argument("--image", help="with --launcher docker: the image (default: $TRITON_DOCKER_IMAGE or "
                                       "nvcr.io/nvidia/tritonserver:24.10-py3)")


def _release_arguments(parser: argparse.ArgumentParser) -> None:
    _repository_arguments(parser)
    parser.add_argument("--version", type=int, help="publish as this version (default: the next one)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--target", help=f"serving targets to publish, comma-separated ({', '.join(render.TARGETS)}; "
                                         "default: the recipe's)")
    parser.add_argument("--no-smoke", action="store_true", help="publish without the live smoke test")
    _server_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packager",
        description="Turn a PyTorch / Hugging Face model into a tested Triton Inference Server model repository.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_dir = os.environ.get("PACKAGER_BUILD_DIR", "build")

    package = commands.add_parser(
        "package", help="export, validate, optimize, build the engine, render, smoke-test and publish a model",
        description="Export MODEL to ONNX, gate it against PyTorch, optimize it, build its TensorRT engine, render "
                    "its Triton models, smoke-test them on a live Triton server and publish them as a new version.")
    _model_arguments(package)
    package.add_argument("--build-dir", default=build_dir, help="folder for build artifacts (default: build)")
    _build_arguments(package)
    _release_arguments(package)
    package.set_defaults(run=cmd_package)

    publish = commands.add_parser("publish", help="publish an existing build as a new version",
                                  description="Render, smoke-test and publish the build folder of MODEL.")
    _model_arguments(publish)
    publish.add_argument("--build-dir", default=build_dir, help="folder of the build (default: build)")
    _release_arguments(publish)
    publish.set_defaults(run=cmd_publish)

    smoke_parser = commands.add_parser("smoke", help="smoke-test MODEL's published models on a live Triton server",
                                       description="Serve the repository and check MODEL's newest version of every "
                                                   "model against PyTorch over HTTP and gRPC.")
    _model_arguments(smoke_parser)
    _repository_arguments(smoke_parser)
    _server_arguments(smoke_parser)
    smoke_parser.set_defaults(run=cmd_smoke)

    from packager import bench  # noqa: PLC0415 - the bench subcommand's arguments live with its code
    bench_parser = commands.add_parser("bench", help="benchmark PyTorch, ONNX Runtime and the served model",
                                       description=bench.__doc__.splitlines()[0])
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)

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
