"""Live smoke test: serve a model repository from a real Triton server and check every model it can load.

Over HTTP and over gRPC (tritonclient): server and model readiness; metadata and config against the IO spec;
real text through every ensemble and token tensors through every model, compared with PyTorch within the gate the
model's graph passed (its manifest names it); the tokenizer model against the Hugging Face tokenizer; concurrent
requests, which the dynamic batcher joins, against the same requests sent one by one (within the gate's
max_invariance) and against PyTorch; bad requests, which must get Triton's errors while the server stays healthy.
A model whose backend the server lacks is reported as not loadable, never passed in silence; a graph gated for
other CPU classes than this machine's fails.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import ModuleType

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from transformers import PreTrainedTokenizerBase
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from packager import source, validate
from packager.console import table
from packager.errors import GateFailed, PackagerError, UsageError
from packager.cpu import cpu_class
from packager.iospec import BATCH, IOSpec
from packager.recipe import Profile, Recipe, Tolerances
from packager.record import MANIFEST_FILE, Manifest
from packager.repository import CONFIG_FILE, versions
from packager.tasks import Task, get_task
from packager.triton import PROTOCOL_NAMES
from packager.triton.server import (
    LoadResult,
    TritonServer,
    available_backends,
    load_models,
    required_backend,
    serve,
)
from packager.validate import Inputs, ValidationBatch

Outputs = dict[str, np.ndarray]

CONCURRENT_REQUESTS = 8  # one text each, sent from this many threads at once
JOIN_ATTEMPTS = 3  # rounds of concurrent requests before "the batcher never joined them" is a failure
REQUEST_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 300.0
PARALLEL_LOADS = 4
DETAIL_WIDTH = 110  # characters of a row's detail in the summary table
MISSING_BACKEND = re.compile(r"unable to find backend library for backend '([^']+)'")
LONG_TEXT = max(validate.VALIDATION_TEXTS, key=len)
NON_ASCII_TEXTS = tuple(text for text in validate.VALIDATION_TEXTS if not text.isascii())
LOAD, END_TO_END, CPU_CLASS = "load", "text end to end", "cpu class"  # checks that are not per protocol


class Status(Enum):
    PASS = "pass"
    FAIL = "FAIL"
    SKIP = "skipped"


@dataclass(frozen=True)
class SmokeRow:
    """One check of one model over one protocol ("-" when the check is not per protocol)."""

    check: str
    protocol: str
    model: str
    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status is not Status.FAIL


@dataclass(frozen=True)
class SmokeResult:
    rows: tuple[SmokeRow, ...]
    log_tail: str = ""  # the end of the server log when a check failed (empty when it could not be read)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[SmokeRow]:
        return [row for row in self.rows if not row.passed]

    @property
    def served(self) -> list[str]:
        return [row.model for row in self.rows if row.check == LOAD and row.status is Status.PASS]

    @property
    def not_loadable(self) -> dict[str, str]:
        """Model -> why this server cannot load it ("not loadable on this server: backend X missing")."""
        return {row.model: row.detail for row in self.rows if row.check == LOAD and row.status is Status.SKIP}

    def summary(self) -> str:
        """The models table, the checks table, and the full text of every failure."""
        models = [[row.model, _served_as(row.status), _shorten(row.detail)] for row in self.rows if row.check == LOAD]
        checks = [[row.check, row.protocol, row.model, row.status.value, _shorten(row.detail)] for row in self.rows]
        parts = [
            table(["model", "status", "detail"], models, title="Models in the repository"),
            table(["check", "protocol", "model", "result", "detail"], checks, title="Live smoke checks"),
        ]
        if self.failures:
            parts.append("\n".join(f"FAIL {r.check} [{r.protocol}] {r.model}: {r.detail}" for r in self.failures))
        if self.log_tail and self.failures:
            parts.append(f"last lines of the server log:\n{self.log_tail}")
        return "\n\n".join(parts)


@dataclass
class Reference:
    """What served answers are compared with: PyTorch on the same tokens, and the tokenizer that made them.

    Texts are tokenized as the served tokenizer does: truncated at the profile's max sequence, padded to the
    longest text of the request, at least to the profile's min sequence.
    """

    task: Task
    spec: IOSpec
    tokenizer: PreTrainedTokenizerBase
    runner: validate.Runner
    profile: Profile
    _answers: dict[tuple[str, ...], Outputs] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, recipe: Recipe, spec: IOSpec, loaded: source.LoadedModel) -> "Reference":
        """The task wrapper of the loaded model run by PyTorch."""
        task = get_task(recipe.task)
        runner = validate.torch_runner(task.wrapper(loaded.model, spec.input_names).eval(), spec)
        return cls(task, spec, loaded.tokenizer, runner, recipe.profile)

    def tokenize(self, texts: Sequence[str]) -> ValidationBatch:
        sequence = self.profile.sequence
        lengths = self.tokenizer(list(texts), truncation=True, max_length=sequence.max)["input_ids"]
        length = max([sequence.min, *map(len, lengths)])
        return ValidationBatch.of(texts, validate.tokenize(self.tokenizer, self.spec, list(texts), length))

    def answer(self, texts: Sequence[str]) -> Outputs:
        key = tuple(texts)
        if key not in self._answers:
            self._answers[key] = self.runner(self.tokenize(texts).inputs)
        return self._answers[key]

    def compare(self, batch: ValidationBatch, expected: Outputs, served: Outputs, tolerances: Tolerances) -> tuple[bool, str]:
        """Every output within tolerance (validate.compare_output); the detail names the worst difference."""
        rows = [
            validate.compare_output("served", self.task, self.spec, name, batch, expected[name], served[name], tolerances)
            for name in self.spec.output_names
            if name in served
        ]
        failed = [f"{row.output}: {row.reason}" for row in rows if not row.passed]
        if failed:
            return False, "; ".join(failed)
        metric = next((f", {row.metric} {row.metric_value:.6f}" for row in rows if row.metric), "")
        return True, f"max |Δ| {max(row.max_abs for row in rows):.2g}{metric}"

    def invariant(self, batch: ValidationBatch, alone: Outputs, together: Outputs, tolerance: float) -> tuple[bool, str]:
        """A request's answer sent alone against the same request joined with others: equal within `tolerance`."""
        differences = {name: validate.batch_difference(self.spec, name, batch, alone[name], together[name], 0)
                       for name in self.spec.output_names if name in alone}
        name, worst = max(differences.items(), key=lambda item: item[1])
        if not worst <= tolerance:
            return False, f"{name}: alone vs joined max |Δ| {worst:.3g} > {tolerance:g}"
        return True, f"alone vs joined max |Δ| {worst:.2g}"


