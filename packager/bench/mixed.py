"""Served, mixed lengths: concurrent clients, each sending a text of its own length through every ensemble, with the
tokenizer padding to length buckets (as published) and then to each request's longest text (the tokenizer model
reloaded without buckets through Triton's load-time config override). It shows what the buckets do for a backend
that joins equal shapes only (Triton's onnxruntime backend): requests that share a bucket share a shape."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from packager.bench.in_process import Latency, Timing
from packager.bench.load import closed_loop, counted, statistics
from packager.bench.options import LoadBudget
from packager.bench.workload import text_of_length
from packager.errors import PackagerError
from packager.triton.client import Client, Wire, connection
from packager.triton.discovery import Model, Role
from packager.triton.server import TritonServer

BUCKETS_PARAMETER = "length_buckets"  # the tokenizer model's config parameter


@dataclass(frozen=True)
class MixedPoint:
    protocol: str
    model: str  # the ensemble
    backend: str  # of its model step
    buckets: bool  # the tokenizer padded to length buckets (else to each request's longest text)
    clients: int
    lengths: tuple[int, ...]  # each client's text, in tokens
    latency: Latency
    average_batch: float | None  # what the model step executed per run: joins show as > 1


def mixed_lengths(shortest: int, longest: int, clients: int) -> tuple[int, ...]:
    """`clients` token lengths spread geometrically over [shortest, longest] (distinct where the range allows)."""
    spread = np.geomspace(max(shortest, 3), longest, clients)
    return tuple(int(round(length)) for length in spread)


def measure_mixed(server: TritonServer, admin: Client, wire: Wire, ensembles: Sequence[tuple[Model, Model, str]],
                  tokenizer_model: str, tokenizer, lengths: tuple[int, ...], budget: LoadBudget) -> list[MixedPoint]:
    """Each ensemble (with its model step and that step's backend) with one client per length, buckets on, then
    off; the tokenizer model's published config is restored at the end."""
    texts = [text_of_length(tokenizer, length) for length in lengths]
    published = admin.config(tokenizer_model)
    points = []
    try:
        for buckets in (True, False):
            if not buckets:
                _reload_without_buckets(admin, tokenizer_model, published)
            for ensemble, step, backend in ensembles:
                names = (ensemble.name, step.name)
                start = statistics(admin, names)
                before: dict[str, dict[str, int]] = {}
                clients = itertools.count()
                lock = threading.Lock()

                @contextmanager
                def connect() -> Iterator[Callable[[bool], None]]:
                    with lock:
                        text = texts[next(clients) % len(texts)]
                    with connection(wire, server) as client:
                        yield _caller(client, ensemble, text)

                warmups = len(texts) * budget.warmup
                latencies, seconds = closed_loop(connect, len(texts), budget,
                                                 lambda: before.update(counted(admin, names, start, warmups)))
                after = counted(admin, names, before, len(latencies))
                executed = after[step.name]["executions"] - before[step.name]["executions"]
                inferred = after[step.name]["inferences"] - before[step.name]["inferences"]
                samples = Timing(tuple(latencies))
                latency = Latency(len(latencies), samples.median_ms, samples.percentile_ms(90),
                                  samples.percentile_ms(99), len(latencies) / seconds)
                points.append(MixedPoint(wire.name, ensemble.name, backend, buckets, len(texts), lengths, latency,
                                         inferred / executed if executed else None))
    finally:
        admin.load(tokenizer_model, published)
    return points


def text_ensembles(models: Sequence[Model]) -> list[tuple[Model, Model, str]]:
    """Every loaded ensemble with the model step that runs its graph, and that step's backend."""
    graphs = {model.name: model for model in models if model.role is Role.MODEL}
    found = []
    for model in models:
        if model.role is Role.ENSEMBLE:
            step = next((graphs[name] for name in model.steps if name in graphs), None)
            if step is not None:
                found.append((model, step, step.backend))
    return found


def _reload_without_buckets(admin: Client, tokenizer_model: str, published: dict) -> None:
    config = {**published, "parameters": {key: value for key, value in published.get("parameters", {}).items()
                                           if key != BUCKETS_PARAMETER}}
    admin.load(tokenizer_model, config)
    if BUCKETS_PARAMETER in admin.config(tokenizer_model).get("parameters", {}):
        raise PackagerError(f"{tokenizer_model} still pads to length buckets after its reload")


def _caller(client: Client, ensemble: Model, text: str) -> Callable[[bool], None]:
    """One request of one text; when checked, every output comes back with one row."""
    inputs = ensemble.text_request([text])
    tensors, outputs = client.request(inputs, ensemble.output_names)

    def call(check: bool) -> None:
        result = client.send(ensemble.name, tensors, outputs)
        if check and any(result.as_numpy(name).shape[0] != 1 for name in ensemble.output_names):
            raise PackagerError(f"{ensemble.name} answered a one-text request with another number of rows")

    return call
