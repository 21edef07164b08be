"""A test double of the TensorRT 10 runtime (`import tensorrt`): a part that cannot run here (no GPU, and full
TensorRT cannot be installed), standing in for it so engine_runner's control flow runs on CPU in `make test`.

Its "plan" is JSON (`write_plan`): an ONNX graph and the optimization profiles. It keeps TensorRT 10's Python
signatures (Runtime, deserialize_cuda_engine, create_execution_context, set_optimization_profile_async,
get_tensor_profile_shape, set_input_shape, get_tensor_shape, set_tensor_address, execute_async_v3) and refuses what
TensorRT refuses (a shape outside the active profile, an unbound tensor, an output shape asked before the inputs').
execute_async_v3 queues, on the given stream, a run of the graph with ONNX Runtime on the inputs read from the bound
addresses, writing the outputs into the bound output buffers. Buffers are reached through a `Memory`: `HostDevice`
here (numpy arrays, work run at synchronize), `CudaMemoryDevice` on a GPU host (real CUDA tensors, same double).
Every call is logged in `calls` for the tests.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from packager.iospec import IOSpec
from packager.tensorrt import Buffer, CudaDevice
from packager.tensorrt.settings import ShapeRange
from packager.validate import onnxruntime_session

FORMAT = "tensorrt-runtime-double"


class Memory(Protocol):
    def read(self, address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...
    def write(self, address: int, array: np.ndarray) -> None: ...
    def enqueue(self, stream: int, work: Callable[[], None]) -> None: ...


def write_plan(path: Path, graph: Path, spec: IOSpec, profiles: list[dict[str, ShapeRange]], corrupt: float = 0.0):
    """A plan of the double: `graph` run for `spec`'s tensors under `profiles`; `corrupt` is added to every output."""
    tensors = {t.name: {"dtype": t.numpy_dtype.name, "dims": list(t.dims)} for t in spec.inputs + spec.outputs}
    path.write_text(json.dumps({"format": FORMAT, "onnx": str(graph), "inputs": spec.input_names,
                                "outputs": spec.output_names, "tensors": tensors, "corrupt": corrupt,
                                "profiles": [{n: [list(s) for s in r] for n, r in p.items()} for p in profiles]}))
    return path


