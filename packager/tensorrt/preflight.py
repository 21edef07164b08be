"""Before any work on a deployable backend (full TensorRT): the host must be able to build and gate a plan for the
target Triton release. Refuses in one line when CUDA PyTorch, a GPU or the driver is missing, when the driver is
below the release's, when an ampere+ plan is asked of an older GPU, and (with --strict) when the installed TensorRT
is not the release's exact version. TensorRT-RTX (a build check) needs none of it.

The host is looked at through `Probes` (PyTorch's CUDA view, nvidia-smi's driver), so tests pass their own.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping

from packager.console import say
from packager.errors import PackagerError
from packager.recipe import TensorRT
from packager.releases import DATACENTER_DRIVERS, TRITON_RELEASES
from packager.tensorrt.settings import (
    AMPERE, BACKENDS, Backend, BackendUnavailable, LoadedBackend, TargetCheck, check_target, select_backend,
)


@dataclass(frozen=True)
class TorchCuda:
    """What PyTorch says about CUDA here."""

    torch: str  # torch.__version__
    cuda: str | None  # torch.version.cuda: None for a CPU build
    device: str | None  # name of CUDA device 0, None when PyTorch sees none
    capability: tuple[int, int] | None


def torch_cuda() -> TorchCuda:
    import torch

    if not torch.cuda.is_available():
        return TorchCuda(torch.__version__, torch.version.cuda, None, None)
    return TorchCuda(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0),
                     tuple(torch.cuda.get_device_capability(0)))


def nvidia_smi_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports (of GPU 0), None without nvidia-smi or a working driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


@dataclass(frozen=True)
class Probes:
    torch: Callable[[], TorchCuda] = torch_cuda
    driver: Callable[[], str | None] = nvidia_smi_driver


@dataclass(frozen=True)
class GpuHost:
    """The GPU a deployable plan is built and gated on (recorded in the manifest)."""

    name: str
    compute_capability: str  # "9.0": a plan loads only on this one unless built ampere+
    driver: str


@dataclass(frozen=True)
class Preflight:
    """The backend a build uses (None: skipped, with the reason), and for a deployable one its host and target."""

    loaded: LoadedBackend | None
    reason: str = ""  # why there is no backend
    host: GpuHost | None = None
    target: TargetCheck | None = None


def preflight(settings: TensorRT, choice: str = "auto", strict: bool = False,
              backends: Mapping[str, Backend] = BACKENDS, probes: Probes = Probes()) -> Preflight:
    """The backend of `choice` and, for a deployable one, the checks above (warnings are printed)."""
    try:
        loaded = select_backend(choice, backends)
    except BackendUnavailable as exc:
        if choice not in backends or not backends[choice].deployable:  # auto, none, or a build check
            return Preflight(None, str(exc))
        raise PackagerError(f"--trt-backend {choice}: {exc}; or --trt-backend tensorrt-rtx for a build check "
                            "without a GPU") from None
    target = check_target(settings.triton_release, loaded, settings.version_compatible)
    if not loaded.backend.deployable:
        return Preflight(loaded, target=target)
    host, warnings = gpu_host(settings, probes)
    if target.matches is False:
        if strict:
            raise PackagerError(f"--strict: {target.message}")
        warnings.append(target.message)
    for line in warnings:
        say(f"    warning: {line}")
    return Preflight(loaded, host=host, target=target)


def gpu_host(settings: TensorRT, probes: Probes) -> tuple[GpuHost, list[str]]:
    """The GPU the plan is built on, after the CUDA, driver and compute-capability checks; warnings on the side."""
    release = TRITON_RELEASES[settings.triton_release]
    cuda = probes.torch()
    if cuda.cuda is None:
        raise PackagerError(f"the TensorRT backend needs a CUDA build of PyTorch to gate its plan; PyTorch "
                            f"{cuda.torch} is a CPU build (install one from PyTorch's CUDA index, e.g. TORCH_SPEC)")
    driver = probes.driver()
    if driver is None:
        raise PackagerError("the TensorRT backend needs an NVIDIA GPU and driver: nvidia-smi is missing or reports "
                            "no driver")
    if cuda.device is None:
        raise PackagerError(f"PyTorch {cuda.torch} (CUDA {cuda.cuda}) sees no CUDA device, with NVIDIA driver "
                            f"{driver}")
    warnings = []
    branch = _version(driver)[0]
    if branch < release.driver:
        first = DATACENTER_DRIVERS.get(branch)
        if first is None or _version(driver) < _version(first):
            older = ", ".join(f"{v}+" for v in DATACENTER_DRIVERS.values())
            raise PackagerError(f"NVIDIA driver {driver} is below Triton {settings.triton_release}'s {release.driver} "
                                f"(data-center GPUs: {older})")
        warnings.append(f"NVIDIA driver {driver} runs Triton {settings.triton_release} (driver {release.driver}) "
                        "on data-center GPUs only, through CUDA's forward compatibility")
    major, minor = cuda.capability
    if settings.hardware_compatibility_level == "ampere+" and cuda.capability < AMPERE:
        raise PackagerError(f"hardware_compatibility_level = \"ampere+\" needs a GPU of compute capability 8.0 or "
                            f"later; {cuda.device} is {major}.{minor}")
    return GpuHost(cuda.device, f"{major}.{minor}", driver), warnings


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())