# ---- the repository on disk ----------------------------------------------------------------------------------


class Role(Enum):
    ENSEMBLE = "ensemble"  # text in, the model's outputs out
    TOKENIZER = "tokenizer"  # text in, token tensors out
    MODEL = "model"  # token tensors in, outputs out


@dataclass(frozen=True)
class Model:
    """A model folder of the repository and its config as written on disk."""

    name: str
    folder: Path
    config: model_config_pb2.ModelConfig
    backend: str | None  # None for an ensemble
    manifest: Manifest | None = None  # of the version Triton serves (None when it has none)

    @property
    def gate(self) -> Tolerances | None:
        """The gate its served graph passed, from its manifest."""
        gate = self.manifest.gate if self.manifest else None
        return gate.tolerances if gate else None

    @property
    def role(self) -> Role:
        if self.config.platform == "ensemble":
            return Role.ENSEMBLE
        texts = [t for t in self.config.input if t.data_type == model_config_pb2.TYPE_STRING]
        return Role.TOKENIZER if texts else Role.MODEL

    @property
    def steps(self) -> list[str]:
        return [step.model_name for step in self.config.ensemble_scheduling.step]

    @property
    def text_input(self) -> model_config_pb2.ModelInput:
        return next(t for t in self.config.input if t.data_type == model_config_pb2.TYPE_STRING)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.config.output]

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def ragged(self) -> bool:
        return any(t.allow_ragged_batch for t in self.config.input)

    @property
    def batches_dynamically(self) -> bool:
        return self.config.HasField("dynamic_batching")

    @property
    def version(self) -> int | None:
        """The version Triton will serve: the highest the config pins, else the highest folder."""
        pinned = list(self.config.version_policy.specific.versions)
        return max(pinned) if pinned else max(versions(self.folder), default=None)


