"""Command line: parse, call the pipeline, print. `python -m packager --help`.

Heavy libraries (torch, transformers, onnxruntime, tensorrt) are imported inside the commands that use them, so
`--help`, `list`, an argument error or an unknown model answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from packager.console import error, keep_log, say, table
from packager.errors import PackagerError, first_line
from packager.recipe import DEVICES, PRECISIONS, TARGETS, Range, Recipe, known_recipes, load_recipe
from packager.releases import PYTRITON_RELEASE, TRITON_RELEASES, tritonserver_image
from packager.storage import is_s3, open_store
from packager.triton import LAUNCHER_NAMES

TRT_BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "none")


def _recipe(args: argparse.Namespace) -> Recipe:
    """MODEL with the command line's overrides merged in; the whole recipe is checked before any work."""
    overrides: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("export", "opset", getattr(args, "opset", None))
    for axis in ("batch", "sequence"):
        value = getattr(args, axis, None)
        put("profile", axis, Range.from_toml(f"--{axis}", value).to_data() if value else None)
    device = getattr(args, "device", None)
    put("serving", "device", device)
    if getattr(args, "target", None):
        put("serving", "targets", [t.strip() for t in args.target.split(",") if t.strip()])
    put("tensorrt", "precision", getattr(args, "precision", None))
    put("tensorrt", "triton_release", getattr(args, "triton_release", None))
    put("tensorrt", "workspace_mib", getattr(args, "trt_workspace", None))
    recipe = load_recipe(args.model, getattr(args, "task", None), overrides)
    if getattr(args, "levels", None):
        levels = [name.strip() for name in args.levels.split(",") if name.strip()]
        recipe = recipe.override({"optimize": {recipe.serving.device: levels}}, "--levels")
    return recipe


def _launcher_options(args: argparse.Namespace) -> dict:
    options = {"url": args.url, "grpc_url": args.grpc_url, "image": args.image}
    return {key: value for key, value in options.items() if value}


def _release_options(args: argparse.Namespace):
    from packager import pipeline

    return pipeline.ReleaseOptions(
        repository=args.repository if is_s3(args.repository) else Path(args.repository),
        s3_endpoint=args.s3_endpoint,
        switch_wait_s=args.switch_wait,
        servers=tuple(args.wait_ready),
        version=args.version,
        force=args.force,
        launcher=None if args.no_smoke else args.launcher,
        launcher_options=_launcher_options(args),
    )


