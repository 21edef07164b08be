"""TensorRT engine: parse the ONNX graph, one optimization profile per recipe profile, precision, timing cache.

Works with either package in BACKENDS: full `tensorrt` (TensorRT 10, a GPU host: a deployable plan for Triton's
`tensorrt_plan` backend) or `tensorrt_rtx` (TensorRT for RTX: builds without a GPU, so CI runs the same parse,
profile and build code; its plans are a build check only, since Triton cannot serve them). Without either the step
is skipped with the reason. Tensor names come from the IO spec; failures raise EngineBuildError with the parser's
errors or the builder's log, never a None passed on.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import shutil
import subprocess
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import numpy as np

from packager.console import say
from packager.errors import PackagerError, UsageError
from packager.iospec import BATCH, SEQUENCE, IOSpec, TensorSpec
from packager.recipe import TRITON_TENSORRT, EngineProfile, Recipe, TensorRT
from packager.record import EngineFacts, EngineStats, EngineStatus, ProfileShapes
from packager.validate import Inputs, Runner

ENGINE_FILE, FP16_GRAPH_FILE = "model.plan", "model.fp16.onnx"
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max


class EngineBuildError(PackagerError):
    """TensorRT could not parse the graph or build the engine; the message carries the parser errors or log."""


class BackendUnavailable(Exception):
    """No usable TensorRT package; the message says why (the step is then skipped, not failed)."""


# --- backends ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str  # as users see it
    module: str  # import name
    install: str  # how to get it
    deployable: bool  # Triton's tensorrt backend loads its plans
    fp16_flag: bool  # has BuilderFlag.FP16 (fp16 on a weakly typed network); else precision comes from the graph
    timing_cache: str  # what the timing cache does for this package


BACKENDS: dict[str, Backend] = {
    "tensorrt": Backend(
        "TensorRT", "tensorrt", "pip install tensorrt (GPU host, the version of the target Triton release)",
        deployable=True, fp16_flag=True, timing_cache="reused: tactic timings are not measured again",
    ),
    "tensorrt-rtx": Backend(
        "TensorRT-RTX", "tensorrt_rtx", "pip install tensorrt-rtx-cu12 (build check, no GPU needed)",
        deployable=False, fp16_flag=False,
        timing_cache="written and read, but a no-op in TensorRT-RTX (deprecated there since 1.2)",
    ),
}
BACKEND_CHOICES = ("auto", *BACKENDS, "none")


@dataclass(frozen=True)
class LoadedBackend:
    backend: Backend
    trt: ModuleType

    @property
    def version(self) -> str:
        return self.trt.__version__

    def describe(self) -> str:
        return f"{self.backend.name} {self.version}"


def select_backend(choice: str = "auto", backends: Mapping[str, Backend] = BACKENDS) -> LoadedBackend:
    """The first importable backend of `backends` (or only `choice`); raise BackendUnavailable saying why not."""
    if choice == "none":
        raise BackendUnavailable("TensorRT disabled (--trt-backend none)")
    if choice != "auto" and choice not in backends:
        raise UsageError(f"unknown TensorRT backend '{choice}': choose one of {', '.join(BACKEND_CHOICES)}")
    candidates = list(backends.values()) if choice == "auto" else [backends[choice]]
    reasons = []
    for backend in candidates:
        try:
            return LoadedBackend(backend, importlib.import_module(backend.module))
        except (ImportError, OSError) as exc:  # not installed, or its libraries missing
            reasons.append(f"{backend.name}: {exc} ({backend.install})")
    raise BackendUnavailable("no TensorRT package: " + "; ".join(reasons) if reasons else "no TensorRT backend listed")


# --- Triton release -> TensorRT ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetCheck:
    release: str
    tensorrt: str  # major.minor the release serves
    matches: bool | None  # None: the installed package makes no Triton plan at all
    message: str


def check_target(release: str, loaded: LoadedBackend) -> TargetCheck:
    expected = TRITON_TENSORRT[release]
    if not loaded.backend.deployable:
        message = (f"Triton {release} serves TensorRT {expected} plans; {loaded.describe()} plans are not served by "
                   "Triton (build check only)")
        return TargetCheck(release, expected, None, message)
    installed = ".".join(loaded.version.split(".")[:2])
    if installed == expected:
        return TargetCheck(release, expected, True, f"TensorRT {loaded.version} matches Triton {release}")
    message = (f"installed TensorRT {loaded.version} does not match Triton {release} (TensorRT {expected}): its plan "
               f"will not load there; pip install 'tensorrt=={expected}.*' or build in {container_image(release)}")
    return TargetCheck(release, expected, False, message)


def container_image(release: str) -> str:
    return f"nvcr.io/nvidia/tensorrt:{release}-py3"


# --- shapes ------------------------------------------------------------------------------------------------------


def profile_shapes(spec: IOSpec, profile: EngineProfile) -> dict[str, ShapeRange]:
    """min/opt/max shapes of every dynamic input of the IO spec under `profile`."""
    ranges = {BATCH: profile.batch, SEQUENCE: profile.sequence}
    shapes = {}
    for tensor in spec.inputs:
        unknown = [d for d in tensor.dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise PackagerError(f"input '{tensor.name}' has dynamic axes {unknown} that no profile sizes "
                                f"(profiles size {', '.join(ranges)})")
        if any(isinstance(d, str) for d in tensor.dims):
            shapes[tensor.name] = tuple(
                tuple(getattr(ranges[d], end) if isinstance(d, str) else d for d in tensor.dims)
                for end in ("min", "opt", "max")
            )
    return shapes


def engine_dims(spec: IOSpec) -> IOSpec:
    """The IO spec as TensorRT reports a network's IO: dynamic dims as -1."""
    def fixed(tensor: TensorSpec) -> TensorSpec:
        return TensorSpec(tensor.name, tensor.dtype, tuple(-1 if isinstance(d, str) else d for d in tensor.dims))

    return IOSpec(tuple(map(fixed, spec.inputs)), tuple(map(fixed, spec.outputs)))