def discover(repository: Path, names: Iterable[str] | None = None) -> tuple[dict[str, Model], list[SmokeRow]]:
    """Every model folder (or the ones named), plus the steps of their ensembles, with its parsed config.

    A selected model whose config cannot be read is a FAIL row naming the file and the parser's complaint.
    """
    folders = sorted(path.parent for path in repository.glob(f"*/{CONFIG_FILE}"))
    wanted = list(names) if names is not None else [folder.name for folder in folders]
    models, rows = {}, []
    for name in wanted:
        try:
            models[name] = _read_model(repository / name)
        except PackagerError as error:
            rows.append(SmokeRow(LOAD, "-", name, Status.FAIL, str(error)))
    for name, model in list(models.items()):  # steps outside the selection still decide what can load
        for step in model.steps:
            if step not in models:
                with suppress(PackagerError):  # Triton names an unreadable step when the ensemble fails to load
                    models[step] = _read_model(repository / step)
    return models, rows


def published_models(repository: Path | str, recipe_name: str) -> tuple[list[str], IOSpec]:
    """The models a recipe published to the repository (from their newest manifests), and its IO spec."""
    names, spec = [], None
    for folder in sorted(Path(repository).glob(f"*/{CONFIG_FILE}")):
        newest = max(versions(folder.parent), default=None)
        if newest is None or not (folder.parent / str(newest) / MANIFEST_FILE).exists():
            continue
        manifest = Manifest.read(folder.parent / str(newest))
        if manifest.release.build.recipe == recipe_name:
            names.append(folder.parent.name)
            spec = manifest.release.iospec
    if spec is None:
        raise UsageError(f"no model of recipe '{recipe_name}' in {repository}: package it first")
    return names, spec


def _read_model(folder: Path) -> Model:
    path = folder / CONFIG_FILE
    if not path.exists():
        raise PackagerError(f"{folder} has no {CONFIG_FILE}")
    try:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise PackagerError(f"{path}: not a valid model config: {error}") from None
    model = Model(folder.name, folder, config, required_backend(path))
    version = model.version
    if version is not None and (folder / str(version) / MANIFEST_FILE).exists():
        model = dataclasses.replace(model, manifest=Manifest.read(folder / str(version)))
    return model


def _missing_backend(model: Model, models: dict[str, Model], backends: frozenset[str] | None) -> str | None:
    """The first backend that the model, or a step of an ensemble, needs and the server lacks."""
    if backends is None:
        return None
    if model.backend is not None and model.backend not in backends:
        return model.backend
    steps = (models[step] for step in model.steps if step in models)
    return next((missing for step in steps if (missing := _missing_backend(step, models, backends))), None)


# ---- loading -------------------------------------------------------------------------------------------------


def _not_loadable(backend: str) -> str:
    return f"not loadable on this server: backend {backend} missing"


def _load(
    server: TritonServer, models: dict[str, Model], selected: list[str], backends: frozenset[str] | None
) -> list[SmokeRow]:
    """Load what the server can serve: ensembles first (their steps load in parallel), then the other models."""
    rows = {
        name: SmokeRow(LOAD, "-", name, Status.SKIP, _not_loadable(missing))
        for name in selected
        if (missing := _missing_backend(models[name], models, backends))
    }
    loadable = [name for name in selected if name not in rows]
    ensembles = [name for name in loadable if models[name].role is Role.ENSEMBLE]
    with _connection(PROTOCOLS["http"], server) as client:
        already = {name for name in loadable if _ready(client, models[name])}
        for group in (ensembles, [name for name in loadable if name not in ensembles]):
            pending = [name for name in group if name not in already and not _ready(client, models[name])]
            for result in _load_in_parallel(server, pending):
                rows[result.name] = _load_row(result.name, result.error, f"loaded in {result.seconds:.1f} s")
    loaded = [name for name in ensembles if name in already or rows[name].status is Status.PASS]
    for name in loadable:  # the rest was loaded before, or as a step of an ensemble
        loaded_by = next((ensemble for ensemble in loaded if name in models[ensemble].steps), None)
        detail = f"loaded as a step of {loaded_by}" if name not in already and loaded_by else "already loaded"
        rows.setdefault(name, SmokeRow(LOAD, "-", name, Status.PASS, detail))
    return [rows[name] for name in selected]


def _load_in_parallel(server: TritonServer, names: list[str]) -> list[LoadResult]:
    """One load request per model, a few at a time (each waits for its model's instances to initialize)."""
    return _in_threads(lambda name: load_models(server, [name], LOAD_TIMEOUT_S)[name], names, PARALLEL_LOADS)


