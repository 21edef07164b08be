"""One benchmark run, as the package docstring lists it: the build (made first when there is none), the inputs,
the peak, the FLOPs, in process and served, gathered into a `Report` with the machine's facts."""

from __future__ import annotations

import os
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from packager import pipeline
from packager.bench.flops import best_peaks, measure_peaks, model_flops
from packager.bench.in_process import graphs_of, measure_in_process
from packager.bench.options import BenchOptions
from packager.bench.report import Report
from packager.bench.mixed import mixed_lengths
from packager.bench.served import measure_served
from packager.bench.workload import make_workload
from packager.console import say, step
from packager.recipe import Recipe
from packager.record import BUILD_FILE
from packager.tasks import get_task


def benchmark(recipe: Recipe, options: BenchOptions = BenchOptions()) -> Report:
    """Measure everything the package docstring lists; builds the model first when the build folder has none."""
    shapes, served_shapes = options.grid(recipe)
    threads = options.threads or os.cpu_count() or 1
    build = ensure_build(recipe, options.build_root)
    loaded = build.model()
    with step(f"PyTorch and the inputs ({', '.join(f'{b}x{s}' for b, s in shapes)})"):
        wrapper = get_task(recipe.task).wrapper(loaded, build.spec.input_names).eval()
        workloads = {shape: make_workload(loaded.tokenizer, build.spec, *shape) for shape in shapes}
    peak_step = f"peak of this machine ({options.peak_size}² matrix products, {threads} threads)"
    with step(peak_step):
        peaks = measure_peaks(threads, options.peak_size)
    with step("FLOPs per inference from the ONNX graph"):
        flops = model_flops(build.level_path("plain"), build.spec, shapes)
    graphs = graphs_of(build)
    with step(f"in process: PyTorch eager and ONNX Runtime {', '.join(g.level for g in graphs)} "
              f"({options.budget.passes} interleaved passes per shape)"):
        in_process = measure_in_process(wrapper, build.spec, graphs, list(workloads.values()), options.budget, threads)
    served = None
    if options.serve:
        shipped = build.record.optimize.shipped
        with tempfile.TemporaryDirectory(prefix="bench-repository.") as folder, \
                step(f"served: {options.launcher} Triton, {', '.join(options.protocols)}, clients "
                     f"{', '.join(map(str, options.concurrency))}, dynamic batching on and off, mixed lengths"):
            root = Path(folder) / "model_repository"
            pipeline.stage_release(build, loaded).publish(root, version=1)
            lengths = mixed_lengths(8, recipe.profile.sequence.opt, max(options.concurrency))
            served = measure_served(root, [workloads[shape] for shape in served_shapes], options, shipped,
                                    loaded.tokenizer, lengths)
    with step(f"{peak_step}, again"):
        peaks = best_peaks(peaks, measure_peaks(threads, options.peak_size))
    settings = {
        "shapes": [f"{b}x{s}" for b, s in shapes], "served_shapes": [f"{b}x{s}" for b, s in served_shapes],
        "concurrency": list(options.concurrency), "protocols": list(options.protocols), "launcher": options.launcher,
        "passes": options.budget.passes, "rounds": options.budget.max_rounds, "seconds": options.budget.seconds,
        "max_requests": options.load.max_requests, "point_seconds": options.load.seconds,
    }
    return Report(recipe.name, datetime.now(timezone.utc).isoformat(timespec="seconds"), options.command, settings,
                  _machine(threads), peaks, flops, in_process, served, str(build.folder))


def ensure_build(recipe: Recipe, build_root: Path) -> pipeline.BuildFolder:
    """The build folder of the recipe, built first (as `packager package` builds it) when there is none."""
    if (build_root / recipe.name / BUILD_FILE).exists():
        say(f"==> using the build in {build_root / recipe.name}")
        return pipeline.BuildFolder.read(recipe, build_root)
    say(f"==> no build of {recipe.name} in {build_root}: building it first")
    return pipeline.build(recipe, pipeline.BuildOptions(build_root=build_root))


def _machine(threads: int) -> dict:
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
        "packages": {name: _version(name) for name in ("torch", "onnxruntime", "tritonclient", "nvidia-pytriton")},
    }


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