def module(memory: Memory, version: str = "10.5.0.18") -> types.ModuleType:
    """A `tensorrt` module double whose engines reach their buffers through `memory`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan: bytes):
            trt.calls.append(("deserialize", self.engine_host_code_allowed))
            try:
                described = json.loads(bytes(plan))
            except ValueError:
                described = {}
            if not isinstance(described, dict) or described.get("format") != FORMAT:
                self.logger.log(ILogger.Severity.ERROR, "the double reads only its own JSON plans")
                return None
            return Engine(described)

    class Engine:
        def __init__(self, described: dict):
            self.plan = described
            self.num_optimization_profiles = len(described["profiles"])
            self.session = onnxruntime_session(Path(described["onnx"]), threads=1)

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self.plan["profiles"][index][name]]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine: Engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            trt.calls.append(("profile", id(self), index, stream))
            if not 0 <= index < self.engine.num_optimization_profiles:
                return False
            self.profile = index
            return True

        def set_input_shape(self, name: str, shape) -> bool:
            low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
            shape = tuple(shape)
            trt.calls.append(("input shape", name, shape))
            if not all(lo <= n <= hi for lo, n, hi in zip(low, shape, high)) or len(shape) != len(low):
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            """As TensorRT: inferred from the input shapes; -1 where an input shape it needs is not set yet."""
            sizes = {}
            for input_name in self.engine.plan["inputs"]:
                dims = self.engine.plan["tensors"][input_name]["dims"]
                for dim, size in zip(dims, self.shapes.get(input_name, [-1] * len(dims))):
                    sizes.setdefault(dim, size)
            dims = self.engine.plan["tensors"][name]["dims"]
            return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in dims)

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream: int) -> bool:
            plan = self.engine.plan
            trt.calls.append(("execute", self.profile, stream))
            if set(self.shapes) != set(plan["inputs"]) or set(self.addresses) != set(plan["inputs"] + plan["outputs"]):
                return False
            shapes, addresses = dict(self.shapes), dict(self.addresses)
            outputs = {n: self.get_tensor_shape(n) for n in plan["outputs"]}

            def work():  # in stream order: after the input copies queued before it
                feeds = {n: memory.read(addresses[n], shapes[n], np.dtype(plan["tensors"][n]["dtype"])).copy()
                         for n in plan["inputs"]}
                results = self.engine.session.run(plan["outputs"], feeds)
                for name, result in zip(plan["outputs"], results):
                    if tuple(result.shape) != outputs[name]:
                        raise AssertionError(f"{name}: the graph gives {result.shape}, TensorRT said {outputs[name]}")
                    memory.write(addresses[name], result + plan["corrupt"])

            memory.enqueue(stream, work)
            return True

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


class HostDevice:
    """The runner's Device in host memory, and the double's Memory: numpy buffers found by address, work queued on
    one stream and run at synchronize (so outputs read before it are the NaN an unwritten buffer holds)."""

    stream = 7

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.pending: list[Callable[[], None]] = []
        self.synchronized = 0

    def _keep(self, array: np.ndarray) -> Buffer:
        self.buffers[array.ctypes.data] = array
        return Buffer(array.ctypes.data, array)

    def upload(self, array: np.ndarray) -> Buffer:
        return self._keep(np.array(array, copy=True, order="C"))

    def empty(self, shape, dtype) -> Buffer:
        if min(shape, default=1) < 0:
            raise ValueError(f"cannot allocate shape {shape}")
        return self._keep(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype))

    def synchronize(self) -> None:
        self.synchronized += 1
        work, self.pending = self.pending, []
        for run in work:
            run()

    def download(self, buffer: Buffer) -> np.ndarray:
        return buffer.data.copy()

    def read(self, address: int, shape, dtype) -> np.ndarray:
        array = self.buffers[address]
        if array.shape != tuple(shape) or array.dtype != dtype:
            raise AssertionError(f"buffer {address:#x} holds {array.dtype}{array.shape}, read as {dtype}{shape}")
        return array

    def write(self, address: int, array: np.ndarray) -> None:
        target = self.buffers[address]
        if target.shape != array.shape:
            raise AssertionError(f"buffer {address:#x} holds {target.shape}, written {array.shape}")
        target[...] = array

    def enqueue(self, stream: int, work: Callable[[], None]) -> None:
        if stream != self.stream:
            raise AssertionError(f"work queued on stream {stream}, not the device's {self.stream}")
        self.pending.append(work)


class CudaMemoryDevice(CudaDevice):
    """packager's CudaDevice (real CUDA buffers and stream) that the double can read and write (GPU hosts)."""

    def __init__(self):
        super().__init__()
        self.buffers = {}

    def upload(self, array):
        buffer = super().upload(array)
        self.buffers[buffer.address] = buffer.data
        return buffer

    def empty(self, shape, dtype):
        buffer = super().empty(shape, dtype)
        self.buffers[buffer.address] = buffer.data
        return buffer

    def read(self, address: int, shape, dtype) -> np.ndarray:
        with self._torch.cuda.stream(self._stream):
            return self.buffers[address].reshape(shape).cpu().numpy().astype(dtype, copy=False)

    def write(self, address: int, array: np.ndarray) -> None:
        target = self.buffers[address]
        with self._torch.cuda.stream(self._stream):
            target.copy_(self._torch.from_numpy(np.ascontiguousarray(array)).to(target.dtype).reshape(target.shape))

    def enqueue(self, stream: int, work: Callable[[], None]) -> None:
        if stream != self.stream:
            raise AssertionError(f"work queued on stream {stream}, not the device's {self.stream}")
        work()  # copies queued on the device's stream, in order with the runner's