def _load_row(name: str, error: str | None, detail: str) -> SmokeRow:
    if error is None:
        return SmokeRow(LOAD, "-", name, Status.PASS, detail)
    missing = MISSING_BACKEND.search(error)
    if missing:
        return SmokeRow(LOAD, "-", name, Status.SKIP, _not_loadable(missing.group(1)))
    return SmokeRow(LOAD, "-", name, Status.FAIL, " ".join(error.split()))


def _ready(client: "Client", model: Model) -> bool:
    version = model.version
    try:
        return client.is_model_ready(model.name, "" if version is None else str(version))
    except InferenceServerException:
        return False


# ---- clients ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How tritonclient speaks one protocol: its module, the server's address for it, and how to connect."""

    name: str
    module: ModuleType
    address: Callable[[TritonServer], str | None]
    as_json: dict  # keyword arguments that make metadata/config/statistics calls return dicts
    connect: Callable[[str], object]


class Client:
    """A tritonclient client with the calls the checks need, protocol differences hidden."""

    def __init__(self, protocol: Protocol, url: str):
        self.protocol, self.url = protocol, url
        self.raw = protocol.connect(url)

    def close(self) -> None:
        self.raw.close()

    def is_server_ready(self) -> bool:
        return self.raw.is_server_live() and self.raw.is_server_ready()

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return self.raw.is_model_ready(name, version)

    def metadata(self, name: str) -> dict:
        return self.raw.get_model_metadata(name, **self.protocol.as_json)

    def config(self, name: str) -> dict:
        config = self.raw.get_model_config(name, **self.protocol.as_json)
        return config.get("config", config)  # gRPC wraps it

    def batch_counts(self, name: str) -> dict[int, int]:
        """Executions so far by batch size (the dynamic batcher's joins show as sizes above 1)."""
        counts: dict[int, int] = {}
        for version in self.raw.get_inference_statistics(name, **self.protocol.as_json)["model_stats"]:
            for entry in version.get("batch_stats", []):
                size = int(entry["batch_size"])
                counts[size] = counts.get(size, 0) + int(entry["compute_infer"].get("count", 0))
        return counts

    def request(self, inputs: Inputs, outputs: list[str]) -> tuple[list, list]:
        """tritonclient inputs (data type from the array's dtype, so a wrong one can be sent) and outputs."""
        tensors = []
        for name, array in inputs.items():
            tensor = self.protocol.module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors, [self.protocol.module.InferRequestedOutput(name) for name in outputs]

    def infer(self, model: str, inputs: Inputs, outputs: list[str]) -> Outputs:
        tensors, requested = self.request(inputs, outputs)
        result = self.raw.infer(model, tensors, outputs=requested)
        return {name: result.as_numpy(name) for name in outputs}


def _infer_at_once(client: Client, model: str, requests: list[Inputs], outputs: list[str]) -> list[Outputs]:
    """Each request from its own thread and client (the HTTP client is not thread safe), released together."""
    start = threading.Barrier(len(requests))

    def send(inputs: Inputs) -> Outputs:
        with closing(Client(client.protocol, client.url)) as own:
            start.wait(REQUEST_TIMEOUT_S)
            return own.infer(model, inputs, outputs)

    return _in_threads(send, requests, len(requests))


PROTOCOLS: dict[str, Protocol] = {
    "http": Protocol(
        "http", httpclient, lambda server: server.http_url, {},
        lambda url: httpclient.InferenceServerClient(url, network_timeout=REQUEST_TIMEOUT_S),
    ),
    "grpc": Protocol(
        "grpc", grpcclient, lambda server: server.grpc_url, {"as_json": True},
        lambda url: grpcclient.InferenceServerClient(url),
    ),
}  # fmt: skip
assert tuple(PROTOCOLS) == PROTOCOL_NAMES


@contextmanager
def _connection(protocol: Protocol, server: TritonServer) -> Iterator[Client]:
    """A client, closed on exit: an open keep-alive connection delays the server's shutdown."""
    with closing(Client(protocol, protocol.address(server))) as client:
        yield client


# ---- the smoke run -------------------------------------------------------------------------------------------


