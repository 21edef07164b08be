"""The engine build: parse the ONNX graph, check its IO against the IO spec, one optimization profile per recipe
profile, the precision's build mode, the timing cache; then the plan (deployable) or the build check (TensorRT-RTX)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from packager.console import say
from packager.errors import PackagerError
from packager.iospec import IOSpec, TensorSpec
from packager.recipe import Recipe, TensorRT
from packager.record import EngineFacts, EngineStats, EngineStatus, ProfileShapes
from packager.tensorrt import runtime
from packager.tensorrt.log import EngineBuildError, build_failure, make_logger
from packager.tensorrt.preflight import Preflight, preflight
from packager.tensorrt.settings import (
    BACKENDS, HARDWARE_LEVELS, Backend, BuildMode, LoadedBackend, ShapeRange, build_mode, engine_dims,
    profile_shapes,
)

ENGINE_FILE = "model.plan"

# TensorRT DataType name -> ONNX element type name (the IO spec's dtype names)
TRT_DTYPES = {"FLOAT": "FLOAT", "HALF": "FLOAT16", "BF16": "BFLOAT16", "INT64": "INT64", "INT32": "INT32",
              "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL"}


@dataclass(frozen=True)
class EngineResult:
    status: EngineStatus
    message: str
    engine_path: Path | None = None  # only for a deployable plan
    network: IOSpec | None = None  # the parsed network's IO
    profiles: tuple[ProfileShapes, ...] = ()
    facts: EngineFacts | None = None
    stats: EngineStats | None = None

    def rows(self) -> list[list[str]]:
        """Table rows: profile, input, min, opt, max."""
        def text(shape):
            return "x".join(map(str, shape))

        return [[f"{p.index} {p.name}", name, *map(text, r)] for p in self.profiles for name, r in p.shapes.items()]


def build_engine(
    onnx_path: Path,
    spec: IOSpec,
    recipe: Recipe,
    work_dir: Path,
    *,
    cache_dir: Path | None = None,
    backend: str = "auto",
    backends: Mapping[str, Backend] = BACKENDS,
    fp16_graph: Callable[[], Path] | None = None,
    checked: Preflight | None = None,
) -> EngineResult:
    """Build the engine of `onnx_path` with the recipe's [tensorrt] profiles, precision and compatibility.

    Returns a skipped result when no TensorRT package is there, a build-check result with TensorRT-RTX (nothing
    written), or a deployable plan at work_dir/model.plan, deserialized and checked against the profiles.
    `checked` is the preflight of `backend` (made here when not given); `cache_dir` holds the timing cache (one file
    per package and version); `fp16_graph` makes the fp16 graph an fp16 engine of the 'graph' method is built from
    (the caller's fp16 conversion of `onnx_path`).
    """
    settings = recipe.tensorrt
    shapes = [profile_shapes(spec, profile) for profile in recipe.engine_profiles]
    checked = checked or preflight(settings, backend, backends=backends)
    loaded = checked.loaded
    if loaded is None:
        return EngineResult("skipped", f"TensorRT step skipped: {checked.reason}")
    mode = build_mode(settings, loaded.backend)
    graph = onnx_path
    if mode.fp16_graph:
        if fp16_graph is None:
            raise PackagerError("an fp16 engine of the 'graph' method needs its fp16 graph (fp16_graph)")
        graph = fp16_graph()
    cache = TimingCache.of(cache_dir, loaded) if cache_dir else None
    built = _build(loaded, graph, spec, recipe, mode, shapes, cache)
    facts = _facts(loaded, settings, graph, built, checked)
    stats = EngineStats(round(built.seconds, 2), str(cache.path) if cache else None, built.cache_loaded,
                        built.cache_saved)
    if not loaded.backend.deployable:
        message = (f"build check with {loaded.describe()}: graph, profiles and precision build, but no deployable "
                   "engine was produced (Triton cannot serve its plans); the tensorrt_plan model is not "
                   "published. Build on a GPU host with TensorRT for a deployable plan.")
        if settings.version_compatible or settings.hardware_compatibility_level != "none":
            message += f" ({loaded.backend.name} applies no version_compatible or hardware_compatibility_level.)"
        return EngineResult("build-check", message, None, built.network, built.profiles, facts, stats)
    engine_path = work_dir / ENGINE_FILE
    work_dir.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(built.plan)
    profiles = runtime.check_plan(loaded, built.plan, built.profiles, settings.version_compatible)
    message = f"{loaded.describe()} plan for Triton {settings.triton_release}: {engine_path.name}"
    return EngineResult("deployable", message, engine_path, built.network, profiles,
                        dataclasses.replace(facts, profiles=profiles), stats)


@dataclass(frozen=True)
class _SerializedEngine:
    plan: bytes
    network: IOSpec
    profiles: tuple[ProfileShapes, ...]
    seconds: float
    cache_loaded: int
    cache_saved: int


def _build(loaded: LoadedBackend, graph: Path, spec: IOSpec, recipe: Recipe, mode: BuildMode,
           shapes: list[dict[str, ShapeRange]], cache: TimingCache | None) -> _SerializedEngine:
    trt = loaded.trt
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(loaded, builder, logger, mode, graph)  # the parser owns the weights: keep it alive
    parsed = network_io(network)
    _check_network(parsed, spec, graph)
    config = _config(builder, loaded, recipe.tensorrt, mode)
    profiles = tuple(_add_profile(builder, config, logger, index, profile.name, shape)
                     for index, (profile, shape) in enumerate(zip(recipe.engine_profiles, shapes)))
    _check_profiles(profiles, shapes)
    cache_loaded = cache.attach(config) if cache else 0
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        raise build_failure(f"{loaded.describe()} built no engine from {graph.name}", logger)
    cache_saved = cache.save(config) if cache else 0
    return _SerializedEngine(bytes(memoryview(plan)), parsed, profiles, seconds, cache_loaded, cache_saved)


# --- parse -------------------------------------------------------------------------------------------------------


def _parse(loaded: LoadedBackend, builder, logger, mode: BuildMode, graph: Path):
    """The network parsed from `graph`, and its parser; every parser error is printed with its node, and raised."""
    trt = loaded.trt
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed if mode.strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(graph)):
        return network, parser
    errors = parser_errors(parser) or list(dict.fromkeys(logger.errors)) or ["no error was reported"]
    for line in errors:
        say(f"    parser error: {line}")
    raise EngineBuildError(f"{loaded.describe()} cannot parse {graph.name}: " + "\n  ".join(errors))


def parser_errors(parser) -> list[str]:
    """One line per parser error: node index, name and operator, then the message."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = f"node {error.node()} '{error.node_name()}' ({error.node_operator()})" if error.node() >= 0 else "graph"
        lines.append(f"{node}: {error.desc()} [{error.code().name}]")
    return lines


def network_io(network) -> IOSpec:
    """The parsed network's inputs and outputs: names, element types, dims (-1 where dynamic)."""
    def tensor(t) -> TensorSpec:
        return TensorSpec(t.name, TRT_DTYPES.get(t.dtype.name, t.dtype.name), tuple(t.shape))

    return IOSpec(
        tuple(tensor(network.get_input(i)) for i in range(network.num_inputs)),
        tuple(tensor(network.get_output(i)) for i in range(network.num_outputs)),
    )


def _check_network(parsed: IOSpec, spec: IOSpec, graph: Path) -> None:
    expected = engine_dims(spec)
    if parsed == expected:
        return
    differences = [
        f"{kind} {index}: TensorRT has {got}, the IO spec {want}"
        for kind, got_group, want_group in (("input", parsed.inputs, expected.inputs),
                                            ("output", parsed.outputs, expected.outputs))
        for index, (got, want) in enumerate(itertools.zip_longest(got_group, want_group))
        if got != want
    ]
    raise EngineBuildError(f"TensorRT's network of {graph.name} differs from the IO spec: " + "; ".join(differences))


# --- builder config and profiles ---------------------------------------------------------------------------------


def _config(builder, loaded: LoadedBackend, settings: TensorRT, mode: BuildMode):
    trt = loaded.trt
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would miss the fp32 gate
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if loaded.backend.compatibility:
        if settings.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)  # the plan embeds its lean runtime
        level = HARDWARE_LEVELS[settings.hardware_compatibility_level]
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    return config


