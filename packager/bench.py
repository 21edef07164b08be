"""In-process latency: PyTorch eager against ONNX Runtime on each optimization level, on the same real inputs.

Candidates are measured round-robin (one call each per round, the order rotated every round) so that noise from
other processes hits all of them alike, in several passes; ratios to PyTorch are computed within each pass, and the
median over passes is reported. ONNX Runtime sessions run with idle-thread spinning off (a spinning idle session
steals the cores the others run on), PyTorch and ONNX Runtime with the same thread count.

    python -m packager.bench bert --shapes 1x128,8x128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from packager import export, optimize, source, validate
from packager.console import say, step
from packager.errors import UsageError
from packager.export import Exported
from packager.optimize import LevelResult, OptimizeResult
from packager.recipe import Recipe, load_recipe
from packager.tasks import get_task
from packager.validate import Inputs, ParityReport

PYTORCH = "pytorch eager"


@dataclass(frozen=True)
class Budget:
    """How long to measure: warmup calls per candidate, then rounds until either limit, in each of `passes`."""

    warmup: int = 3
    max_rounds: int = 50
    seconds: float = 20.0
    passes: int = 3


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))


@dataclass(frozen=True)
class Measurement:
    candidate: str
    batch: int
    sequence: int
    threads: int
    median_ms: float  # median over passes of each pass's median
    p90_ms: float  # over all samples of all passes
    p99_ms: float
    calls: int
    speedup: float  # PyTorch median / this median, within each pass; median over passes
    speedup_range: tuple[float, float]  # lowest and highest pass
    parity: str  # the level's worst metric and max |Δ| on the validation text, or "reference"


def interleaved(candidates: dict[str, Callable[[], object]], budget: Budget) -> dict[str, Timing]:
    """One pass: warm every candidate up, then call each once per round (rotating order) until a limit."""
    for run in candidates.values():
        for _ in range(budget.warmup):
            run()
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget.seconds
    for round_index in range(budget.max_rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            candidates[name]()
            samples[name].append((time.perf_counter() - started) * 1000)
        if time.perf_counter() > deadline:
            break
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def benchmark_inputs(tokenizer, exported: Exported, batch: int, sequence: int) -> Inputs:
    """VALIDATION_TEXTS cycled to `batch` rows, truncated and padded to exactly `sequence` tokens."""
    texts = [validate.VALIDATION_TEXTS[row % len(validate.VALIDATION_TEXTS)] for row in range(batch)]
    return validate.tokenize(tokenizer, exported.spec, texts, sequence)


def measure_in_process(
    loaded: source.LoadedModel, exported: Exported, levels: Sequence[LevelResult],
    shapes: Sequence[tuple[int, int]], budget: Budget = Budget(), threads: int | None = None,
) -> list[Measurement]:
    """PyTorch eager on the export's wrapper and ONNX Runtime on each level's graph, per (batch, sequence)."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    runners = {PYTORCH: validate.torch_runner(exported.wrapper, exported.spec)}
    parity = {PYTORCH: "reference"}
    for level in levels:
        if level.path is None:
            continue
        session = validate.onnxruntime_session(level.path, threads)
        runners[f"onnxruntime {level.name}"] = _session_runner(session, exported)
        parity[f"onnxruntime {level.name}"] = describe_parity(level.parity)
    measurements = []
    for batch, sequence in shapes:
        inputs = benchmark_inputs(loaded.tokenizer, exported, batch, sequence)
        calls = {name: (lambda run=run: run(inputs)) for name, run in runners.items()}
        passes = [interleaved(calls, budget) for _ in range(budget.passes)]
        measurements += [_summarise(name, passes, batch, sequence, threads, parity[name]) for name in runners]
    return measurements


def _session_runner(session, exported: Exported) -> Callable[[Inputs], list]:
    names = exported.spec.input_names

    def run(inputs: Inputs) -> list:
        return session.run(None, {name: inputs[name] for name in names})

    return run