def smoke(
    repository: Path | str,
    reference: Reference,
    launcher: str = "local",
    *,
    models: Iterable[str] | None = None,
    protocols: Sequence[str] = tuple(PROTOCOLS),
    **server_options,
) -> SmokeResult:
    """Serve `repository` with `launcher`, load every selected model it can, and check it over each protocol.

    `models` selects model folders (default: all); `server_options` go to `serve()` (launcher options such as
    `url`, `grpc_url`, `image`, `log_path`, and `ready_timeout_s`). The server is stopped before this returns.
    """
    unknown = [name for name in protocols if name not in PROTOCOLS]
    if unknown:
        raise UsageError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    with serve(launcher, Path(repository), **server_options) as server:
        found, rows = load_servable(server, repository, models, available_backends(launcher))
        served = [found[row.model] for row in rows if row.check == LOAD and row.status is Status.PASS]
        rows.append(_end_to_end_row(served))
        if launcher != "url":  # a local or docker server computes on this machine
            rows += _cpu_rows(served)
        for name in protocols:
            rows += _check_protocol(PROTOCOLS[name], server, served, reference)
        failed = any(not row.passed for row in rows)
        log_tail = server.log_tail() if failed else ""
    return SmokeResult(tuple(rows), log_tail)


def load_servable(
    server: TritonServer,
    repository: Path | str,
    models: Iterable[str] | None = None,
    backends: frozenset[str] | None = None,
) -> tuple[dict[str, Model], list[SmokeRow]]:
    """Load every selected model (default: all) unless the server lacks its backend (`backends`, None: unknown).

    Returns the models read from the repository and one "load" row per selected model: pass (served), skipped
    (not loadable on this server: backend X missing) or FAIL (with Triton's error, or why the config is unreadable).
    """
    names = list(models) if models is not None else None
    found, rows = discover(Path(repository), names)
    selected = [name for name in (names if names is not None else found) if name in found]
    return found, rows + _load(server, found, selected, backends)


def require(result: SmokeResult) -> SmokeResult:
    """The gate: return the result when every check passed, else raise naming the first failure."""
    if result.passed:
        return result
    first = result.failures[0]
    raise GateFailed(
        f"live Triton smoke failed {len(result.failures)} check(s); first: {first.check} [{first.protocol}] "
        f"{first.model}: {_shorten(first.detail, 300)}"
    )


def _end_to_end_row(served: list[Model]) -> SmokeRow:
    ensembles = [model.name for model in served if model.role is Role.ENSEMBLE]
    if ensembles:
        return SmokeRow(END_TO_END, "-", ", ".join(ensembles), Status.PASS, "served ensemble(s)")
    return SmokeRow(END_TO_END, "-", "-", Status.FAIL, "no ensemble could be served: nothing takes text end to end")


def _cpu_rows(served: list[Model]) -> list[SmokeRow]:
    """Every served graph was gated for this machine's CPU class (int8 numbers can differ per class)."""
    here, rows = cpu_class(), []
    for model in served:
        if model.manifest is None or model.gate is None:
            continue
        cpu = model.manifest.release.build.cpu
        passed = here in cpu.valid_for
        detail = (f"this machine is {here}; the graph holds its gate on {', '.join(cpu.valid_for)} "
                  f"(gated on {cpu.gated_on})")
        rows.append(SmokeRow(CPU_CLASS, "-", model.name, Status.PASS if passed else Status.FAIL, detail))
    return rows


def _check_protocol(
    protocol: Protocol, server: TritonServer, served: list[Model], reference: Reference
) -> list[SmokeRow]:
    if protocol.address(server) is None:
        return [SmokeRow("server ready", protocol.name, "-", Status.SKIP, f"no {protocol.name} address given")]
    takes_requests = [model for model in served if model.role is not Role.TOKENIZER]
    with _connection(protocol, server) as client:
        run = _Checks(client, reference, served)
        return [
            run.attempt("server ready", "-", run.server_ready),
            *(row for model in served for row in run.describe(model)),
            *(row for model in served for row in run.answers(model)),
            *(run.attempt("concurrent = one by one", m.name, run.concurrent, m) for m in takes_requests),
            *(row for model in takes_requests for row in run.bad_requests(model)),
            run.unknown_model(takes_requests),
            *(run.attempt("healthy after bad requests", m.name, run.healthy, m) for m in takes_requests),
        ]


def _gate(model: Model) -> Tolerances:
    """The gate a model's answers are checked with: the one its manifest names."""
    if model.gate is None:
        raise PackagerError(f"{model.name} has no manifest naming the gate its graph passed: publish it with packager")
    return model.gate


def _text_cases(max_batch_size: int) -> dict[str, tuple[str, ...]]:
    """Batch 1, a full batch of mixed lengths, truncation, non-ASCII: the requests every served model answers."""
    texts, max_batch = validate.VALIDATION_TEXTS, max(max_batch_size, 1)
    return {
        "batch 1": texts[:1],
        f"batch {max_batch}, mixed lengths": tuple(texts[i % len(texts)] for i in range(max_batch)),
        "longer than max sequence": (LONG_TEXT,),
        "non-ASCII": NON_ASCII_TEXTS[:max_batch],
    }


