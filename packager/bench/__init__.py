"""Benchmark: PyTorch eager, the build's ONNX graphs in ONNX Runtime, and the model served by a live Triton server.

One run, one machine, the same tokenized inputs everywhere (`Workload`: real text, the first row exactly `sequence`
tokens long, so the served tokenizer pads every request to the same shape the in-process runs get):

1. in process: PyTorch eager (the recipe's task wrapper) and ONNX Runtime on every gated level of the build folder,
   measured round-robin (one call each per round, the order rotated every round) so that noise from other processes
   hits all of them alike, in several passes; ratios to PyTorch are taken within each pass and the median over passes
   is reported. ONNX Runtime sessions run with idle-thread spinning off, PyTorch and ONNX Runtime with the same
   thread count;
2. served: the build's Triton models (rendered from the build and published into a temporary repository) on the
   launcher's server, over HTTP and gRPC, through each ensemble (text in) and each model directly (tensors in), with
   closed-loop clients (1, 2, 4, 8 by default; each point bounded in requests and seconds), dynamic batching on (as
   rendered) and off (the models reloaded with Triton's load-time config override), and Triton's own server-side
   breakdown (queue, compute input/infer/output per request) from the deltas of its statistics around each point;
3. the model's FLOPs at each shape (`model_flops`) and this machine's peak (`measure_peaks`), so every configuration
   also reads as achieved GFLOP/s and as a percentage of the peak of its precision.

Writes reports/<model>/bench.json, bench.md and bench.png (p50 latency against throughput), and prints the tables.
All traffic stays on loopback (the launcher binds 127.0.0.1).

    python -m packager bench bert --shapes 1x128,8x128 --served-shapes 1x128 --concurrency 1,2,4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from packager import pipeline, render, repository, source, validate
from packager.console import say, step
from packager.errors import PackagerError, UsageError, first_line
from packager.iospec import IOSpec
from packager.recipe import Recipe, load_recipe
from packager.tasks import BATCH, SEQUENCE, get_task
from packager.triton import smoke
from packager.triton.server import TritonServer, available_backends, serve
from packager.validate import Inputs

PYTORCH = "pytorch eager"
REPORT_FILES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}
LEVEL_PRECISION = {"plain": "fp32", "fused": "fp32", "int8": "int8", "fp16": "fp16"}
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")  # Triton's per-request server-side times
ADMIN_TIMEOUT_S = 300.0  # statistics calls and the reloads that turn dynamic batching off
PEAK_REPEATS = 5
IN_PROCESS_COLOURS = ("black", "dimgray", "darkgoldenrod", "saddlebrown", "purple")  # the served lines use C0..C9
SERVING_LAUNCHERS = ("local", "docker")  # launchers that serve the repository the bench publishes (not `url`)
STATISTICS_READS, STATISTICS_INTERVAL_S = 20, 0.05  # until two reads agree

Shape = tuple[int, int]  # batch, sequence


# ---- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """In process: warmup calls per candidate, then rounds until either limit, in each of `passes`."""

    warmup: int = 3
    max_rounds: int = 50
    seconds: float = 8.0
    passes: int = 3

    def __post_init__(self):
        _require_positive(rounds=self.max_rounds, seconds=self.seconds, passes=self.passes)


@dataclass(frozen=True)
class LoadBudget:
    """Served: warmup requests per client, then requests until `max_requests` in all or `seconds`, per point."""

    warmup: int = 2
    max_requests: int = 600
    seconds: float = 3.0

    def __post_init__(self):
        _require_positive(requests=self.max_requests, point_seconds=self.seconds)


def _require_positive(**values: float) -> None:
    """UsageError naming the first value that is not above zero (as its command-line option)."""
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be above 0; got {value}")


@dataclass(frozen=True)
class BenchOptions:
    build_root: Path = Path("build")
    reports_root: Path = Path("reports")
    shapes: tuple[Shape, ...] | None = None  # in process; default: (1, opt sequence) and (opt batch, opt sequence)
    served_shapes: tuple[Shape, ...] | None = None  # default: (1, opt sequence); also measured in process
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    protocols: tuple[str, ...] = tuple(smoke.PROTOCOLS)
    budget: Budget = Budget()
    load: LoadBudget = LoadBudget()
    threads: int | None = None  # PyTorch and ONNX Runtime threads; default: all cores
    serve: bool = True
    launcher: str = "local"
    peak_size: int = 2048  # square matmul size for the peak
    command: str = ""  # recorded in the report

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise UsageError(f"--concurrency needs client counts >= 1; got {list(self.concurrency)}")
        unknown = [name for name in self.protocols if name not in smoke.PROTOCOLS]
        if unknown or not self.protocols:
            raise UsageError(f"--protocols must be among {', '.join(smoke.PROTOCOLS)}; got {list(self.protocols)}")

    def grid(self, recipe: Recipe) -> tuple[list[Shape], list[Shape]]:
        """(in-process shapes, served shapes); served shapes are measured in process too (their PyTorch baseline)."""
        profile = recipe.profile
        served = list(self.served_shapes or [(1, profile.sequence.opt)])
        in_process = list(self.shapes or [(1, profile.sequence.opt), (profile.batch.opt, profile.sequence.opt)])
        shapes = list(dict.fromkeys(in_process + served))
        for batch, sequence in shapes:
            if not (profile.batch.min <= batch <= profile.batch.max and
                    profile.sequence.min <= sequence <= profile.sequence.max):
                raise UsageError(f"shape {batch}x{sequence} is outside the profile of {recipe.name} (batch "
                                 f"{profile.batch.min}..{profile.batch.max}, sequence "
                                 f"{profile.sequence.min}..{profile.sequence.max})")
        return shapes, served


# ---- inputs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A request: `batch` texts, and their tokens at exactly `sequence` as the served tokenizer pads them."""

    batch: int
    sequence: int
    texts: tuple[str, ...]
    tensors: Inputs

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.sequence}"


