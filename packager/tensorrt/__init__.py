"""TensorRT engine: parse the ONNX graph, one optimization profile per recipe profile, precision, timing cache.

Works with either package in BACKENDS: full `tensorrt` (TensorRT 10, a GPU host: a deployable plan for Triton's
`tensorrt_plan` backend) or `tensorrt_rtx` (TensorRT for RTX: builds without a GPU, so CI runs the same parse,
profile and build code; its plans are a build check only, since Triton cannot serve them). Without either the step
is skipped with the reason. Tensor names come from the IO spec; failures raise EngineBuildError with the parser's
errors or the builder's log, never a None passed on.

- settings: backends, the target Triton release, the build mode of a precision, profile shapes;
- build: parse, profiles, builder config, timing cache, `build_engine`;
- preflight: before any work on a deployable backend: CUDA PyTorch, GPU, driver, the target release's version;
- runtime: the plan on a GPU host (checked after the build, run for the parity gate on Triton's profile choice);
- trtexec: the same build as a `docker run ... trtexec` command in the release's container.

The TensorRT packages (and torch) are imported only when a build or a run needs them.
"""

from packager.tensorrt.build import ENGINE_FILE, EngineResult, build_engine
from packager.tensorrt.log import EngineBuildError
from packager.tensorrt.preflight import GpuHost, Preflight, Probes, TorchCuda, preflight
from packager.tensorrt.runtime import Buffer, CudaDevice, engine_runner, triton_profile
from packager.tensorrt.settings import (
    BACKEND_CHOICES, BACKENDS, Backend, BackendUnavailable, LoadedBackend, build_mode, check_target, engine_dims,
    profile_shapes, select_backend,
)
from packager.tensorrt.trtexec import docker_available, trtexec_command

__all__ = [
    "BACKEND_CHOICES", "BACKENDS", "ENGINE_FILE", "Backend", "BackendUnavailable", "Buffer", "CudaDevice",
    "EngineBuildError", "EngineResult", "GpuHost", "LoadedBackend", "Preflight", "Probes", "TorchCuda",
    "build_engine", "build_mode", "check_target", "docker_available", "engine_dims", "engine_runner", "preflight",
    "profile_shapes", "select_backend", "triton_profile", "trtexec_command",
]