def _text_inputs(model: Model, texts: Sequence[str]) -> Inputs:
    return {model.text_input.name: np.array([[text.encode()] for text in texts], dtype=object)}


Check = Callable[..., tuple[bool, str]]


class _Checks:
    """The checks over one client; each returns (passed, detail)."""

    def __init__(self, client: Client, reference: Reference, served: list[Model]):
        self.client, self.reference, self.served = client, reference, served

    def attempt(self, check: str, model: str, function: Check, *args) -> SmokeRow:
        """Run one check; an error from Triton or the connection fails the check, not the run."""
        try:
            passed, detail = function(*args)
        except (InferenceServerException, OSError, threading.BrokenBarrierError, PackagerError) as error:
            passed, detail = False, _error_text(error)
        return SmokeRow(check, self.client.protocol.name, model, Status.PASS if passed else Status.FAIL, detail)

    # -- readiness and description

    def server_ready(self) -> tuple[bool, str]:
        return self.client.is_server_ready(), "live and ready"

    def describe(self, model: Model) -> list[SmokeRow]:
        return [
            self.attempt("model ready", model.name, self.model_ready, model),
            self.attempt("metadata = IO spec", model.name, self.metadata, model),
            self.attempt("config = IO spec", model.name, self.config, model),
        ]

    def model_ready(self, model: Model) -> tuple[bool, str]:
        return self.client.is_model_ready(model.name), f"version {model.version}"

    def metadata(self, model: Model) -> tuple[bool, str]:
        """The served metadata: wire data types, the batch dim as -1 in front."""
        served = self.client.metadata(model.name)
        found = {
            kind: {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in served.get(kind, [])}
            for kind in ("inputs", "outputs")
        }
        expected = {
            kind: {name: (_wire_type(dtype), [-1, *dims]) for name, (dtype, dims) in tensors.items()}
            for kind, tensors in self._expected(model).items()
        }
        return _same(expected, found)

    def config(self, model: Model) -> tuple[bool, str]:
        """The config the server runs: config data types, dims without the batch, max_batch_size = profile max."""
        served = self.client.config(model.name)
        found = {
            kind: {t["name"]: (t["data_type"], [int(d) for d in t.get("dims", [])]) for t in served.get(key, [])}
            for kind, key in (("inputs", "input"), ("outputs", "output"))
        }
        passed, detail = _same(self._expected(model), found)
        max_batch, profile_max = int(served.get("max_batch_size", 0)), self.reference.profile.batch.max
        if max_batch != profile_max:
            mismatch = f"max_batch_size {max_batch}, the profile's max batch is {profile_max}"
            return False, mismatch if passed else f"{mismatch}; {detail}"
        return passed, f"{detail}; max_batch_size {max_batch}" if passed else detail

    def _expected(self, model: Model) -> dict[str, dict[str, tuple[str, list[int]]]]:
        """Name -> (config data type, dims without batch) of the inputs and outputs the IO spec gives this role."""
        spec = {t.name: (t.triton_type, t.triton_dims(BATCH)) for t in self.reference.spec.inputs}
        outputs = {t.name: (t.triton_type, t.triton_dims(BATCH)) for t in self.reference.spec.outputs}
        if model.role is Role.MODEL:
            return {"inputs": spec, "outputs": outputs}
        text = {model.text_input.name: ("TYPE_STRING", list(model.text_input.dims))}
        return {"inputs": text, "outputs": spec if model.role is Role.TOKENIZER else outputs}

    # -- answers

    def answers(self, model: Model) -> list[SmokeRow]:
        cases = _text_cases(model.max_batch_size)
        if model.role is Role.TOKENIZER:
            return [self.attempt("tokens = HF tokenizer", model.name, self.tokens, model, cases)]
        label = "text → PyTorch" if model.role is Role.ENSEMBLE else "tokens → PyTorch"
        return [
            self.attempt(f"{label}: {case}", model.name, self.answer, model, texts) for case, texts in cases.items()
        ]

    def answer(self, model: Model, texts: Sequence[str]) -> tuple[bool, str]:
        batch = self.reference.tokenize(texts)
        served = self.client.infer(model.name, self._inputs(model, batch), model.output_names)
        return self.reference.compare(batch, self.reference.answer(texts), served, _gate(model))

    def tokens(self, model: Model, cases: dict[str, tuple[str, ...]]) -> tuple[bool, str]:
        for case, texts in cases.items():
            expected = self.reference.tokenize(texts).inputs
            served = self.client.infer(model.name, _text_inputs(model, texts), model.output_names)
            for name, values in served.items():
                if values.shape != expected[name].shape or not np.array_equal(values, expected[name]):
                    return False, f"{case}: '{name}' {values.shape} differs from the tokenizer's {expected[name].shape}"
        return True, f"{len(cases)} requests, same token tensors"

    def _inputs(self, model: Model, batch: ValidationBatch) -> Inputs:
        return _text_inputs(model, batch.texts) if model.role is Role.ENSEMBLE else batch.inputs

    # -- concurrency

    def concurrent(self, model: Model) -> tuple[bool, str]:
        """Single-text requests sent at once give the answers they give one by one; the batcher joins them."""
        texts = [validate.VALIDATION_TEXTS[i % len(validate.VALIDATION_TEXTS)] for i in range(CONCURRENT_REQUESTS)]
        batches = self._single_batches(model, texts)
        requests = [self._inputs(model, batch) for batch in batches]
        alone = [self.client.infer(model.name, request, model.output_names) for request in requests]
        joined_model = self._batching_model(model)
        for _ in range(JOIN_ATTEMPTS if joined_model else 1):
            before = self.client.batch_counts(joined_model.name) if joined_model else {}
            together = _infer_at_once(self.client, model.name, requests, model.output_names)
            for batch, one, many in zip(batches, alone, together):
                passed, detail = self.reference.invariant(batch, one, many, _gate(model).max_invariance)
                if passed:
                    passed, detail = self.reference.compare(batch, self.reference.answer(batch.texts), many,
                                                            _gate(model))
                if not passed:
                    return False, f"{batch.texts[0][:40]!r}: {detail}"
            if joined_model is None:
                return True, f"{len(requests)} requests, same answers (no dynamic batcher here can join them)"
            after = self.client.batch_counts(joined_model.name)
            largest = max((size for size, count in after.items() if count > before.get(size, 0)), default=0)
            if largest > 1:
                return True, f"{len(requests)} requests, same answers; {joined_model.name} joined up to {largest}"
        return False, f"same answers, but {joined_model.name} never joined requests in {JOIN_ATTEMPTS} rounds"

    def _single_batches(self, model: Model, texts: list[str]) -> list[ValidationBatch]:
        """One batch per text: at its own length when the model takes ragged batches, else all at one length."""
        if model.role is Role.ENSEMBLE or model.ragged:
            return [self.reference.tokenize([text]) for text in texts]
        joint = self.reference.tokenize(texts)
        rows = [{name: values[i : i + 1] for name, values in joint.inputs.items()} for i in range(len(texts))]
        return [
            ValidationBatch(1, joint.sequence, (text,), inputs, joint.mask[i : i + 1])
            for i, (text, inputs) in enumerate(zip(texts, rows))
        ]

    def _batching_model(self, model: Model) -> Model | None:
        """The model whose dynamic batcher can join these requests, if any: the model itself, or an ensemble's
        step that takes ragged batches (without, the tokenizer's different lengths cannot be joined)."""
        if model.role is Role.MODEL:
            return model if model.batches_dynamically else None
        by_name = {m.name: m for m in self.served}
        steps = [by_name[step] for step in model.steps if step in by_name]
        return next((m for m in steps if m.batches_dynamically and m.ragged), None)

    # -- bad requests and health

    def bad_requests(self, model: Model) -> list[SmokeRow]:
        """Each bad request made from a valid one; Triton must refuse it with its error for that mistake."""
        valid = self._inputs(model, self.reference.tokenize(validate.VALIDATION_TEXTS[:1]))
        rows = []
        for check, bad in BAD_REQUESTS.items():
            inputs, pattern = bad.make(model, valid), bad.pattern(model, valid)
            rows.append(self.attempt(f"bad request: {check}", model.name, self.refused, model, inputs, pattern))
        return rows

    def unknown_model(self, models: list[Model]) -> SmokeRow:
        """A valid request for a model that does not exist."""
        check = "bad request: unknown model"
        if not models:
            return SmokeRow(check, self.client.protocol.name, "-", Status.SKIP, "no model served")
        unknown = dataclasses.replace(models[0], name=f"{models[0].name}_no_such_model")
        valid = self._inputs(models[0], self.reference.tokenize(validate.VALIDATION_TEXTS[:1]))
        return self.attempt(check, unknown.name, self.refused, unknown, valid, "unknown model")

    def refused(self, model: Model, inputs: Inputs, expected: str) -> tuple[bool, str]:
        try:
            self.client.infer(model.name, inputs, model.output_names)
        except InferenceServerException as error:
            message = _error_text(error)
            return re.search(expected, message) is not None, message
        return False, "Triton accepted the request"

    def healthy(self, model: Model) -> tuple[bool, str]:
        if not (self.client.is_server_ready() and self.client.is_model_ready(model.name)):
            return False, "server or model not ready after the bad requests"
        passed, detail = self.answer(model, validate.VALIDATION_TEXTS[:1])
        return passed, f"ready; answers as before ({detail})" if passed else detail


