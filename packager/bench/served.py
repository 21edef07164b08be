"""Served: the build published into a temporary repository on the launcher's Triton server, measured with
closed-loop clients over HTTP and gRPC, dynamic batching on and off, with Triton's own server-side breakdown."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tritonclient.utils import InferenceServerException

from packager.bench.in_process import Latency, Timing
from packager.bench.load import PHASES, closed_loop, counted, statistics
from packager.bench.mixed import MixedPoint, measure_mixed, text_ensembles
from packager.bench.options import BenchOptions, LoadBudget
from packager.bench.workload import Workload
from packager.console import say
from packager.errors import PackagerError
from packager.triton.client import PROTOCOLS, Client, Wire, connection
from packager.triton.discovery import Model, Role, load_servable
from packager.triton.rows import CheckStatus
from packager.triton.server import TritonServer, available_backends, serve
from packager.validate import Inputs

ADMIN_TIMEOUT_S = 300.0  # statistics calls and the reloads that turn dynamic batching off


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

    model: Model
    steps: tuple[str, ...]  # the ensemble's steps, or the model itself
    backend: str  # the backend that runs the graph: Triton's onnxruntime (native) or python

    @property
    def input(self) -> str:
        return "text" if self.model.role is Role.ENSEMBLE else "tensors"

    def request(self, workload: Workload) -> Inputs:
        if self.model.role is Role.ENSEMBLE:
            return self.model.text_request(workload.texts)
        return workload.inputs


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
    backend: str

    @property
    def configuration(self) -> str:
        return (f"triton {self.protocol} {self.input}→{self.model} ({self.backend}) "
                f"batching {'on' if self.dynamic_batching else 'off'}")

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
    mixed: list[MixedPoint] = dataclasses.field(default_factory=list)  # mixed lengths, length buckets on and off


def endpoints_of(models: Sequence[Model]) -> list[Endpoint]:
    """Every loaded ensemble and model that takes requests (the tokenizer is measured as an ensemble's step)."""
    graphs = {model.name: model for model in models if model.role is Role.MODEL}
    ends = [Endpoint(model, tuple(model.steps), next(graphs[step].backend for step in model.steps if step in graphs))
            for model in models if model.role is Role.ENSEMBLE]
    return ends + [Endpoint(model, (model.name,), model.backend) for model in graphs.values()]


def measure_served(repository_root: Path, workloads: Sequence[Workload], options: BenchOptions,
                   shipped_level: str, tokenizer, lengths: tuple[int, ...]) -> ServedResult:
    """Serve the repository, then measure every point: batching on (and then the mixed-length clients, one per
    entry of `lengths`, through each ensemble with length buckets on and off), then reloaded without batching,
    each protocol, endpoint, workload and client count."""
    with serve(options.launcher, repository_root) as server:
        found, rows = load_servable(server, repository_root, backends=available_backends(options.launcher))
        failed = [row for row in rows if row.status is CheckStatus.FAIL]
        if failed:
            raise PackagerError(f"Triton could not load {failed[0].model}: {failed[0].detail}")
        loaded = [found[row.model] for row in rows if row.status is CheckStatus.PASS]
        endpoints = endpoints_of(loaded)
        if not endpoints:
            raise PackagerError(f"{options.launcher} Triton can serve none of {', '.join(found)}")
        points, mixed = [], []
        with connection(PROTOCOLS["http"], server, ADMIN_TIMEOUT_S) as admin:
            version = admin.server_version()
            for batching in (True, False):
                if not batching:
                    mixed = _measure_mixed(server, admin, loaded, tokenizer, lengths, options)
                    _turn_off_dynamic_batching(admin, loaded)
                for protocol, endpoint, workload, clients in itertools.product(
                        options.protocols, endpoints, workloads, options.concurrency):
                    points.append(measure_point(server, admin, PROTOCOLS[protocol], endpoint, workload,
                                                clients, batching, options.load))
                    say(f"    {points[-1].configuration} {workload.shape} x{clients}: "
                        f"p50 {points[-1].latency.p50_ms:.1f} ms, {points[-1].latency.inferences_per_s:.1f} inf/s")
    not_served = {row.model: row.detail for row in rows if row.status is CheckStatus.SKIP}
    return ServedResult(points, not_served, version, shipped_level, mixed)


def _measure_mixed(server: TritonServer, admin: Client, loaded: Sequence[Model], tokenizer, lengths: tuple[int, ...],
                   options: BenchOptions) -> list[MixedPoint]:
    tokenizers = [model.name for model in loaded if model.role is Role.TOKENIZER]
    ensembles = text_ensembles(loaded)
    if not (tokenizers and ensembles and lengths):
        return []
    wire = PROTOCOLS[options.protocols[-1]]
    points = measure_mixed(server, admin, wire, ensembles, tokenizers[0], tokenizer, lengths, options.load)
    for point in points:
        say(f"    mixed lengths {point.protocol} text→{point.model} ({point.backend}) buckets "
            f"{'on' if point.buckets else 'off'} x{point.clients}: p50 {point.latency.p50_ms:.1f} ms, "
            f"{point.latency.inferences_per_s:.1f} inf/s, avg batch {point.average_batch or 0:.2f}")
    return points


def _turn_off_dynamic_batching(admin: Client, models: Sequence[Model]) -> None:
    """Reload every model that batches dynamically with its served config minus dynamic_batching (Triton's
    load-time config override; the repository on disk is left as it is)."""
    for model in models:
        if not model.batches_dynamically:
            continue
        config = admin.config(model.name)
        config.pop("dynamic_batching", None)
        try:
            admin.load(model.name, config)
        except InferenceServerException as exc:
            raise PackagerError(f"reloading {model.name} without dynamic batching failed: {exc.message()}") from None
        if "dynamic_batching" in admin.config(model.name):
            raise PackagerError(f"{model.name} still batches dynamically after its reload")


def measure_point(
    server: TritonServer, admin: Client, wire: Wire, endpoint: Endpoint, workload: Workload, concurrency: int,
    batching: bool, budget: LoadBudget,
) -> Served:
    """`concurrency` closed-loop clients, each with its own connection; Triton's statistics are read after the
    clients' warmup (which checks the answers) and after the last request."""
    model = endpoint.model
    names = (model.name, *endpoint.steps) if model.role is Role.ENSEMBLE else endpoint.steps
    inputs = endpoint.request(workload)
    start = statistics(admin, names)  # every earlier request is counted: each point waits for its own
    before: dict[str, dict[str, int]] = {}
    warmups = concurrency * budget.warmup

    @contextmanager
    def connect() -> Iterator[Callable[[bool], None]]:
        with connection(wire, server) as client:
            yield _call(client, model, inputs, workload.batch)

    latencies, seconds = closed_loop(connect, concurrency, budget,
                                     lambda: before.update(counted(admin, names, start, warmups)))
    after = counted(admin, names, before, len(latencies))
    times = tuple(_server_times(name, before[name], after[name]) for name in names)
    samples = Timing(tuple(latencies))
    latency = Latency(len(latencies), samples.median_ms, samples.percentile_ms(90), samples.percentile_ms(99),
                      len(latencies) / seconds)
    return Served(wire.name, model.name, endpoint.input, batching, workload.batch, workload.sequence, concurrency,
                  latency, times, endpoint.steps, endpoint.backend)


def _call(client: Client, model: Model, inputs: Inputs, rows: int) -> Callable[[bool], None]:
    """One request with prepared tensors; when checked, every output must come back with `rows` rows."""
    tensors, outputs = client.request(inputs, model.output_names)

    def call(check: bool) -> None:
        result = client.send(model.name, tensors, outputs)
        if check:
            for name in model.output_names:
                answer = result.as_numpy(name)
                if answer is None or answer.shape[0] != rows:
                    raise PackagerError(f"{model.name} answered '{name}' with shape "
                                        f"{None if answer is None else answer.shape}, expected {rows} rows")

    return call


def _server_times(name: str, before: dict[str, int], after: dict[str, int]) -> ServerTimes:
    delta = {key: after[key] - before.get(key, 0) for key in after}
    requests = delta["requests"]
    if requests <= 0:
        raise PackagerError(f"Triton's statistics show no request to {name} during the measurement")
    per_request = {f"{key}_ms": delta[key] / requests / 1e6 for key in ("total", *PHASES)}
    return ServerTimes(name, requests, delta["inferences"], delta["executions"], **per_request)
