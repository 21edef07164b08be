"""The models of a repository on disk (config, role, manifest and the gate it names), and loading the ones a server
can serve: a model whose backend the server lacks is reported as not loadable, never passed in silence."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from packager.errors import PackagerError, UsageError
from packager.iospec import IOSpec
from packager.recipe import Tolerances
from packager.record import MANIFEST_FILE, Manifest
from packager.repository import CONFIG_FILE, versions
from packager.triton.client import PROTOCOLS, Client, connection, in_threads
from packager.triton.rows import LOAD, CheckStatus, SmokeRow
from packager.triton.server import LoadResult, TritonServer, load_models, required_backend

LOAD_TIMEOUT_S = 300.0
PARALLEL_LOADS = 4
MISSING_BACKEND = re.compile(r"unable to find backend library for backend '([^']+)'")


class Role(Enum):
    ENSEMBLE = "ensemble"  # text in, the model's outputs out
    TOKENIZER = "tokenizer"  # text in, token tensors out
    MODEL = "model"  # token tensors in, outputs out
    ENTITIES = "entities"  # text out: entity spans ([serving] entities), its ensemble and its python step


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
        if any(t.data_type == model_config_pb2.TYPE_STRING for t in self.config.output):
            return Role.ENTITIES
        if self.config.platform == "ensemble":
            return Role.ENSEMBLE
        texts = [t for t in self.config.input if t.data_type == model_config_pb2.TYPE_STRING]
        return Role.TOKENIZER if texts else Role.MODEL

    @property
    def steps(self) -> list[str]:
        return [step.model_name for step in self.config.ensemble_scheduling.step]

    @property
    def text_inputs(self) -> list[model_config_pb2.ModelInput]:
        """The text inputs in config order: one, or a pair (text, text_pair / question, context)."""
        return [t for t in self.config.input if t.data_type == model_config_pb2.TYPE_STRING]

    def text_request(self, texts: Sequence[str | tuple[str, ...]]) -> dict[str, np.ndarray]:
        """The inputs of a request of `texts` (one text, or one pair, per batch row) to this model's text inputs."""
        rows = [(text,) if isinstance(text, str) else tuple(text) for text in texts]
        if any(len(row) != len(self.text_inputs) for row in rows):
            names = [t.name for t in self.text_inputs]
            raise UsageError(f"{self.name} takes {len(names)} text(s) per row ({', '.join(names)})")
        return {tensor.name: np.array([[row[index].encode()] for row in rows], dtype=object)
                for index, tensor in enumerate(self.text_inputs)}

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
            rows.append(SmokeRow(LOAD, "-", name, CheckStatus.FAIL, str(error)))
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


def _not_loadable(backend: str) -> str:
    return f"not loadable on this server: backend {backend} missing"


def _load(
    server: TritonServer, models: dict[str, Model], selected: list[str], backends: frozenset[str] | None
) -> list[SmokeRow]:
    """Load what the server can serve: ensembles first (their steps load in parallel), then the other models."""
    rows = {
        name: SmokeRow(LOAD, "-", name, CheckStatus.SKIP, _not_loadable(missing))
        for name in selected
        if (missing := _missing_backend(models[name], models, backends))
    }
    loadable = [name for name in selected if name not in rows]
    ensembles = [name for name in loadable if models[name].role is Role.ENSEMBLE]
    with connection(PROTOCOLS["http"], server) as client:
        already = {name for name in loadable if _ready(client, models[name])}
        for group in (ensembles, [name for name in loadable if name not in ensembles]):
            pending = [name for name in group if name not in already and not _ready(client, models[name])]
            for result in _load_in_parallel(server, pending):
                rows[result.name] = _load_row(result.name, result.error, f"loaded in {result.seconds:.1f} s")
    loaded = [name for name in ensembles if name in already or rows[name].status is CheckStatus.PASS]
    for name in loadable:  # the rest was loaded before, or as a step of an ensemble
        loaded_by = next((ensemble for ensemble in loaded if name in models[ensemble].steps), None)
        detail = f"loaded as a step of {loaded_by}" if name not in already and loaded_by else "already loaded"
        rows.setdefault(name, SmokeRow(LOAD, "-", name, CheckStatus.PASS, detail))
    return [rows[name] for name in selected]


def _load_in_parallel(server: TritonServer, names: list[str]) -> list[LoadResult]:
    """One load request per model, a few at a time (each waits for its model's instances to initialize)."""
    return in_threads(lambda name: load_models(server, [name], LOAD_TIMEOUT_S)[name], names, PARALLEL_LOADS)


def _load_row(name: str, error: str | None, detail: str) -> SmokeRow:
    if error is None:
        return SmokeRow(LOAD, "-", name, CheckStatus.PASS, detail)
    missing = MISSING_BACKEND.search(error)
    if missing:
        return SmokeRow(LOAD, "-", name, CheckStatus.SKIP, _not_loadable(missing.group(1)))
    return SmokeRow(LOAD, "-", name, CheckStatus.FAIL, " ".join(error.split()))


def _ready(client: Client, model: Model) -> bool:
    version = model.version
    try:
        return client.is_model_ready(model.name, "" if version is None else str(version))
    except InferenceServerException:
        return False
