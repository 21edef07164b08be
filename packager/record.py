"""The build record (build/<name>/build.json) and the manifest of a published version (manifest.json): typed, with
one schema version, and the only place their keys are spelled.

The build record is what `packager publish` and the bench need of a build folder; the manifest is what reproduces
and explains one published model version. Both are written and read through `to_data` / `from_data`, which follow
the dataclasses' fields and type hints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Literal

from packager.errors import PackagerError
from packager.iospec import IOSpec
from packager.recipe import Tolerances
from packager.validate import InvarianceReport, OutputSummary, ParityReport

SCHEMA_VERSION = 1
BUILD_FILE, MANIFEST_FILE = "build.json", "manifest.json"
RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "tritonclient")
LOCK_DIGEST_FILE = "lock.sha256"  # written into the venv by `make` from requirements.lock

Shape = tuple[int, ...]
EngineStatus = Literal["deployable", "build-check", "skipped"]


@dataclass(frozen=True)
class Gate:
    """A named gate of the recipe's table and its tolerances: what a published graph passed."""

    name: str
    tolerances: Tolerances


@dataclass(frozen=True)
class ProfileShapes:
    """One TensorRT optimization profile as the engine holds it: min/opt/max shape per dynamic input."""

    name: str
    index: int
    shapes: dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class EngineFacts:
    """What the manifest records about a TensorRT build (all of it reproducible: no timings, no paths)."""

    package: str
    version: str  # the package's full version (with its build number where the package reports one)
    deployable: bool
    gpu: str
    compute_capability: str  # of the GPU that built it: the only one a plan loads on unless built ampere+
    precision: str
    fp16_method: str | None
    graph: str  # the file TensorRT parsed
    workspace_mib: int
    profiles: tuple[ProfileShapes, ...]
    engine_bytes: int
    timing_cache: str  # what the timing cache does for this package
    triton_release: str
    triton_tensorrt: str  # the full TensorRT version of the release's -py3 images
    tensorrt_matches_triton: bool | None  # the release loads the plan (None: not a Triton plan)
    driver: str | None = None  # the NVIDIA driver of the building host (None: a build check)
    version_compatible: bool = False  # built with BuilderFlag.VERSION_COMPATIBLE
    hardware_compatibility_level: Literal["none", "ampere+"] = "none"  # ampere+: loads on compute capability >= 8.0


@dataclass(frozen=True)
class FailedPlan:
    """build/<name>.failed-plan/failure.json, beside the plan that failed its runtime gate: why, and how it was
    built."""

    error: str
    facts: EngineFacts | None


@dataclass(frozen=True)
class EngineStats:
    """How the build went (build.json only: it changes from run to run)."""

    build_seconds: float
    timing_cache_path: str | None
    timing_cache_loaded_bytes: int
    timing_cache_saved_bytes: int


@dataclass(frozen=True)
class Plan:
    """A deployable TensorRT plan in the build folder."""

    file: str
    max_batch_size: int
    profiles: tuple[ProfileShapes, ...]


@dataclass(frozen=True)
class EngineRecord:
    status: EngineStatus
    message: str
    facts: EngineFacts | None = None
    plan: Plan | None = None
    gate: Gate | None = None  # the gate a deployable plan passed


@dataclass(frozen=True)
class LevelRecord:
    level: str
    passed: bool
    shipped: bool
    reason: str  # why it failed; empty when passed
    gate: Gate
    fusions: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    file: str | None = None  # the graph, relative to the build folder (None when its build failed)
    parity: dict[str, OutputSummary] | None = None
    invariance: InvarianceReport | None = None


@dataclass(frozen=True)
class OptimizeRecord:
    device: str
    shipped: str
    why: str
    levels: tuple[LevelRecord, ...]

    def level(self, name: str) -> LevelRecord | None:
        return next((level for level in self.levels if level.level == name), None)

    @property
    def shipped_level(self) -> LevelRecord:
        return next(level for level in self.levels if level.shipped)


@dataclass(frozen=True)
class CpuRecord:
    """The x86 instruction-set class the graphs were gated on, and the classes their numbers hold for."""

    gated_on: str
    valid_for: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class BuildRecord:
    """build/<name>/build.json: everything `publish` and the bench need of a build folder."""

    recipe: str
    weights_sha256: str
    parity: tuple[ParityReport, ...]  # every graph's gate against PyTorch
    optimize: OptimizeRecord
    tensorrt: EngineRecord
    graphs: dict[str, str]  # file in the build folder -> SHA-256
    cpu: CpuRecord
    engine_stats: EngineStats | None = None  # how the engine build went: kept here, never in a manifest
    schema: int = SCHEMA_VERSION

    @property
    def shipped_gate(self) -> Gate:
        return self.optimize.shipped_level.gate

    def write(self, folder: Path) -> None:
        write_json(folder / BUILD_FILE, self)

    @classmethod
    def read(cls, folder: Path) -> "BuildRecord":
        return read_json(cls, folder / BUILD_FILE)