def make_workload(tokenizer, spec: IOSpec, batch: int, sequence: int) -> Workload:
    """Real text: one text of exactly `sequence` tokens, then validation texts no longer than that (mixed lengths)."""
    fitting = [text for text in validate.VALIDATION_TEXTS if token_count(tokenizer, text, sequence) <= sequence]
    others = itertools.cycle(fitting or [""])
    texts = (text_of_length(tokenizer, sequence), *(next(others) for _ in range(batch - 1)))
    return Workload(batch, sequence, texts, validate.tokenize(tokenizer, spec, list(texts), sequence))


def token_count(tokenizer, text: str, limit: int) -> int:
    """Tokens of `text` with the special tokens, counted up to `limit` + 1."""
    return len(tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"])


def text_of_length(tokenizer, tokens: int) -> str:
    """Words of the validation texts, added while they fit, until the text is exactly `tokens` tokens long."""
    words = " ".join(validate.VALIDATION_TEXTS).split()
    text, count = "", token_count(tokenizer, "", tokens)
    for word in itertools.islice(itertools.cycle(words), 4 * tokens + len(words)):
        if count == tokens:
            break
        candidate = f"{text} {word}".strip()
        length = token_count(tokenizer, candidate, tokens)
        if length <= tokens:
            text, count = candidate, length
    if count != tokens:
        raise PackagerError(f"cannot make a text of exactly {tokens} tokens (got {count}) for the benchmark")
    return text


# ---- FLOPs and this machine's peak -----------------------------------------------------------------------------


def model_flops(path: Path, spec: IOSpec, shapes: Sequence[Shape]) -> dict[Shape, float]:
    """Floating-point operations of one inference at each (batch, sequence), counted from the ONNX graph.

    Method: the graph's inputs are given the concrete batch and sequence, ONNX Runtime's symbolic shape inference
    (which also knows its contrib ops) gives every tensor its concrete shape, and each matrix product is counted as
    2 × multiply-accumulates with those shapes: MatMul and MatMulInteger (broadcast batch dims × M × K × N), Gemm
    (M × K × N) and the fused Attention (the QKV projection, QKᵀ and softmax·V). Element-wise work (LayerNorm,
    GELU, softmax, adds) is left out: it is about 1% of BERT's products at sequence 128. Padded positions count: the
    graph computes them. The bench counts the plain export: the fused graph does the same products (the tests check
    that both give the same number) and the int8 graph does them as integer multiply-accumulates.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    counts = {}
    for batch, sequence in shapes:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for tensor in fixed.graph.input:
            for dim in tensor.type.tensor_type.shape.dim:
                if dim.dim_param in (BATCH, SEQUENCE):
                    dim.dim_value = batch if dim.dim_param == BATCH else sequence
        try:
            with _working_directory(tempfile.mkdtemp(prefix="flops.")) as scratch:  # a failed inference saves there
                inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
        except Exception as exc:  # the inference raises bare Exceptions
            raise PackagerError(f"cannot infer the shapes of {path.name} at {batch}x{sequence}: {first_line(exc)}") \
                from None
        counts[(batch, sequence)] = _count_flops(inferred.graph, path.name)
    return counts


@contextmanager
def _working_directory(folder: str) -> Iterator[str]:
    """Run in `folder`, then remove it and return (ONNX Runtime's shape inference saves its model into the working
    directory when it fails)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
        shutil.rmtree(folder, ignore_errors=True)


def _count_flops(graph: onnx.GraphProto, where: str) -> float:
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def shape_of(name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise PackagerError(f"cannot count FLOPs of {where}: tensor '{name}' has no concrete shape ({dims})")
        return dims

    counted = (node for node in graph.node if node.op_type in FLOP_COUNTERS)
    return float(sum(FLOP_COUNTERS[node.op_type](node, shape_of) for node in counted))


def _matmul_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    a, b = ([1, *a] if len(a) == 1 else a), ([*b, 1] if len(b) == 1 else b)
    batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def _gemm_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    rows, inner = (a[1], a[0]) if attributes.get("transA") else (a[0], a[1])
    columns = b[0] if attributes.get("transB") else b[1]
    return 2.0 * rows * inner * columns


def _attention_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    """com.microsoft Attention: input [B, S, H_in] × weights [H_in, Hq+Hk+Hv], then QKᵀ and softmax·V per head."""
    batch, sequence, hidden_in = shape_of(node.input[0])
    projected = shape_of(node.input[1])[1]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    q_size, _, v_size = attributes.get("qkv_hidden_sizes") or [projected // 3] * 3
    return 2.0 * batch * sequence * hidden_in * projected + 2.0 * batch * sequence * sequence * (q_size + v_size)


FLOP_COUNTERS: dict[str, Callable[[onnx.NodeProto, Callable[[str], list[int]]], float]] = {
    "MatMul": _matmul_flops,
    "MatMulInteger": _matmul_flops,
    "Gemm": _gemm_flops,
    "Attention": _attention_flops,
}


@dataclass(frozen=True)
class Peak:
    precision: str
    gflops: float  # GFLOP/s (fp32) or GOP/s (int8): the best of the repeats
    method: str


def measure_peaks(threads: int, size: int = 2048, repeats: int = PEAK_REPEATS) -> dict[str, Peak]:
    """This machine's limit per precision: the fastest of `repeats` large square matrix products (after a warmup).

    fp32: torch.matmul. int8: ONNX Runtime's MatMulInteger (uint8 × int8 → int32), the kernel its dynamically
    quantized graphs run (VNNI where the CPU has it).
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _fastest(lambda: torch.matmul(a, b), repeats)
    session, feed = _int8_matmul_session(size, threads)
    int8 = _fastest(lambda: session.run(None, feed), repeats)
    operations, how = 2.0 * size**3, f"{size}x{size}, {threads} threads, best of {repeats}"
    return {
        "fp32": Peak("fp32", operations / fp32 / 1e9, f"torch.matmul fp32 {how}"),
        "int8": Peak("int8", operations / int8 / 1e9, f"ONNX Runtime MatMulInteger u8xs8 {how}"),
    }


def best_peaks(*runs: dict[str, Peak]) -> dict[str, Peak]:
    """Per precision the highest of several measurements: other load on the machine only ever lowers one."""
    return {name: max((run[name] for run in runs), key=lambda peak: peak.gflops) for name in runs[0]}


def _fastest(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def _int8_matmul_session(size: int, threads: int):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = rng.integers(-128, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "peak_int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])],
        [onnx.numpy_helper.from_array(weights, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory(prefix="peak.") as folder:
        path = Path(folder) / "matmul_int8.onnx"
        onnx.save(model, str(path))
        session = validate.onnxruntime_session(path, threads)
    return session, {"A": rng.integers(0, 256, (size, size), dtype=np.uint8)}


# ---- in process ----------------------------------------------------------------------------------------------


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


def graphs_of(build: pipeline.Build) -> list[Graph]:
    """Every level of the build that passed its gate."""
    graphs = []
    for level in build.record["optimize"]["levels"]:
        name = level["level"]
        path = build.level_path(name)
        if level["passed"] and path and path.exists():
            graphs.append(Graph(name, path, describe_parity(level["parity"]), level["shipped"]))
    return graphs


def describe_parity(summary: dict | None) -> str:
    """The worst task metric and the largest max |Δ| of a gate summary, e.g. 'cosine 0.9901, max|Δ| 0.39'."""
    if not summary:
        return "not gated"
    outputs = summary["outputs"].values()
    metric = next((o for o in outputs if o["metric_value"] is not None), None)
    worst_abs = max(o["max_abs"] for o in outputs)
    text = f"{metric['metric']} {metric['metric_value']:.4f}, " if metric else ""
    return text + f"max|Δ| {worst_abs:.2g}" + ("" if summary["passed"] else " (fails its gate)")


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
        calls = {name: (lambda run=run: run(workload.tensors)) for name, run in runners.items()}
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


# ---- served --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTimes:
    """Triton's statistics for one model over one point: per-request averages of each phase."""

    model: str
    requests: int
    inferences: int
    executions: int
    total_ms: float  # request received to response sent
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float

    @property
    def average_batch(self) -> float | None:
        """Inferences per execution: above 1 when the dynamic batcher joined requests (None for an ensemble)."""
        return self.inferences / self.executions if self.executions else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return data | ({"average_batch": self.average_batch} if self.average_batch else {})


@dataclass(frozen=True)
class Endpoint:
    """What a client calls: an ensemble (text in) or a model (tensors in), and the models its time is spent in."""

    model: smoke.Model
    steps: tuple[str, ...]  # the ensemble's steps, or the model itself

    @property
    def input(self) -> str:
        return "text" if self.model.role is smoke.Role.ENSEMBLE else "tensors"

    def request(self, workload: Workload) -> Inputs:
        if self.model.role is smoke.Role.ENSEMBLE:
            return {self.model.text_input.name: np.array([[text.encode()] for text in workload.texts], dtype=object)}
        return workload.tensors


@dataclass(frozen=True)
class Served:
    protocol: str
    model: str
    input: str  # text (through the ensemble) or tensors (the model directly)
    dynamic_batching: bool
    batch: int
    sequence: int
    concurrency: int
    latency: Latency
    server: tuple[ServerTimes, ...]  # the endpoint, then its steps (for an ensemble)
    steps: tuple[str, ...]

    @property
    def configuration(self) -> str:
        return f"triton {self.protocol} {self.input}→{self.model} batching {'on' if self.dynamic_batching else 'off'}"

    def phase_ms(self, phase: str) -> float:
        """A server-side phase per request, summed over the models the request runs through."""
        return sum(getattr(times, f"{phase}_ms") for times in self.server if times.model in self.steps)

    @property
    def average_batch(self) -> float | None:
        """Of the last step (the model behind an ensemble's tokenizer)."""
        return next((t.average_batch for t in self.server if t.model == self.steps[-1]), None)


@dataclass(frozen=True)
class ServedResult:
    points: list[Served]
    not_served: dict[str, str]  # model -> why (e.g. its backend is missing on this server)
    server_version: str
    shipped_level: str


def endpoints_of(models: Sequence[smoke.Model]) -> list[Endpoint]:
    """Every loaded ensemble and model that takes requests (the tokenizer is measured as an ensemble's step)."""
    ends = [Endpoint(model, tuple(model.steps)) for model in models if model.role is smoke.Role.ENSEMBLE]
    return ends + [Endpoint(model, (model.name,)) for model in models if model.role is smoke.Role.MODEL]


def publish_build(build: pipeline.Build, tokenizer, folder: Path) -> Path:
    """The build's Triton models (the shipped graph; no TensorRT plan) rendered and published as version 1."""
    recipe = build.recipe
    serving = render.ServingConfig.from_recipe(recipe)
    models = render.render_repository(recipe, build.spec, serving, render.Artifacts(build.shipped_path, tokenizer))
    manifest = repository.build_manifest(recipe, build.spec, build.record["weights_sha256"], build.record["parity"])
    repository.publish(folder, models, manifest, version=1)
    return folder


def measure_served(repository_root: Path, workloads: Sequence[Workload], options: BenchOptions,
                   shipped_level: str) -> ServedResult:
    """Serve the repository, then measure every point: batching on, then reloaded without, each protocol, endpoint,
    workload and client count."""
    with serve(options.launcher, repository_root) as server:
        found, rows = smoke.load_servable(server, repository_root, backends=available_backends(options.launcher))
        failed = [row for row in rows if row.status is smoke.Status.FAIL]
        if failed:
            raise PackagerError(f"Triton could not load {failed[0].model}: {failed[0].detail}")
        loaded = [found[row.model] for row in rows if row.status is smoke.Status.PASS]
        endpoints = endpoints_of(loaded)
        if not endpoints:
            raise PackagerError(f"{options.launcher} Triton can serve none of {', '.join(found)}")
        points = []
        with _admin(server) as admin:
            version = admin.get_server_metadata()["version"]
            for batching in (True, False):
                if not batching:
                    _turn_off_dynamic_batching(admin, loaded)
                for protocol, endpoint, workload, clients in itertools.product(
                        options.protocols, endpoints, workloads, options.concurrency):
                    points.append(measure_point(server, admin, smoke.PROTOCOLS[protocol], endpoint, workload,
                                                clients, batching, options.load))
                    say(f"    {points[-1].configuration} {workload.shape} x{clients}: "
                        f"p50 {points[-1].latency.p50_ms:.1f} ms, {points[-1].latency.inferences_per_s:.1f} inf/s")
    not_served = {row.model: row.detail for row in rows if row.status is smoke.Status.SKIP}
    return ServedResult(points, not_served, version, shipped_level)


@contextmanager
def _admin(server: TritonServer) -> Iterator[httpclient.InferenceServerClient]:
    """The HTTP client for statistics and reloads, closed on exit (an open one delays the server's shutdown)."""
    with closing(httpclient.InferenceServerClient(server.http_url, network_timeout=ADMIN_TIMEOUT_S)) as client:
        yield client


def _turn_off_dynamic_batching(admin: httpclient.InferenceServerClient, models: Sequence[smoke.Model]) -> None:
    """Reload every model that batches dynamically with its served config minus dynamic_batching (Triton's
    load-time config override; the repository on disk is left as it is)."""
    for model in models:
        if not model.batches_dynamically:
            continue
        config = admin.get_model_config(model.name)
        config.pop("dynamic_batching", None)
        try:
            admin.load_model(model.name, config=json.dumps(config))
        except InferenceServerException as exc:
            raise PackagerError(f"reloading {model.name} without dynamic batching failed: {exc.message()}") from None
        if "dynamic_batching" in admin.get_model_config(model.name):
            raise PackagerError(f"{model.name} still batches dynamically after its reload")


def measure_point(
    server: TritonServer, admin: httpclient.InferenceServerClient, protocol: smoke.Protocol, endpoint: Endpoint,
    workload: Workload, concurrency: int, batching: bool, budget: LoadBudget,
) -> Served:
    """`concurrency` closed-loop clients, each with its own connection; Triton's statistics are read after the
    clients' warmup (which checks the answers) and after the last request."""
    model = endpoint.model
    names = (model.name, *endpoint.steps) if model.role is smoke.Role.ENSEMBLE else endpoint.steps
    inputs = endpoint.request(workload)
    before: dict[str, dict[str, int]] = {}

    @contextmanager
    def connect() -> Iterator[Callable[[bool], None]]:
        with closing(smoke.Client(protocol, protocol.address(server))) as client:
            yield _call(client, model, inputs, workload.batch)

    latencies, seconds = closed_loop(connect, concurrency, budget, lambda: before.update(_settled(admin, names)))
    after = _settled(admin, names)
    times = tuple(_server_times(name, before[name], after[name]) for name in names)
    samples = Timing(tuple(latencies))
    latency = Latency(len(latencies), samples.median_ms, samples.percentile_ms(90), samples.percentile_ms(99),
                      len(latencies) / seconds)
    return Served(protocol.name, model.name, endpoint.input, batching, workload.batch, workload.sequence, concurrency,
                  latency, times, endpoint.steps)


def _call(client: smoke.Client, model: smoke.Model, inputs: Inputs, rows: int) -> Callable[[bool], None]:
    """One request with prepared tensors; when checked, every output must come back with `rows` rows."""
    tensors, outputs = client.request(inputs, model.output_names)

    def call(check: bool) -> None:
        result = client.raw.infer(model.name, tensors, outputs=outputs)
        if check:
            for name in model.output_names:
                answer = result.as_numpy(name)
                if answer is None or answer.shape[0] != rows:
                    raise PackagerError(f"{model.name} answered '{name}' with shape "
                                        f"{None if answer is None else answer.shape}, expected {rows} rows")

    return call


def closed_loop(
    connect: Callable[[], AbstractContextManager[Callable[[bool], None]]], concurrency: int, budget: LoadBudget,
    when_ready: Callable[[], None] = lambda: None,
) -> tuple[list[float], float]:
    """`concurrency` threads, each with its own connection (`connect` yields a `call(check)`; tritonclient's HTTP
    client cannot change threads), warm up (checked calls), then `when_ready` runs and all are released together to
    call in a loop until `max_requests` in all or `seconds` have passed.

    Returns the latencies (ms) and the seconds from the release to the last completion. The first error of any
    thread stops every thread and is raised here.
    """
    lock = threading.Lock()
    ready, go = threading.Barrier(concurrency + 1), threading.Barrier(concurrency + 1)
    issued, latencies, errors, deadline = [0], [], [], [math.inf]

    def loop(call: Callable[[bool], None]) -> None:
        while not errors:
            with lock:
                if issued[0] >= budget.max_requests or time.perf_counter() > deadline[0]:
                    return
                issued[0] += 1
            began = time.perf_counter()
            call(False)
            with lock:
                latencies.append((time.perf_counter() - began) * 1000)

    def worker() -> None:
        try:
            with connect() as call:
                for _ in range(budget.warmup):
                    call(True)
                ready.wait(smoke.REQUEST_TIMEOUT_S)
                go.wait(smoke.REQUEST_TIMEOUT_S)
                loop(call)
        except threading.BrokenBarrierError:
            pass  # another thread failed first
        except Exception as exc:  # noqa: BLE001 - whatever a client thread meets is raised in the caller
            errors.append(exc)
            ready.abort()
            go.abort()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(smoke.REQUEST_TIMEOUT_S * (budget.warmup + 1))
        when_ready()
        began = time.perf_counter()
        deadline[0] = began + budget.seconds
        go.wait(smoke.REQUEST_TIMEOUT_S)
    except threading.BrokenBarrierError:
        began = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, began + budget.seconds + smoke.REQUEST_TIMEOUT_S - time.perf_counter()))
    seconds = time.perf_counter() - began
    if errors:
        raise PackagerError(f"a benchmark request failed: {_error_text(errors[0])}")
    if any(thread.is_alive() for thread in threads) or not latencies:
        raise PackagerError(f"benchmark clients did not finish within {smoke.REQUEST_TIMEOUT_S:.0f} s of their time")
    return latencies, seconds


def _error_text(error: Exception) -> str:
    message = error.message() if isinstance(error, InferenceServerException) else str(error)
    return " ".join((message or type(error).__name__).split())


def _settled(admin: httpclient.InferenceServerClient, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """The statistics once they stop changing: Triton counts a request just after its response is sent."""
    current = _statistics(admin, names)
    for _ in range(STATISTICS_READS):
        time.sleep(STATISTICS_INTERVAL_S)
        again = _statistics(admin, names)
        if again == current:
            break
        current = again
    return current


def _statistics(admin: httpclient.InferenceServerClient, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Cumulative counters per model (all served versions summed)."""
    counters = {}
    for name in names:
        total: dict[str, int] = {}
        for version in admin.get_inference_statistics(name)["model_stats"]:
            stats = version["inference_stats"]
            values = {"requests": stats["success"]["count"], "total": stats["success"]["ns"],
                      "inferences": version["inference_count"], "executions": version["execution_count"],
                      **{phase: stats[phase]["ns"] for phase in PHASES}}
            total = {key: total.get(key, 0) + int(value) for key, value in values.items()}
        counters[name] = total
    return counters


def _server_times(name: str, before: dict[str, int], after: dict[str, int]) -> ServerTimes:
    delta = {key: after[key] - before.get(key, 0) for key in after}
    requests = delta["requests"]
    if requests <= 0:
        raise PackagerError(f"Triton's statistics show no request to {name} during the measurement")
    per_request = {f"{key}_ms": delta[key] / requests / 1e6 for key in ("total", *PHASES)}
    return ServerTimes(name, requests, delta["inferences"], delta["executions"], **per_request)


# ---- the report ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    model: str
    created: str
    command: str
    settings: dict
    machine: dict
    peaks: dict[str, Peak]
    flops: dict[Shape, float]
    in_process: list[InProcess]
    served: ServedResult | None
    build_folder: str

    def pytorch(self, batch: int, sequence: int) -> InProcess:
        return next(m for m in self.in_process if m.candidate == PYTORCH and (m.batch, m.sequence) == (batch, sequence))

    def ratios(self, batch: int, sequence: int, latency: Latency) -> dict[str, float]:
        """p50 and throughput against PyTorch eager at the same shape, both > 1 when faster than PyTorch."""
        reference = self.pytorch(batch, sequence).latency
        return {"p50_vs_pytorch": reference.p50_ms / latency.p50_ms,
                "throughput_vs_pytorch": latency.inferences_per_s / reference.inferences_per_s}

    def compute(self, batch: int, sequence: int, latency: Latency, precision: str) -> dict[str, float]:
        """Achieved GFLOP/s (the model's FLOPs × inferences/s) and its share of the peak of its precision."""
        gflops = self.flops[(batch, sequence)] * latency.inferences_per_s / 1e9
        peak = self.peaks.get(precision)
        return {"gflops_per_s": gflops} | ({"percent_of_peak": 100 * gflops / peak.gflops} if peak else {})

    def to_dict(self) -> dict:
        def derived(row, precision):
            return self.ratios(row.batch, row.sequence, row.latency) | self.compute(
                row.batch, row.sequence, row.latency, precision) | {
                "sequences_per_s": row.latency.inferences_per_s * row.batch}

        served = None
        if self.served:
            precision = LEVEL_PRECISION.get(self.served.shipped_level, "fp32")
            served = {
                "server_version": self.served.server_version,
                "shipped_level": self.served.shipped_level,
                "not_served": self.served.not_served,
                "points": [dataclasses.asdict(p) | {"server": [t.to_dict() for t in p.server]} | derived(p, precision)
                           | ({"average_batch": p.average_batch} if p.average_batch else {})
                           for p in self.served.points],
            }
        return {
            "model": self.model, "created": self.created, "command": self.command, "build": self.build_folder,
            "settings": self.settings, "machine": self.machine,
            "peaks": {name: dataclasses.asdict(peak) for name, peak in self.peaks.items()},
            "flops": {f"{b}x{s}": value for (b, s), value in self.flops.items()},
            "in_process": [dataclasses.asdict(m) | derived(m, m.precision) for m in self.in_process],
            "served": served,
        }

    def in_process_table(self) -> str:
        rows = []
        for m in self.in_process:
            low, high = m.speedup_range
            ratio = self.ratios(m.batch, m.sequence, m.latency)
            compute = self.compute(m.batch, m.sequence, m.latency, m.precision)
            rows.append([m.candidate, f"{m.batch}×{m.sequence}", *_latency_cells(m.latency, m.batch),
                         f"{m.speedup:.2f}× ({low:.2f}–{high:.2f})", f"{ratio['throughput_vs_pytorch']:.2f}×",
                         *_compute_cells(compute, m.precision), m.parity])
        headers = ["configuration", "batch×seq", "p50 ms", "p90 ms", "p99 ms", "inf/s", "seq/s",
                   "p50 vs PyTorch (passes)", "throughput vs PyTorch", "GFLOP/s", "% of peak", "parity"]
        return markdown_table(headers, rows)

    def served_table(self) -> str:
        precision = LEVEL_PRECISION.get(self.served.shipped_level, "fp32")
        rows = []
        for p in self.served.points:
            ratio = self.ratios(p.batch, p.sequence, p.latency)
            compute = self.compute(p.batch, p.sequence, p.latency, precision)
            phases = " / ".join(f"{p.phase_ms(phase):.2f}" for phase in PHASES)
            batch = f"{p.average_batch:.2f}" if p.average_batch else "–"
            rows.append([p.protocol, f"{p.input} → {p.model}", "on" if p.dynamic_batching else "off",
                         f"{p.batch}×{p.sequence}", p.concurrency, *_latency_cells(p.latency, p.batch),
                         f"{ratio['p50_vs_pytorch']:.2f}×", f"{ratio['throughput_vs_pytorch']:.2f}×",
                         *_compute_cells(compute, precision), phases, batch])
        headers = ["protocol", "input → model", "dynamic batching", "batch×seq", "clients", "p50 ms", "p90 ms",
                   "p99 ms", "inf/s", "seq/s", "p50 vs PyTorch", "throughput vs PyTorch", "GFLOP/s", "% of peak",
                   "server ms: queue / input / infer / output", "avg batch"]
        return markdown_table(headers, rows)

    def markdown(self) -> str:
        peaks = "; ".join(f"{p.precision} **{p.gflops:.0f} G{'FLOP' if p.precision != 'int8' else 'OP'}/s** "
                          f"({p.method})" for p in self.peaks.values())
        flops = ", ".join(f"{b}×{s}: {value / 1e9:.2f} GFLOP" for (b, s), value in self.flops.items())
        machine = self.machine
        parts = [
            f"# Benchmark: {self.model}",
            f"`{self.command}` — {self.created}, build `{self.build_folder}`.",
            f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads for PyTorch and ONNX "
            f"Runtime; torch {machine['packages'].get('torch')}, onnxruntime {machine['packages'].get('onnxruntime')}. "
            "Shared and noisy machines move every number by tens of percent between runs: read the ratios, which "
            "are measured in the same run, and medians.",
            "## This machine's limit",
            f"Peak: {peaks}; the better of a measurement before and one after the benchmark (other load only "
            "lowers it: above 100% means it was busy both times). Model FLOPs per inference (matrix products "
            f"counted on the ONNX graph): {flops}.",
            "## In process",
            "PyTorch eager and ONNX Runtime on the build's gated graphs, one call each per round (rotated), "
            f"{self.settings['passes']} passes; p50 is the median of the pass medians, the ratio its median over "
            "passes (range in brackets). % of peak uses the peak of the graph's precision.",
            self.in_process_table(),
        ]
        if self.served:
            served = self.served
            skipped = "; ".join(f"{name}: {why}" for name, why in served.not_served.items())
            parts += [
                "## Served by Triton",
                f"tritonserver {served.server_version} ({self.settings['launcher']} launcher, loopback), the shipped "
                f"'{served.shipped_level}' graph. Closed-loop clients in this process, each point at most "
                f"{self.settings['max_requests']} requests or {self.settings['point_seconds']} s. Ratios are against "
                "PyTorch eager at the same batch×sequence, one call at a time. Server times are Triton's statistics "
                "per request, summed over the models a request runs through; avg batch is what the model executed."
                + (f" Not served here: {skipped}." if skipped else ""),
                self.served_table(),
                f"![latency against throughput]({REPORT_FILES['plot']})",
            ]
        return "\n\n".join(parts) + "\n"

    def plot(self, path: Path) -> Path:
        """p50 latency against sequences/s: a line per served configuration over its client counts (one colour per
        protocol, input and shape; dashed without dynamic batching), a point per in-process candidate and shape."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import FuncFormatter
        except ImportError:
            raise PackagerError("the benchmark plot needs matplotlib: pip install '.[bench]'") from None
        figure = Figure(figsize=(10, 6.5), layout="constrained")
        axes = figure.subplots()
        shapes = dict(zip(dict.fromkeys((m.batch, m.sequence) for m in self.in_process), itertools.cycle("s^vDPX*")))
        candidates = dict(zip(dict.fromkeys(m.candidate for m in self.in_process), itertools.cycle(IN_PROCESS_COLOURS)))
        for m in self.in_process:
            axes.scatter([m.latency.inferences_per_s * m.batch], [m.latency.p50_ms], s=60,
                         marker=shapes[(m.batch, m.sequence)], color=candidates[m.candidate],
                         label=f"{m.candidate} {m.batch}×{m.sequence} (in process)")
        colours = itertools.cycle(f"C{index}" for index in range(10))
        lines: dict[tuple, list[Served]] = {}
        for p in self.served.points if self.served else []:
            lines.setdefault((p.protocol, p.input, p.model, p.batch, p.sequence, p.dynamic_batching), []).append(p)
        line_colours: dict[tuple, str] = {}
        for (protocol, kind, model, batch, sequence, batching), points in lines.items():
            points.sort(key=lambda p: p.concurrency)
            x = [p.latency.inferences_per_s * p.batch for p in points]
            y = [p.latency.p50_ms for p in points]
            colour = line_colours.setdefault((protocol, kind, batch, sequence), next(colours))
            axes.plot(x, y, marker="o", color=colour, linestyle="-" if batching else "--",
                      label=f"{protocol} {kind}→{model} {batch}×{sequence}, batching {'on' if batching else 'off'}")
            for p, xi, yi in zip(points, x, y):
                axes.annotate(str(p.concurrency), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        axes.set_xscale("log")
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        axes.set_xlabel("throughput, sequences/s (log)")
        axes.set_ylabel("p50 latency, ms (log)")
        axes.set_title(f"{self.model}: latency against throughput (numbers: concurrent clients)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.savefig(path, dpi=110)
        return path

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {kind: folder / name for kind, name in REPORT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        paths["markdown"].write_text(self.markdown())
        self.plot(paths["plot"])
        return paths


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _latency_cells(latency: Latency, batch: int) -> list[str]:
    return [f"{latency.p50_ms:.1f}", f"{latency.p90_ms:.1f}", f"{latency.p99_ms:.1f}",
            f"{latency.inferences_per_s:.1f}", f"{latency.inferences_per_s * batch:.1f}"]


def _compute_cells(compute: dict[str, float], precision: str) -> list[str]:
    percent = compute.get("percent_of_peak")
    return [f"{compute['gflops_per_s']:.1f}", f"{percent:.0f}% {precision}" if percent is not None else "–"]


# ---- the run ---------------------------------------------------------------------------------------------------


def benchmark(recipe: Recipe, options: BenchOptions = BenchOptions()) -> Report:
    """Measure everything the module docstring lists; builds the model first when the build folder has none."""
    shapes, served_shapes = options.grid(recipe)
    threads = options.threads or os.cpu_count() or 1
    build = ensure_build(recipe, options.build_root)
    with step(f"load {recipe.name} for PyTorch and make the inputs ({', '.join(f'{b}x{s}' for b, s in shapes)})"):
        loaded = source.load(recipe)
        wrapper = get_task(recipe.task).wrapper(loaded.model, build.spec.input_names).eval()
        workloads = {shape: make_workload(loaded.tokenizer, build.spec, *shape) for shape in shapes}
    peak_step = f"peak of this machine ({options.peak_size}² matrix products, {threads} threads)"
    with step(peak_step):
        peaks = measure_peaks(threads, options.peak_size)
    with step("FLOPs per inference from the ONNX graph"):
        flops = model_flops(build.exported_path, build.spec, shapes)
    graphs = graphs_of(build)
    with step(f"in process: PyTorch eager and ONNX Runtime {', '.join(g.level for g in graphs)} "
              f"({options.budget.passes} interleaved passes per shape)"):
        in_process = measure_in_process(wrapper, build.spec, graphs, list(workloads.values()), options.budget, threads)
    served = None
    if options.serve:
        shipped = build.record["optimize"]["shipped"]
        with tempfile.TemporaryDirectory(prefix="bench-repository.") as folder, \
                step(f"served: {options.launcher} Triton, {', '.join(options.protocols)}, clients "
                     f"{', '.join(map(str, options.concurrency))}, dynamic batching on and off"):
            root = publish_build(build, loaded.tokenizer, Path(folder) / "model_repository")
            served = measure_served(root, [workloads[shape] for shape in served_shapes], options, shipped)
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


def ensure_build(recipe: Recipe, build_root: Path) -> pipeline.Build:
    """The build folder of the recipe, built first (as `packager package` builds it) when there is none."""
    if (build_root / recipe.name / pipeline.BUILD_FILE).exists():
        say(f"==> using the build in {build_root / recipe.name}")
        return pipeline.Build.read(recipe, build_root)
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


# ---- command line ----------------------------------------------------------------------------------------------


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
    grid.add_argument("--protocols", default=",".join(smoke.PROTOCOLS), help="http,grpc (default: both)")
    grid.add_argument("--no-serve", action="store_true", help="in process only: no Triton server")
    grid.add_argument("--launcher", choices=SERVING_LAUNCHERS, default="local",
                      help="the Triton server: local (the nvidia-pytriton wheel's, python backend only) or docker "
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
    options = options_from_args(args)
    recipe = load_recipe(args.model, args.task)
    report = benchmark(recipe, options)
    paths = report.write(options.reports_root / recipe.name)
    say("\n" + report.in_process_table())
    if report.served:
        say("\n" + report.served_table())
    say(f"\nreport: {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0
