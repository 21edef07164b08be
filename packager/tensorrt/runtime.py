"""A deployable plan at run time, on a GPU host: deserialized and checked after the build, and run for the parity
gate. Written against the TensorRT 10 runtime API and PyTorch CUDA; untested in this project's CI (no GPU, no full
TensorRT)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from packager.errors import PackagerError
from packager.iospec import IOSpec
from packager.record import ProfileShapes
from packager.tensorrt.log import EngineBuildError, build_failure, make_logger
from packager.tensorrt.settings import LoadedBackend, select_backend
from packager.validate import Inputs, Runner


def check_plan(loaded: LoadedBackend, plan: bytes, profiles: tuple[ProfileShapes, ...]) -> tuple[ProfileShapes, ...]:
    """Deserialize the plan and read its profiles back from the engine; they must equal what was asked."""
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
        raise build_failure("TensorRT could not deserialize the plan it built", logger)
    return engine


def gpu() -> tuple[str, str]:
    """The CUDA device PyTorch sees: its name and compute capability ("unknown" without one)."""
    import torch

    if not torch.cuda.is_available():
        return "unknown (no CUDA device visible to PyTorch)", "unknown"
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def engine_runner(engine_path: Path, spec: IOSpec, backend: str = "tensorrt") -> Runner:
    """A Runner over a deployable plan: one execution context per profile, PyTorch CUDA tensors as buffers.

    Each call picks the first profile whose ranges hold the input shapes, copies the inputs to the GPU, runs
    `execute_async_v3` and returns float32 outputs on the host, in the IO spec's names.
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