def cmd_package(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from packager import pipeline

    options = pipeline.BuildOptions(build_root=Path(args.build_dir), trt_backend=args.trt_backend, strict=args.strict)
    pipeline.package(recipe, options, _release_options(args))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from packager import pipeline

    pipeline.release(pipeline.BuildFolder.read(recipe, Path(args.build_dir)), _release_options(args))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from packager import fleet, source
    from packager.triton import smoke
    from packager.triton.discovery import published_models
    from packager.triton.reference import Reference

    store = _store(args)
    served = fleet.recipe_models(store, recipe.name) if is_s3(args.repository) else []
    with fleet.served_copy(args.repository, store, served) as repository:
        names, spec = published_models(repository, recipe.name)
        reference = Reference.of(recipe, spec, source.load(recipe))
        result = smoke.smoke(repository, reference, args.launcher, models=names, **_launcher_options(args))
    say(result.summary())
    smoke.require(result)
    return 0


def _store(args: argparse.Namespace):
    return open_store(args.repository, args.s3_endpoint)


def cmd_rollback(args: argparse.Namespace) -> int:
    from packager import fleet

    store = _store(args)
    name = _recipe(args).name
    version = fleet.rollback(store, name, args.to, args.switch_wait, args.wait_ready)
    say(f"{store.url}: '{name}' serves version {version}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from packager import fleet

    store = _store(args)
    removed = fleet.prune(store, _recipe(args).name, args.keep)
    for name, versions in removed.items():
        say(f"{name}: removed {', '.join(map(str, versions)) or 'nothing'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from packager import fleet

    store = _store(args)
    checked, problems = fleet.verify(store, _recipe(args).name, args.version)
    if problems:
        say(table(["model", "version", "file", "problem"], [[p.model, p.version, p.file, p.what] for p in problems]))
        first = problems[0]
        raise PackagerError(f"{len(problems)} problem(s) in {store.url}: {first.model}/{first.version}/{first.file} "
                            f"{first.what}")
    say(f"{store.url}: {checked} files match their manifests' SHA-256")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from packager import fleet

    say(fleet.status_table(fleet.status(_store(args), _recipe(args).name)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from packager.bench.cli import run

    return run(args)


def cmd_triton_backends(args: argparse.Namespace) -> int:
    from packager.triton import backends

    backends.build(Path(args.sources) if args.sources else None)
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from packager import manifests

    rendered = manifests.render_manifests(recipe, args.repository, args.s3_endpoint)
    out = Path(args.out) if args.out else Path("manifests") / recipe.name
    for manifest, path in zip(rendered, manifests.write_manifests(rendered, out)):
        say(f"{path}: {manifest.describe()}")
    say(f"checked against the Kubernetes object schema, not applied: `kubectl apply -f FILE` once the Secret "
        f"{recipe.deploy.credentials_secret} exists (README, \"Kubernetes manifests\")")
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
    group = parser.add_argument_group("export, validation and optimization (each overrides the recipe)")
    group.add_argument("--opset", type=int, help="ONNX opset (default: the recipe's, 17 for bert)")
    group.add_argument("--batch", help="batch sizes min,opt,max")
    group.add_argument("--sequence", help="sequence lengths min,opt,max; max is also the truncation length")
    group.add_argument("--device", choices=DEVICES,
                       help="device the graph is optimized and served for (default: the recipe's [serving] device)")
    group.add_argument("--levels", help="optimization levels to try, e.g. plain,fused,int8; the fastest that passes "
                                        "its gate ships (default: the recipe's [optimize] levels for the device)")
    group = parser.add_argument_group("TensorRT engine")
    group.add_argument("--precision", choices=PRECISIONS, help="engine precision (default: the recipe's)")
    group.add_argument("--triton-release", choices=list(TRITON_RELEASES),
                       help="the Triton release that will serve the plan; warns when the installed TensorRT is not "
                            "its exact version")
    group.add_argument("--strict", action="store_true",
                       help="refuse, rather than warn, when the installed TensorRT is not the release's exact version")
    group.add_argument("--trt-workspace", type=int, metavar="MIB", help="builder workspace limit in MiB")
    group.add_argument("--trt-backend", choices=TRT_BACKENDS, default="auto",
                       help="TensorRT package: tensorrt (deployable plan), tensorrt-rtx (build check only), "
                            "none (skip), auto (the first installed; default)")


def _repository_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=os.environ.get("PACKAGER_REPOSITORY", "model_repository"),
                        help="Triton model repository: a folder or s3://BUCKET/PREFIX (default: model_repository)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="an S3-compatible endpoint URL for s3:// repositories (default: $AWS_ENDPOINT_URL, "
                             "else AWS); credentials come from the standard AWS chain")


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live Triton server for the smoke test")
    group.add_argument("--launcher", choices=LAUNCHER_NAMES, default=os.environ.get("PACKAGER_LAUNCHER", "local"),
                       help="local: the tritonserver of the nvidia-pytriton wheel (python backend, and onnxruntime "
                            "once `make triton-backends` built it); docker: a container of --image; url: a running "
                            "server (default: local)")
    group.add_argument("--url", help="with --launcher url: the server's HTTP host:port")
    group.add_argument("--grpc-url", help="with --launcher url: the server's gRPC host:port")
    group.add_argument("--image", help="with --launcher docker: the image, e.g. the local CPU one that `make "
                                       "triton-image` builds (default: $TRITON_DOCKER_IMAGE or "
                                       f"{tritonserver_image(PYTRITON_RELEASE)}, all backends, --gpus all on a GPU "
                                       "host)")


def _release_arguments(parser: argparse.ArgumentParser) -> None:
    _repository_arguments(parser)
    parser.add_argument("--version", type=int, help="publish as this version (default: the next one)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--target", help=f"serving targets to publish, comma-separated ({', '.join(TARGETS)}; "
                                         "default: the recipe's)")
    parser.add_argument("--no-smoke", action="store_true", help="publish without the live smoke test")
    _switch_wait_argument(parser)
    _server_arguments(parser)


def _switch_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--switch-wait", type=float, metavar="SECONDS",
                        help="seconds between the phases of the version switch: at least the fleet's poll interval "
                             "plus the slowest model load (default: $PACKAGER_SWITCH_WAIT_S, else 10 for s3://, 0 for "
                             "a folder)")
    parser.add_argument("--wait-ready", action="append", default=[], metavar="HOST:PORT",
                        help="a server of the fleet (HTTP); between the phases of an s3:// switch, wait until it "
                             "reports the phase's versions ready (repeatable)")


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line too (argparse prints the usage first), and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="packager",
        description="Turn a PyTorch / Hugging Face model into a tested Triton Inference Server model repository.",
        epilog="--debug (any position) or PACKAGER_DEBUG=1: show tracebacks instead of one-line errors.",
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

    from packager.bench.cli import DESCRIPTION, add_arguments

    bench_parser = commands.add_parser("bench", help="benchmark PyTorch, ONNX Runtime and the served model",
                                       description=DESCRIPTION)
    add_arguments(bench_parser)
    bench_parser.set_defaults(run=cmd_bench)

    built = commands.add_parser(
        "triton-backends", help="build Triton's onnxruntime backend for the local launcher's server (cached)",
        description="Build Triton's onnxruntime backend (r24.10) for the nvidia-pytriton wheel's tritonserver against "
                    "the installed onnxruntime's library, into $XDG_CACHE_HOME/triton-packager/backends/ (a no-op "
                    "when built from the same inputs). The local launcher serves onnxruntime models with it.")
    built.add_argument("--sources", help="a .tgz of Triton's r24.10 sources and the ONNX Runtime C header "
                                         "(default: git clone, which needs network)")
    built.set_defaults(run=cmd_triton_backends)

    for name, summary in (("rollback", "switch MODEL's models back to an older version (default: the previous)"),
                          ("prune", "delete all but the newest versions of MODEL's models; pinned ones stay"),
                          ("verify", "check every file of MODEL's served (or one) version against its manifest"),
                          ("status", "MODEL's versions, which are served, and what their manifests say")):
        command = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        _model_arguments(command)
        _repository_arguments(command)
        if name == "rollback":
            command.add_argument("--to", type=int, metavar="N", help="the version to serve")
            _switch_wait_argument(command)
        if name == "prune":
            command.add_argument("--keep", type=int, required=True, metavar="K", help="versions to keep per model")
        if name == "verify":
            command.add_argument("--version", type=int, metavar="N", help="the version to check (default: served)")
        command.set_defaults(run=globals()[f"cmd_{name}"])

    manifests = commands.add_parser(
        "manifests", help="render Kubernetes manifests for a Triton fleet reading the repository in object storage",
        description="Render and check, against the Kubernetes object schema, a Deployment + Service of tritonservers "
                    "(fleet.yaml) and a KServe InferenceService (kserve.yaml) serving MODEL's repository, with the "
                    "recipe's [deploy] resources. Nothing is applied.")
    _model_arguments(manifests)
    manifests.add_argument("--repository", required=True, metavar="s3://BUCKET/PREFIX",
                           help="the model repository in object storage the servers read")
    manifests.add_argument("--s3-endpoint", metavar="URL",
                           help="the S3-compatible endpoint the servers reach, http(s)://host[:port] (default: AWS "
                                "itself; $AWS_ENDPOINT_URL is not read: the pods' endpoint may differ from this "
                                "host's)")
    manifests.add_argument("--triton-release", choices=list(TRITON_RELEASES),
                           help="the release whose tritonserver image serves (default: the recipe's [tensorrt] "
                                "triton_release)")
    manifests.add_argument("--out", help="folder for the manifests (default: manifests/<name>)")
    manifests.set_defaults(run=cmd_manifests)

    listing = commands.add_parser("list", help="list the known model recipes")
    listing.set_defaults(run=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: every failure is one `error:` line and an exit code (2 bad input, 3 a gate, 1 the rest,
    130 Ctrl-C). An unexpected exception's traceback goes to a log file named in that line; --debug (or
    PACKAGER_DEBUG=1) shows it instead."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PACKAGER_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except PackagerError as exc:
        if debug:
            raise
        headline, _, details = str(exc).partition("\n")
        error(headline + (f" (details in {keep_log('error', details)})" if details.strip() else ""))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as exc:  # a bug or an unforeseen library failure: one line here, the traceback in a log
        if debug:
            raise
        log = keep_log("error", traceback.format_exc())
        error(f"unexpected {type(exc).__name__}: {first_line(exc)} (traceback in {log}; --debug shows it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