# TensorRT DataType name -> ONNX element type name (the IO spec's dtype names)
TRT_DTYPES = {"FLOAT": "FLOAT", "HALF": "FLOAT16", "BF16": "BFLOAT16", "INT64": "INT64", "INT32": "INT32",
              "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL"}


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


# --- logging and errors --------------------------------------------------------------------------------------------


@cache
def _logger_class(trt: ModuleType) -> type:
    class CapturingLogger(trt.ILogger):
        """Keeps every error, and the last INFO-and-above messages, for the error raised on a failure."""

        def __init__(self, keep: int = 60):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.tail: deque[str] = deque(maxlen=keep)

        def log(self, severity, message):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(message)
            if severity <= trt.ILogger.Severity.INFO:
                self.tail.append(f"[{severity.name}] {message}")

    return CapturingLogger


def make_logger(trt: ModuleType):
    return _logger_class(trt)()


def parser_errors(parser) -> list[str]:
    """One line per parser error: node index, name and operator, then the message."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = f"node {error.node()} '{error.node_name()}' ({error.node_operator()})" if error.node() >= 0 else "graph"
        lines.append(f"{node}: {error.desc()} [{error.code().name}]")
    return lines


def _build_failure(what: str, logger) -> EngineBuildError:
    errors = list(dict.fromkeys(logger.errors))  # in order, each once
    headline = errors[0] if errors else "no error was logged"
    log = "\n".join(["builder errors:", *errors, "last log messages:", *logger.tail])
    return EngineBuildError(f"{what}: {headline}\n{log}")


# --- build -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineResult:
    status: EngineStatus
    message: str
    engine_path: Path | None = None  # only for a deployable plan
    network: IOSpec | None = None  # the parsed network's IO
    profiles: tuple[ProfileShapes, ...] = ()
    facts: EngineFacts | None = None
    stats: EngineStats | None = None

    @property
    def triton_profiles(self) -> list[str]:
        """The profile indices for the Triton config's instance_group { profile: [...] }."""
        return [str(p.index) for p in self.profiles]

    def rows(self) -> list[list[str]]:
        """Table rows: profile, input, min, opt, max."""
        def text(shape):
            return "x".join(map(str, shape))

        return [[f"{p.index} {p.name}", name, *map(text, r)] for p in self.profiles for name, r in p.shapes.items()]