@dataclass(frozen=True)
class Release:
    """What every model of one release shares in its manifest."""

    recipe: dict  # the recipe as TOML-shaped data
    source: str
    weights_sha256: str
    iospec: IOSpec
    build: BuildRecord
    packages: dict[str, str | None]
    lock_sha256: str | None  # of the requirements.lock the environment was installed from
    created: str

    @classmethod
    def of(cls, recipe_data: dict, source: str, iospec: IOSpec, build: BuildRecord) -> "Release":
        """The shared facts of a release of `build`: the same inputs give the same facts, but for `created`."""
        reproducible = dataclasses.replace(build, engine_stats=None)
        return cls(recipe_data, source, build.weights_sha256, iospec, reproducible, package_versions(), lock_digest(),
                   now())


@dataclass(frozen=True)
class Manifest:
    """<model>/<version>/manifest.json: the facts that reproduce and explain one published model version."""

    model: str
    models: tuple[str, ...]  # every model of the release
    version: int
    gate: Gate | None  # the gate this model's graph or engine passed (None: the tokenizer)
    release: Release
    files: dict[str, str]  # file in the version folder -> SHA-256
    schema: int = SCHEMA_VERSION

    def write(self, folder: Path) -> None:
        write_json(folder / MANIFEST_FILE, self)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        return read_json(cls, folder / MANIFEST_FILE)


# ---- facts of this environment ------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def lock_digest() -> str | None:
    """The SHA-256 of the lock file this environment was installed from (None outside `make`'s venv)."""
    path = Path(sys.prefix) / LOCK_DIGEST_FILE
    return path.read_text().strip() if path.exists() else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the codec ------------------------------------------------------------------------------------------------------


def to_data(value):
    """A record as JSON-ready data: dataclasses as objects, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_data(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_data(item) for key, item in value.items()}
    return value


def from_data(kind, data, where: str = "record"):
    """`data` (from to_data) as type `kind`; PackagerError naming the place of anything that does not fit."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise PackagerError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(kind)
        values = {}
        for spec in dataclasses.fields(kind):
            if spec.name in data:
                values[spec.name] = from_data(hints[spec.name], data[spec.name], f"{where}.{spec.name}")
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise PackagerError(f"{where}: '{spec.name}' is missing")
        try:
            return kind(**values)
        except (TypeError, ValueError) as exc:
            raise PackagerError(f"{where}: {exc}") from None
    if origin in (types.UnionType, typing.Union):
        if data is None and type(None) in arguments:
            return None
        options = [a for a in arguments if a is not type(None)]
        for option in options[:-1]:  # int | str: the first that fits
            try:
                return from_data(option, data, where)
            except PackagerError:
                pass
        return from_data(options[-1], data, where)
    if origin is tuple:
        if not isinstance(data, list):
            raise PackagerError(f"{where}: expected a list, got {type(data).__name__}")
        items = arguments[:1] * len(data) if len(arguments) == 2 and arguments[1] is Ellipsis else arguments
        if len(items) != len(data):
            raise PackagerError(f"{where}: expected {len(items)} items, got {len(data)}")
        return tuple(from_data(item, value, f"{where}[{i}]") for i, (item, value) in enumerate(zip(items, data)))
    if origin is dict:
        if not isinstance(data, dict):
            raise PackagerError(f"{where}: expected an object, got {type(data).__name__}")
        return {key: from_data(arguments[1], value, f"{where}.{key}") for key, value in data.items()}
    if origin is Literal:
        if data not in arguments:
            raise PackagerError(f"{where}: {data!r} is not one of {arguments}")
        return data
    if kind is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if kind is dict and isinstance(data, dict):
        return data
    if kind in (int, str, bool) and type(data) is kind:
        return data
    raise PackagerError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {data!r}")


def write_json(path: Path, record) -> None:
    path.write_text(json.dumps(to_data(record), indent=2) + "\n")


def read_json(kind, path: Path):
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise PackagerError(f"{path} does not exist") from None
    return parse_json(kind, text, str(path))


def parse_json(kind, text: bytes, where: str):
    """A record of type `kind` from the JSON `text` (read from `where`), its schema version checked."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackagerError(f"{where} is not valid JSON: {exc}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA_VERSION:
        raise PackagerError(f"{where} has record schema {schema!r}; this packager reads schema {SCHEMA_VERSION}: "
                            "build or publish it again")
    return from_data(kind, data, where.rsplit("/", 1)[-1])