@dataclass(frozen=True)
class BadRequest:
    make: Callable[[Model, Inputs], Inputs]  # the bad inputs, from valid ones
    error: str  # the pattern Triton's error must match

    def pattern(self, model: Model, valid: Inputs) -> str:
        first = re.escape(next(iter(valid)))
        return self.error.format(model=re.escape(model.name), input=first, max_batch_size=model.max_batch_size)


def _wrong_datatype(model: Model, valid: Inputs) -> Inputs:
    name, array = next(iter(valid.items()))
    return {**valid, name: np.zeros(array.shape, np.float32 if array.dtype == np.float64 else np.float64)}


def _wrong_rank(model: Model, valid: Inputs) -> Inputs:
    name, array = next(iter(valid.items()))
    return {**valid, name: array[..., None]}


def _missing_input(model: Model, valid: Inputs) -> Inputs:
    return dict(list(valid.items())[:-1])


def _batch_too_big(model: Model, valid: Inputs) -> Inputs:
    return {name: np.repeat(array[:1], model.max_batch_size + 1, axis=0) for name, array in valid.items()}


# Triton's error patterns: {model} and {input} (the first input) are filled in, escaped.
BAD_REQUESTS: dict[str, BadRequest] = {
    "wrong datatype": BadRequest(_wrong_datatype, r"input '{input}' data-type is '\w+', but model '{model}' expects"),
    "wrong rank": BadRequest(_wrong_rank, r"unexpected shape for input '{input}' for model '{model}'"),
    "missing input": BadRequest(_missing_input, r"expected \d+ inputs but got \d+ inputs for model '{model}'"),
    "batch above max_batch_size": BadRequest(_batch_too_big, r"batch-size must be <= {max_batch_size} for '{model}'"),
}