@dataclass(frozen=True)
class _Mode:
    strongly_typed: bool  # precision from the graph's own types
    fp16_graph: bool  # parse the fp16 graph instead of the exported one
    builder_flags: tuple[str, ...]  # BuilderFlag names to set


BUILD_MODES: dict[str, _Mode] = {
    "fp32": _Mode(strongly_typed=True, fp16_graph=False, builder_flags=()),
    "fp16 graph": _Mode(strongly_typed=True, fp16_graph=True, builder_flags=()),
    "fp16 flag": _Mode(strongly_typed=False, fp16_graph=False, builder_flags=("FP16",)),
}


def build_mode(settings: TensorRT, backend: Backend) -> _Mode:
    """How the precision is obtained: the graph's own types (strongly typed), or the FP16 builder flag."""
    mode = BUILD_MODES["fp32" if settings.precision == "fp32" else f"fp16 {settings.fp16_method}"]
    if mode.builder_flags and not backend.fp16_flag:
        raise UsageError(f"{backend.name} builds strongly typed networks only (no FP16 builder flag): "
                         "use fp16_method = \"graph\"")
    return mode


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
) -> EngineResult:
    """Build the engine of `onnx_path` with the recipe's [tensorrt] profiles and precision.

    Returns a skipped result when no TensorRT package is there, a build-check result with TensorRT-RTX (nothing
    written), or a deployable plan at work_dir/model.plan, deserialized and checked against the profiles.
    `cache_dir` holds the timing cache (one file per package and version); `fp16_graph` makes the fp16 graph an fp16
    engine of the 'graph' method is built from (packager.optimize.fp16.fp16_graph of `onnx_path`).
    """
    settings = recipe.tensorrt
    shapes = [profile_shapes(spec, profile) for profile in recipe.engine_profiles]
    try:
        loaded = select_backend(backend, backends)
    except BackendUnavailable as exc:
        return EngineResult("skipped", f"TensorRT step skipped: {exc}")
    target = check_target(settings.triton_release, loaded)
    if target.matches is False:
        say(f"    warning: {target.message}")
    mode = build_mode(settings, loaded.backend)
    graph = onnx_path
    if mode.fp16_graph:
        if fp16_graph is None:
            raise PackagerError("an fp16 engine of the 'graph' method needs its fp16 graph (fp16_graph)")
        graph = fp16_graph()
    cache_file = cache_dir / f"{loaded.backend.module}-{loaded.version}.timing-cache" if cache_dir else None
    built = _build(loaded, graph, spec, recipe, mode, shapes, cache_file)
    facts = _facts(loaded, settings, graph, built, target)
    stats = EngineStats(round(built.seconds, 2), str(cache_file) if cache_file else None, built.cache_loaded,
                        built.cache_saved)
    if not loaded.backend.deployable:
        message = (f"build check with {loaded.describe()}: graph, profiles and precision build, but no deployable "
                   "engine was produced (Triton cannot serve its plans); the tensorrt_plan model is not "
                   "published. Build on a GPU host with TensorRT for a deployable plan.")
        return EngineResult("build-check", message, None, built.network, built.profiles, facts, stats)
    engine_path = work_dir / ENGINE_FILE
    work_dir.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(built.plan)
    profiles = _check_plan(loaded, built.plan, built.profiles)
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


def _build(loaded, graph, spec, recipe: Recipe, mode, shapes, cache_file) -> _SerializedEngine:
    trt = loaded.trt
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(loaded, builder, logger, mode, graph)  # the parser owns the weights: keep it alive
    parsed = network_io(network)
    _check_network(parsed, spec, graph)
    config = _config(builder, trt, recipe.tensorrt, mode)
    profiles = tuple(_add_profile(builder, config, logger, index, profile.name, shape)
                     for index, (profile, shape) in enumerate(zip(recipe.engine_profiles, shapes)))
    _check_profiles(profiles, shapes)
    cache_loaded = _attach_timing_cache(config, cache_file)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        raise _build_failure(f"{loaded.describe()} built no engine from {graph.name}", logger)
    cache_saved = _save_timing_cache(config, cache_file)
    return _SerializedEngine(bytes(memoryview(plan)), parsed, profiles, seconds, cache_loaded, cache_saved)


def _parse(loaded: LoadedBackend, builder, logger, mode: _Mode, graph: Path):
    """The network parsed from `graph`; every parser error is printed with its node, and raised."""
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