def _add_profile(builder, config, logger, index: int, name: str, shapes: dict[str, ShapeRange]) -> ProfileShapes:
    profile = builder.create_optimization_profile()
    for tensor, (low, opt, high) in shapes.items():
        profile.set_shape(tensor, low, opt, high)
    if config.add_optimization_profile(profile) != index:
        raise build_failure(f"TensorRT refused optimization profile {index} '{name}' {shapes}", logger)
    return ProfileShapes(name, index, {tensor: tuple(tuple(d) for d in profile.get_shape(tensor)) for tensor in shapes})


def _check_profiles(profiles: tuple[ProfileShapes, ...], shapes: list[dict[str, ShapeRange]]) -> None:
    for profile, expected in zip(profiles, shapes):
        if profile.shapes != expected:
            raise EngineBuildError(f"profile {profile.index} '{profile.name}' holds {profile.shapes}, "
                                   f"the recipe asks for {expected}")


# --- timing cache ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingCache:
    """The timing cache file of one package and version: loaded into the builder config, saved after the build.

    TensorRT-RTX keeps the calls but makes them no-ops and warns on each (DeprecationWarning); the build facts say
    so instead (Backend.timing_cache), so those warnings are silenced around the calls.
    """

    path: Path

    @classmethod
    def of(cls, cache_dir: Path, loaded: LoadedBackend) -> TimingCache:
        return cls(cache_dir / f"{loaded.backend.module}-{loaded.version}.timing-cache")

    def attach(self, config) -> int:
        """Load the file if there is one (a fresh cache otherwise); return the bytes loaded."""
        data = self.path.read_bytes() if self.path.exists() else b""
        with self._no_deprecation_warnings():
            if config.set_timing_cache(config.create_timing_cache(data), False):
                return len(data)
            say(f"    warning: timing cache {self.path} was made on another GPU or version; starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), False)
        return 0

    def save(self, config) -> int:
        """Write the config's cache (atomically); return the bytes written."""
        with self._no_deprecation_warnings():
            data = bytes(memoryview(config.get_timing_cache().serialize()))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(self.path)
        return len(data)

    @staticmethod
    @contextmanager
    def _no_deprecation_warnings() -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield


# --- facts -------------------------------------------------------------------------------------------------------


def _facts(loaded: LoadedBackend, settings: TensorRT, graph: Path, built: _SerializedEngine,
           checked: Preflight) -> EngineFacts:
    host, applies = checked.host, loaded.backend.compatibility
    return EngineFacts(
        package=loaded.backend.module,
        version=loaded.version,
        deployable=loaded.backend.deployable,
        gpu=host.name if host else "none (build check)",
        compute_capability=host.compute_capability if host else "none (build check)",
        precision=settings.precision,
        fp16_method=settings.fp16_method if settings.precision == "fp16" else None,
        graph=graph.name,
        workspace_mib=settings.workspace_mib,
        profiles=built.profiles,
        engine_bytes=len(built.plan),
        timing_cache=loaded.backend.timing_cache,
        triton_release=checked.target.release,
        triton_tensorrt=checked.target.tensorrt,
        tensorrt_matches_triton=checked.target.matches,
        driver=host.driver if host else None,
        version_compatible=applies and settings.version_compatible,
        hardware_compatibility_level=settings.hardware_compatibility_level if applies else "none",
    )