def _summarise(name: str, passes: list[dict[str, Timing]], batch: int, sequence: int, threads: int, parity: str) -> Measurement:
    medians = [timings[name].median_ms for timings in passes]
    ratios = [timings[PYTORCH].median_ms / timings[name].median_ms for timings in passes]
    pooled = Timing(tuple(sample for timings in passes for sample in timings[name].samples_ms))
    return Measurement(
        name, batch, sequence, threads, float(np.median(medians)), pooled.percentile_ms(90), pooled.percentile_ms(99),
        len(pooled.samples_ms), float(np.median(ratios)), (min(ratios), max(ratios)), parity,
    )


def describe_parity(report: ParityReport | None) -> str:
    """The worst task metric and the largest max |Δ| of a level's gate report, e.g. 'cosine 0.9901, max|Δ| 0.39'."""
    if report is None:
        return "not gated"
    outputs = report.summary()["outputs"].values()
    metric = next((o for o in outputs if o["metric_value"] is not None), None)
    worst_abs = max(o["max_abs"] for o in outputs)
    text = f"{metric['metric']} {metric['metric_value']:.4f}, " if metric else ""
    return text + f"max|Δ| {worst_abs:.2g}" + ("" if report.passed else " (fails its gate)")


def markdown_table(measurements: Sequence[Measurement]) -> str:
    """One row per candidate and shape: latency, speed-up against PyTorch in the same run, and parity."""
    lines = [
        "| candidate | batch×seq | median ms | p90 ms | p99 ms | calls | × PyTorch (pass range) | parity on the validation text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in measurements:
        low, high = m.speedup_range
        lines.append(
            f"| {m.candidate} | {m.batch}×{m.sequence} | {m.median_ms:.1f} | {m.p90_ms:.1f} | {m.p99_ms:.1f} | {m.calls} "
            f"| {m.speedup:.2f}× ({low:.2f}–{high:.2f}) | {m.parity} |"
        )
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """`1x128,8x128` -> [(1, 128), (8, 128)]."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise UsageError(f"--shapes must look like 1x128,8x128; got {text!r}")
    return shapes  # type: ignore[return-value]


def prepare(recipe: Recipe, work_dir: Path, levels: tuple[str, ...] | None = None) -> tuple[source.LoadedModel, Exported, OptimizeResult]:
    """Load, export and build + gate the CPU levels, as `packager package` does."""
    task = get_task(recipe.task)
    with step(f"load and export {recipe.name}"):
        loaded = source.load(recipe)
        exported = export.export_onnx(loaded, task, work_dir / "model.onnx", recipe.opset)
    with step("build and gate the CPU levels"):
        batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
        validator = validate.Validator(task, exported.spec, batches, validate.torch_runner(exported.wrapper, exported.spec), recipe.tolerances)
        config = optimize.parse_config(recipe)
        config = config.with_levels("cpu", levels) if levels else config
        result = optimize.optimize(loaded, task, exported, validator, config, "cpu", work_dir / "levels")
    say(result.table())
    return loaded, exported, result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m packager.bench", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="recipe name, recipe .toml or model folder")
    parser.add_argument("--shapes", default="1x128,8x128", help="batch x sequence list (default 1x128,8x128)")
    parser.add_argument("--levels", help="CPU levels to build and measure (default: the recipe's)")
    parser.add_argument("--passes", type=int, default=Budget.passes, help="interleaved passes (default 3)")
    parser.add_argument("--rounds", type=int, default=Budget.max_rounds, help="most rounds per pass (default 50)")
    parser.add_argument("--seconds", type=float, default=Budget.seconds, help="time budget per pass (default 20)")
    parser.add_argument("--threads", type=int, help="threads for PyTorch and ONNX Runtime (default: all cores)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.model)
    with tempfile.TemporaryDirectory(prefix="bench.") as folder:
        levels = optimize.parse_levels_option(args.levels) if args.levels else None
        loaded, exported, result = prepare(recipe, Path(folder), levels)
        budget = Budget(max_rounds=args.rounds, seconds=args.seconds, passes=args.passes)
        with step(f"measure {args.shapes} ({budget.passes} interleaved passes)"):
            measurements = measure_in_process(loaded, exported, result.levels, parse_shapes(args.shapes), budget, args.threads)
    say(f"\n{recipe.name}, {measurements[0].threads} threads, ONNX Runtime spinning off, {os.cpu_count()} cores\n")
    say(markdown_table(measurements))


if __name__ == "__main__":
    main()
