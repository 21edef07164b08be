"""What a TensorRT build is set up from: the backend packages, the target Triton release, the build mode of a
precision, and the shapes of the recipe's profiles. No TensorRT call here; backends are imported on selection."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping

from packager.errors import PackagerError, UsageError
from packager.iospec import BATCH, SEQUENCE, IOSpec, TensorSpec
from packager.recipe import EngineProfile, TensorRT
from packager.releases import TRITON_RELEASES

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max


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
    compatibility: bool  # applies [tensorrt] version_compatible and hardware_compatibility_level


BACKENDS: dict[str, Backend] = {
    "tensorrt": Backend(
        "TensorRT", "tensorrt", "pip install tensorrt (GPU host, the version of the target Triton release)",
        deployable=True, fp16_flag=True, timing_cache="reused: tactic timings are not measured again",
        compatibility=True,
    ),
    "tensorrt-rtx": Backend(
        "TensorRT-RTX", "tensorrt_rtx", "pip install tensorrt-rtx-cu12 (build check, no GPU needed)",
        deployable=False, fp16_flag=False,
        timing_cache="written and read, but a no-op in TensorRT-RTX (deprecated there since 1.2)",
        compatibility=False,  # no hardware level ("unsupported"), and VERSION_COMPATIBLE needs a lean runtime it lacks
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
    tensorrt: str  # the full version the release serves
    matches: bool | None  # the release loads the plan (exact version, or a later one of a version-compatible plan);
    # None: the installed package makes no Triton plan at all
    message: str


def check_target(release: str, loaded: LoadedBackend, version_compatible: bool = False) -> TargetCheck:
    """Whether the release's Triton loads plans of the installed package: a plan loads only in the exact TensorRT
    (major.minor.patch.build) that built it, or, built VERSION_COMPATIBLE, in the same or a later TensorRT of its
    major version. A version without its build number cannot be confirmed, and does not match."""
    expected = TRITON_RELEASES[release].tensorrt
    if not loaded.backend.deployable:
        message = (f"Triton {release} serves TensorRT {expected} plans; {loaded.describe()} plans are not served by "
                   "Triton (build check only)")
        return TargetCheck(release, expected, None, message)
    installed, wanted = _numbers(loaded.version), _numbers(expected)
    if installed == wanted:
        return TargetCheck(release, expected, True, f"TensorRT {loaded.version} is Triton {release}'s")
    older = installed < wanted if len(installed) == 4 else installed[:3] < wanted[:3]
    if version_compatible and installed[:1] == wanted[:1] and older:
        return TargetCheck(release, expected, True, f"TensorRT {loaded.version} builds version-compatible plans that "
                                                    f"Triton {release} (TensorRT {expected}) loads")
    patch = ".".join(map(str, wanted[:3]))
    why = ("reports no build number, so it cannot be confirmed as" if installed == wanted[:len(installed)]
           else "is not")
    message = (f"installed TensorRT {loaded.version} {why} Triton {release}'s TensorRT {expected}: its plan may not "
               f"load there; pip install 'tensorrt=={patch}.*' or build in {container_image(release)}")
    return TargetCheck(release, expected, False, message)


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def container_image(release: str) -> str:
    """NVIDIA's TensorRT container of a Triton release (the -py3 images share its TensorRT; -trtllm ones do not)."""
    return f"nvcr.io/nvidia/tensorrt:{release}-py3"


# TensorRT's HardwareCompatibilityLevel member of each [tensorrt] hardware_compatibility_level
HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS"}
AMPERE = (8, 0)  # the compute capability an ampere+ plan needs, to build and to load


# --- precision -> build mode -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildMode:
    strongly_typed: bool  # precision from the graph's own types
    fp16_graph: bool  # parse the fp16 graph instead of the exported one
    builder_flags: tuple[str, ...]  # BuilderFlag names to set


BUILD_MODES: dict[str, BuildMode] = {
    "fp32": BuildMode(strongly_typed=True, fp16_graph=False, builder_flags=()),
    "fp16 graph": BuildMode(strongly_typed=True, fp16_graph=True, builder_flags=()),
    "fp16 flag": BuildMode(strongly_typed=False, fp16_graph=False, builder_flags=("FP16",)),
}


def build_mode(settings: TensorRT, backend: Backend) -> BuildMode:
    """How the precision is obtained: the graph's own types (strongly typed), or the FP16 builder flag."""
    mode = BUILD_MODES["fp32" if settings.precision == "fp32" else f"fp16 {settings.fp16_method}"]
    if mode.builder_flags and not backend.fp16_flag:
        raise UsageError(f"{backend.name} builds strongly typed networks only (no FP16 builder flag): "
                         "use fp16_method = \"graph\"")
    return mode


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