# ---- small helpers ---------------------------------------------------------------------------------------------


def _in_threads(function: Callable, items: list, workers: int) -> list:
    """`function` over `items` from up to `workers` threads, results in order. On an error or Ctrl-C nothing
    waits for the other threads: stopping the server ends their requests."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _same(expected: dict, found: dict) -> tuple[bool, str]:
    """Compare name -> (data type, dims) tables of inputs and outputs; the detail names every difference."""
    differences = []
    for kind in ("inputs", "outputs"):
        want, got = expected[kind], found.get(kind, {})
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                served, wanted = _describe(got.get(name)), _describe(want.get(name))
                differences.append(f"{kind[:-1]} '{name}': served {served}, expected {wanted}")
    if differences:
        return False, "; ".join(differences)
    return True, ", ".join(f"{len(expected[kind])} {kind}" for kind in ("inputs", "outputs")) + " as the IO spec says"


def _describe(tensor: tuple[str, list[int]] | None) -> str:
    return "nothing" if tensor is None else f"{tensor[0]} {tensor[1]}"


def _wire_type(config_type: str) -> str:
    """A config data type (TYPE_INT64) as metadata names it (INT64; TYPE_STRING is BYTES)."""
    return "BYTES" if config_type == "TYPE_STRING" else config_type.removeprefix("TYPE_")


def _error_text(error: Exception) -> str:
    message = error.message() if isinstance(error, InferenceServerException) else str(error)
    return " ".join((message or type(error).__name__).replace("[request id: <id_unknown>] ", "").split())


def _served_as(status: Status) -> str:
    return {Status.PASS: "served", Status.SKIP: "not loadable", Status.FAIL: "FAILED to load"}[status]


def _shorten(text: str, width: int = DETAIL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