def _config(builder, trt, settings: TensorRT, mode: _Mode):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would miss the fp32 gate
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    return config


def _add_profile(builder, config, logger, index: int, name: str, shapes: dict[str, ShapeRange]) -> ProfileShapes:
    profile = builder.create_optimization_profile()
    for tensor, (low, opt, high) in shapes.items():
        profile.set_shape(tensor, low, opt, high)
    if config.add_optimization_profile(profile) != index:
        raise _build_failure(f"TensorRT refused optimization profile {index} '{name}' {shapes}", logger)
    return ProfileShapes(name, index, {tensor: tuple(tuple(d) for d in profile.get_shape(tensor)) for tensor in shapes})


def _check_profiles(profiles: tuple[ProfileShapes, ...], shapes: list[dict[str, ShapeRange]]) -> None:
    for profile, expected in zip(profiles, shapes):
        if profile.shapes != expected:
            raise EngineBuildError(f"profile {profile.index} '{profile.name}' holds {profile.shapes}, "
                                   f"the recipe asks for {expected}")


def _attach_timing_cache(config, cache_file: Path | None) -> int:
    """Load the timing cache file if there is one (a fresh cache otherwise); return the bytes loaded."""
    if cache_file is None:
        return 0
    data = cache_file.read_bytes() if cache_file.exists() else b""
    with _timing_cache_deprecations_silenced():
        if config.set_timing_cache(config.create_timing_cache(data), False):
            return len(data)
        say(f"    warning: timing cache {cache_file} was made on another GPU or version; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return 0


def _save_timing_cache(config, cache_file: Path | None) -> int:
    if cache_file is None:
        return 0
    with _timing_cache_deprecations_silenced():
        data = bytes(memoryview(config.get_timing_cache().serialize()))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(cache_file)
    return len(data)


@contextmanager
def _timing_cache_deprecations_silenced():
    """TensorRT-RTX warns that its timing-cache calls are no-ops; the build facts say so instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _facts(loaded, settings: TensorRT, graph: Path, built: _SerializedEngine, target: TargetCheck) -> EngineFacts:
    gpu, capability = _gpu() if loaded.backend.deployable else ("none (build check)", "none (build check)")
    return EngineFacts(
        package=loaded.backend.module,
        version=loaded.version,
        deployable=loaded.backend.deployable,
        gpu=gpu,
        compute_capability=capability,
        precision=settings.precision,
        fp16_method=settings.fp16_method if settings.precision == "fp16" else None,
        graph=graph.name,
        workspace_mib=settings.workspace_mib,
        profiles=built.profiles,
        engine_bytes=len(built.plan),
        timing_cache=loaded.backend.timing_cache,
        triton_release=target.release,
        triton_tensorrt=target.tensorrt,
        tensorrt_matches_triton=target.matches,
    )


def _gpu() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        return "unknown (no CUDA device visible to PyTorch)", "unknown"
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


# --- GPU host: the plan at run time (untested here: needs tensorrt and a CUDA GPU) ---------------------------------


def _check_plan(loaded: LoadedBackend, plan: bytes, profiles: tuple[ProfileShapes, ...]) -> tuple[ProfileShapes, ...]:
    """Deserialize the plan and read its profiles back from the engine; they must equal what was asked.

    Written against the TensorRT 10 runtime API; not run in this project's CI (no GPU, no full TensorRT).
    """
    engine = _deserialize(loaded.trt, plan)
    if engine.num_optimization_profiles != len(profiles):
        raise EngineBuildError(f"the plan has {engine.num_optimization_profiles} profiles, {len(profiles)} were built")
    read = tuple(
        ProfileShapes(p.name, p.index, {name: tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, p.index))
                                        for name in p.shapes})
        for p in profiles
    )
    if read != profiles:
        raise EngineBuildError(f"the plan's profiles {read} differ from the built ones {profiles}")
    return read


def _deserialize(trt: ModuleType, plan: bytes):
    logger = make_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise _build_failure("TensorRT could not deserialize the plan it built", logger)
    return engine


def engine_runner(engine_path: Path, spec: IOSpec, backend: str = "tensorrt") -> Runner:
    """A Runner over a deployable plan: one execution context per profile, PyTorch CUDA tensors as buffers.

    Each call picks the first profile whose ranges hold the input shapes (as Triton does), copies the inputs to the
    GPU, runs `execute_async_v3` and returns float32 outputs on the host, in the IO spec's names.
    Written against the TensorRT 10 Python API; untested in this project's CI, which has no GPU.
    """
    import torch

    loaded = select_backend(backend)
    if not loaded.backend.deployable:
        raise PackagerError(f"{loaded.describe()} plans cannot run here as a Triton engine would")
    engine = _deserialize(loaded.trt, engine_path.read_bytes())
    stream = torch.cuda.Stream()
    contexts, ranges = [], []
    for index in range(engine.num_optimization_profiles):
        context = engine.create_execution_context()
        if not context.set_optimization_profile_async(index, stream.cuda_stream):
            raise PackagerError(f"TensorRT could not select profile {index} of {engine_path.name}")
        contexts.append(context)
        ranges.append({name: engine.get_tensor_profile_shape(name, index) for name in spec.input_names})
    stream.synchronize()

    def pick(inputs: Inputs) -> int:
        for index, profile in enumerate(ranges):
            if all(all(lo <= n <= hi for lo, n, hi in zip(r[0], inputs[name].shape, r[2]))
                   for name, r in profile.items()):
                return index
        raise PackagerError(f"no profile of {engine_path.name} accepts shapes "
                            f"{ {name: inputs[name].shape for name in spec.input_names} }")

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        context = contexts[pick(inputs)]
        with torch.cuda.stream(stream):
            buffers = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])).cuda() for name in spec.input_names}
            for name, tensor in buffers.items():
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise PackagerError(f"TensorRT refused shape {tuple(tensor.shape)} for input '{name}'")
                context.set_tensor_address(name, tensor.data_ptr())
            for tensor in spec.outputs:
                dtype = torch.from_numpy(np.empty(0, tensor.numpy_dtype)).dtype
                buffers[tensor.name] = torch.empty(tuple(context.get_tensor_shape(tensor.name)), dtype=dtype,
                                                   device="cuda")
                context.set_tensor_address(tensor.name, buffers[tensor.name].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise PackagerError(f"TensorRT execution of {engine_path.name} failed")
        stream.synchronize()
        return {name: buffers[name].float().cpu().numpy() for name in spec.output_names}

    return run


# --- the same build in the target release's container -----------------------------------------------------------


def docker_available() -> bool:
    """Whether a Docker daemon answers (not just a docker binary)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def trtexec_command(graph: Path, engine_path: Path, spec: IOSpec, recipe: Recipe, timing_cache: Path) -> list[str]:
    """`docker run ... trtexec ...` building the same engine (profiles, precision, workspace, timing cache) with the
    TensorRT of the recipe's Triton release. `graph` is the graph the precision needs (build_mode): the fp16 graph
    for fp16 engines of the 'graph' method, else the plain export. Every path must exist where the command runs."""
    settings = recipe.tensorrt
    mounts = {"onnx": graph.parent, "engine": engine_path.parent, "cache": timing_cache.parent}
    mode = build_mode(settings, BACKENDS["tensorrt"])
    argv = ["docker", "run", "--rm", "--gpus", "all"]
    for name, folder in mounts.items():
        argv += ["-v", f"{folder.resolve()}:/work/{name}" + (":ro" if name == "onnx" else "")]
    argv += [container_image(settings.triton_release), "trtexec",
             f"--onnx=/work/onnx/{graph.name}", f"--saveEngine=/work/engine/{engine_path.name}"]
    for index, profile in enumerate(recipe.engine_profiles):
        shapes = profile_shapes(spec, profile)
        argv.append(f"--profile={index}")
        for position, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            argv.append(f"{flag}=" + ",".join(f"{name}:" + "x".join(map(str, r[position]))
                                              for name, r in shapes.items()))
    argv += [f"--memPoolSize=workspace:{settings.workspace_mib}M", "--noTF32"]
    argv += ["--stronglyTyped"] if mode.strongly_typed else [f"--{flag.lower()}" for flag in mode.builder_flags]
    argv += [f"--timingCacheFile=/work/cache/{timing_cache.name}", "--skipInference"]
    return argv
