"""The same build in the target release's TensorRT container: a `docker run ... trtexec` command, offered when no
deployable plan could be built here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from packager.iospec import IOSpec
from packager.recipe import Recipe
from packager.tensorrt.settings import BACKENDS, build_mode, container_image, profile_shapes


def docker_available() -> bool:
    """Whether a Docker daemon answers (not just a docker binary)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def trtexec_command(graph: Path, engine_path: Path, spec: IOSpec, recipe: Recipe, timing_cache: Path) -> list[str]:
    """`docker run ... trtexec ...` building the same engine (profiles, precision, compatibility, workspace, timing
    cache) with the TensorRT of the recipe's Triton release. `graph` is the graph the precision needs (build_mode):
    the fp16 graph for fp16 engines of the 'graph' method, else the plain export. Every path must exist where the
    command runs."""
    settings = recipe.tensorrt
    mounts = {"onnx": graph.parent, "engine": engine_path.parent, "cache": timing_cache.parent}
    mode = build_mode(settings, BACKENDS["tensorrt"])
    argv = ["docker", "run", "--rm", "--gpus", "all"]
    for name, folder in mounts.items():
        argv += ["-v", f"{folder.resolve()}:/work/{name}" + (":ro" if name == "onnx" else "")]
    argv += [container_image(settings.triton_release), "trtexec",
             f"--onnx=/work/onnx/{graph.name}", f"--saveEngine=/work/engine/{engine_path.name}"]
    for index, profile in enumerate(recipe.engine_profiles):
        shapes = profile_shapes(spec, profile)
        argv.append(f"--profile={index}")
        for position, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            argv.append(f"{flag}=" + ",".join(f"{name}:" + "x".join(map(str, r[position]))
                                              for name, r in shapes.items()))
    argv += [f"--memPoolSize=workspace:{settings.workspace_mib}M", "--noTF32"]
    argv += ["--stronglyTyped"] if mode.strongly_typed else [f"--{flag.lower()}" for flag in mode.builder_flags]
    argv += ["--versionCompatible"] if settings.version_compatible else []
    if settings.hardware_compatibility_level != "none":
        argv.append(f"--hardwareCompatibilityLevel={settings.hardware_compatibility_level}")
    argv += [f"--timingCacheFile=/work/cache/{timing_cache.name}", "--skipInference"]
    return argv
