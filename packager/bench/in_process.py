"""In process: PyTorch eager and ONNX Runtime on the build's gated graphs, interleaved round-robin, in passes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from packager import pipeline, validate
from packager.bench.options import Budget
from packager.bench.workload import Workload
from packager.iospec import IOSpec
from packager.record import LevelRecord
from packager.validate import Inputs

PYTORCH = "pytorch eager"
LEVEL_PRECISION = {"plain": "fp32", "fused": "fp32", "int8": "int8", "fp16": "fp16"}


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))


@dataclass(frozen=True)
class Latency:
    """What one configuration gave at one point: latency percentiles and throughput in requests (inferences)/s."""

    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    inferences_per_s: float


@dataclass(frozen=True)
class Graph:
    """A gated graph of the build folder."""

    level: str
    path: Path
    parity: str  # the level's worst metric and max |Δ| on the validation text
    shipped: bool

    @property
    def precision(self) -> str:
        return LEVEL_PRECISION.get(self.level, "fp32")


@dataclass(frozen=True)
class InProcess:
    candidate: str  # PYTORCH or "onnxruntime <level>"
    precision: str
    batch: int
    sequence: int
    threads: int
    latency: Latency  # p50 = median over passes of each pass's median; p90/p99 over all samples
    speedup: float  # PyTorch median / this median, within each pass; median over passes
    speedup_range: tuple[float, float]  # lowest and highest pass
    parity: str


def graphs_of(build: pipeline.BuildFolder) -> list[Graph]:
    """Every level of the build that passed its gate."""
    graphs = []
    for level in build.record.optimize.levels:
        path = build.level_path(level.level)
        if level.passed and path and path.exists():
            graphs.append(Graph(level.level, path, describe_parity(level), level.shipped))
    return graphs


def describe_parity(level: LevelRecord) -> str:
    """The worst task metric and the largest max |Δ| of a level's gate, e.g. 'cosine 0.9901, max|Δ| 0.39'."""
    if not level.parity:
        return "not gated"
    outputs = level.parity.values()
    metric = next((o for o in outputs if o.metric_value is not None), None)
    worst_abs = max(o.max_abs for o in outputs)
    text = f"{metric.metric} {metric.metric_value:.4f}, " if metric else ""
    return text + f"max|Δ| {worst_abs:.2g}" + ("" if level.passed else " (fails its gate)")


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


def measure_in_process(
    reference: torch.nn.Module, spec: IOSpec, graphs: Sequence[Graph], workloads: Sequence[Workload],
    budget: Budget = Budget(), threads: int | None = None,
) -> list[InProcess]:
    """PyTorch eager on the task wrapper and ONNX Runtime on each graph, interleaved, per workload."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    runners = {PYTORCH: validate.torch_runner(reference, spec)}
    facts = {PYTORCH: ("fp32", "reference")}
    for graph in graphs:
        name = f"onnxruntime {graph.level}"
        runners[name] = _session_runner(validate.onnxruntime_session(graph.path, threads), spec)
        facts[name] = (graph.precision, graph.parity + (" (shipped)" if graph.shipped else ""))
    measurements = []
    for workload in workloads:
        calls = {name: (lambda run=run: run(workload.inputs)) for name, run in runners.items()}
        passes = [interleaved(calls, budget) for _ in range(budget.passes)]
        measurements += [_summarise(name, passes, workload, threads, *facts[name]) for name in runners]
    return measurements


def _session_runner(session, spec: IOSpec) -> Callable[[Inputs], list]:
    names = spec.input_names

    def run(inputs: Inputs) -> list:
        return session.run(None, {name: inputs[name] for name in names})

    return run


def _summarise(name: str, passes: list[dict[str, Timing]], workload: Workload, threads: int, precision: str,
               parity: str) -> InProcess:
    medians = [timings[name].median_ms for timings in passes]
    ratios = [timings[PYTORCH].median_ms / timings[name].median_ms for timings in passes]
    pooled = Timing(tuple(sample for timings in passes for sample in timings[name].samples_ms))
    latency = Latency(len(pooled.samples_ms), float(np.median(medians)), pooled.percentile_ms(90),
                      pooled.percentile_ms(99), 1000.0 / float(np.mean(pooled.samples_ms)))
    return InProcess(name, precision, workload.batch, workload.sequence, threads, latency, float(np.median(ratios)),
                     (min(ratios), max(ratios)), parity)
