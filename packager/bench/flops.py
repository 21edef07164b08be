"""The model's FLOPs per inference, counted on its ONNX graph, and this machine's peak per precision."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from packager import validate
from packager.bench.options import Shape
from packager.errors import PackagerError, first_line
from packager.iospec import IOSpec
from packager.iospec import BATCH, SEQUENCE

PEAK_REPEATS = 5


def model_flops(path: Path, spec: IOSpec, shapes: Sequence[Shape]) -> dict[Shape, float]:
    """Floating-point operations of one inference at each (batch, sequence), counted from the ONNX graph.

    Method: the graph's inputs are given the concrete batch and sequence, ONNX Runtime's symbolic shape inference
    (which also knows its contrib ops) gives every tensor its concrete shape, and each matrix product is counted as
    2 × multiply-accumulates with those shapes: MatMul and MatMulInteger (broadcast batch dims × M × K × N), Gemm
    (M × K × N) and the fused Attention (the QKV projection, QKᵀ and softmax·V). Element-wise work (LayerNorm,
    GELU, softmax, adds) is left out: it is about 1% of BERT's products at sequence 128. Padded positions count: the
    graph computes them. The bench counts the plain export: the fused graph does the same products (the tests check
    that both give the same number) and the int8 graph does them as integer multiply-accumulates.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    counts = {}
    for batch, sequence in shapes:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for tensor in fixed.graph.input:
            for dim in tensor.type.tensor_type.shape.dim:
                if dim.dim_param in (BATCH, SEQUENCE):
                    dim.dim_value = batch if dim.dim_param == BATCH else sequence
        try:
            with _working_directory(tempfile.mkdtemp(prefix="flops.")):  # a failed inference saves there
                inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
        except Exception as exc:  # the inference raises bare Exceptions
            raise PackagerError(f"cannot infer the shapes of {path.name} at {batch}x{sequence}: {first_line(exc)}") \
                from None
        counts[(batch, sequence)] = _count_flops(inferred.graph, path.name)
    return counts


@contextmanager
def _working_directory(folder: str) -> Iterator[str]:
    """Run in `folder`, then remove it and return (ONNX Runtime's shape inference saves its model into the working
    directory when it fails)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
        shutil.rmtree(folder, ignore_errors=True)


def _count_flops(graph: onnx.GraphProto, where: str) -> float:
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def shape_of(name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise PackagerError(f"cannot count FLOPs of {where}: tensor '{name}' has no concrete shape ({dims})")
        return dims

    counted = (node for node in graph.node if node.op_type in FLOP_COUNTERS)
    return float(sum(FLOP_COUNTERS[node.op_type](node, shape_of) for node in counted))


def _matmul_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    a, b = ([1, *a] if len(a) == 1 else a), ([*b, 1] if len(b) == 1 else b)
    batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def _gemm_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    rows, inner = (a[1], a[0]) if attributes.get("transA") else (a[0], a[1])
    columns = b[0] if attributes.get("transB") else b[1]
    return 2.0 * rows * inner * columns


def _attention_flops(node: onnx.NodeProto, shape_of: Callable[[str], list[int]]) -> float:
    """com.microsoft Attention: input [B, S, H_in] × weights [H_in, Hq+Hk+Hv], then QKᵀ and softmax·V per head."""
    batch, sequence, hidden_in = shape_of(node.input[0])
    projected = shape_of(node.input[1])[1]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    q_size, _, v_size = attributes.get("qkv_hidden_sizes") or [projected // 3] * 3
    return 2.0 * batch * sequence * hidden_in * projected + 2.0 * batch * sequence * sequence * (q_size + v_size)


FLOP_COUNTERS: dict[str, Callable[[onnx.NodeProto, Callable[[str], list[int]]], float]] = {
    "MatMul": _matmul_flops,
    "MatMulInteger": _matmul_flops,
    "Gemm": _gemm_flops,
    "Attention": _attention_flops,
}


@dataclass(frozen=True)
class Peak:
    precision: str
    gflops: float  # GFLOP/s (fp32) or GOP/s (int8): the best of the repeats
    method: str


def measure_peaks(threads: int, size: int = 2048, repeats: int = PEAK_REPEATS) -> dict[str, Peak]:
    """This machine's limit per precision: the fastest of `repeats` large square matrix products (after a warmup).

    fp32: torch.matmul. int8: ONNX Runtime's MatMulInteger (uint8 × int8 → int32), the kernel its dynamically
    quantized graphs run (VNNI where the CPU has it).
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _fastest(lambda: torch.matmul(a, b), repeats)
    session, feed = _int8_matmul_session(size, threads)
    int8 = _fastest(lambda: session.run(None, feed), repeats)
    operations, how = 2.0 * size**3, f"{size}x{size}, {threads} threads, best of {repeats}"
    return {
        "fp32": Peak("fp32", operations / fp32 / 1e9, f"torch.matmul fp32 {how}"),
        "int8": Peak("int8", operations / int8 / 1e9, f"ONNX Runtime MatMulInteger u8xs8 {how}"),
    }


def best_peaks(*runs: dict[str, Peak]) -> dict[str, Peak]:
    """Per precision the highest of several measurements: other load on the machine only ever lowers one."""
    return {name: max((run[name] for run in runs), key=lambda peak: peak.gflops) for name in runs[0]}


def _fastest(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def _int8_matmul_session(size: int, threads: int):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = rng.integers(-128, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "peak_int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])],
        [onnx.numpy_helper.from_array(weights, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory(prefix="peak.") as folder:
        path = Path(folder) / "matmul_int8.onnx"
        onnx.save(model, str(path))
        session = validate.onnxruntime_session(path, threads)
    return session, {"A": rng.integers(0, 256, (size, size), dtype=np.uint8)}
