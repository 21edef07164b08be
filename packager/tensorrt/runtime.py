"""A deployable plan at run time: deserialized and checked after the build, and run for the parity gate with the
profile Triton's tensorrt backend would choose. Written against the TensorRT 10 runtime API. The device buffers and
the stream come from a `Device`: PyTorch CUDA tensors on a GPU host (`CudaDevice`); tests pass a host-memory one
with a double of the TensorRT runtime, since neither a GPU nor full TensorRT is there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from packager.errors import PackagerError
from packager.iospec import IOSpec
from packager.record import ProfileShapes
from packager.tensorrt.log import EngineBuildError, build_failure, make_logger
from packager.tensorrt.settings import LoadedBackend, Shape, ShapeRange, select_backend
from packager.validate import Inputs, Runner


def check_plan(loaded: LoadedBackend, plan: bytes, profiles: tuple[ProfileShapes, ...],
               version_compatible: bool = False) -> tuple[ProfileShapes, ...]:
    """Deserialize the plan and read its profiles back from the engine; they must equal what was asked."""
    engine = _deserialize(loaded.trt, plan, version_compatible)
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


def _deserialize(trt: ModuleType, plan: bytes, version_compatible: bool):
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    # a version-compatible plan carries its lean runtime, which runs only when host code is allowed (Triton: its
    # tensorrt backend's version-compatible setting does the same)
    runtime.engine_host_code_allowed = version_compatible
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise build_failure("TensorRT could not deserialize the plan", logger)
    return engine


# --- Triton's profile choice -------------------------------------------------------------------------------------


def triton_profile(ranges: list[dict[str, ShapeRange]], shapes: dict[str, Shape]) -> int | None:
    """The profile Triton's tensorrt backend runs a batch of `shapes` on; None when none accepts them.

    As `GetMostOptimizedProfile` / `EvaluateTensorRTContext` in tensorrt_backend's src/instance_state.cc (read at a
    2024 commit, the r24.10 tag itself was not readable): a profile is valid when every input shape lies within its
    min..max; among the valid ones the smallest distance to the opt shapes wins, summed over the inputs, and a tie
    keeps the lowest index (a strict `<` over profiles in index order). The distance is the source's: dim 0 (the
    batch) against opt dim 0, then opt dim k against request dim k-1, the request shape including its batch dim.
    """
    best, shortest = None, None
    for index, profile in enumerate(ranges):
        if not all(all(lo <= n <= hi for lo, n, hi in zip(r[0], shapes[name], r[2])) for name, r in profile.items()):
            continue
        distance = sum(_distance(r[1], shapes[name]) for name, r in profile.items())
        if shortest is None or distance < shortest:
            best, shortest = index, distance
    return best


def _distance(opt: Shape, shape: Shape) -> int:
    return abs(opt[0] - shape[0]) + sum(abs(opt[k] - shape[k - 1]) for k in range(1, len(opt)))


# --- device buffers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buffer:
    address: int  # what TensorRT is given (set_tensor_address)
    data: Any  # the device's own handle on the memory


class Device(Protocol):
    """Where the runner's buffers live and the stream its work is queued on."""

    stream: int  # the handle given to set_optimization_profile_async and execute_async_v3

    def upload(self, array: np.ndarray) -> Buffer: ...
    def empty(self, shape: Shape, dtype: np.dtype) -> Buffer: ...
    def synchronize(self) -> None: ...
    def download(self, buffer: Buffer) -> np.ndarray: ...


class CudaDevice:
    """PyTorch CUDA tensors as buffers, one CUDA stream; copies are queued on that stream."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise PackagerError(f"PyTorch {torch.__version__} sees no CUDA device to run the TensorRT plan on")
        self._torch = torch
        self._stream = torch.cuda.Stream()
        self.stream = self._stream.cuda_stream

    def upload(self, array: np.ndarray) -> Buffer:
        with self._torch.cuda.stream(self._stream):  # allocated for, and copied on, the runner's stream
            tensor = self._torch.from_numpy(np.ascontiguousarray(array)).cuda()
        return Buffer(tensor.data_ptr(), tensor)

    def empty(self, shape: Shape, dtype: np.dtype) -> Buffer:
        kind = self._torch.from_numpy(np.empty(0, dtype)).dtype
        with self._torch.cuda.stream(self._stream):
            tensor = self._torch.empty(shape, dtype=kind, device="cuda")
        return Buffer(tensor.data_ptr(), tensor)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def download(self, buffer: Buffer) -> np.ndarray:
        return buffer.data.cpu().numpy()


# --- the runner --------------------------------------------------------------------------------------------------


def engine_runner(engine_path: Path, spec: IOSpec, loaded: LoadedBackend | None = None, device: Device | None = None,
                  version_compatible: bool = False) -> Runner:
    """A Runner over a deployable plan: one execution context per profile, buffers on `device` (CUDA by default).

    Each call picks the profile Triton would (`triton_profile`), copies the inputs to the device, sets their shapes,
    binds every tensor, runs `execute_async_v3` on the device's stream, waits for it, and returns float32 outputs in
    the IO spec's names.
    """
    loaded = loaded or select_backend("tensorrt")
    if not loaded.backend.deployable:
        raise PackagerError(f"{loaded.describe()} plans cannot run here as a Triton engine would")
    engine = _deserialize(loaded.trt, engine_path.read_bytes(), version_compatible)
    device = device or CudaDevice()
    contexts, ranges = [], []
    for index in range(engine.num_optimization_profiles):
        context = engine.create_execution_context()
        if not context.set_optimization_profile_async(index, device.stream):
            raise PackagerError(f"TensorRT could not select profile {index} of {engine_path.name}")
        contexts.append(context)
        ranges.append({name: tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, index))
                       for name in spec.input_names})
    device.synchronize()

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        shapes = {name: tuple(inputs[name].shape) for name in spec.input_names}
        index = triton_profile(ranges, shapes)
        if index is None:
            raise PackagerError(f"no profile of {engine_path.name} accepts shapes {shapes}")
        context = contexts[index]
        buffers = {}
        for name in spec.input_names:
            buffers[name] = device.upload(inputs[name])
            if not context.set_input_shape(name, shapes[name]):
                raise PackagerError(f"TensorRT refused shape {shapes[name]} for input '{name}'")
            context.set_tensor_address(name, buffers[name].address)
        for tensor in spec.outputs:
            buffers[tensor.name] = device.empty(tuple(context.get_tensor_shape(tensor.name)), tensor.numpy_dtype)
            context.set_tensor_address(tensor.name, buffers[tensor.name].address)
        if not context.execute_async_v3(device.stream):
            raise PackagerError(f"TensorRT execution of {engine_path.name} failed")
        device.synchronize()
        return {name: device.download(buffers[name]).astype(np.float32) for name in spec.output_names}

    return run
