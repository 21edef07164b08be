"""fp16 graphs: the `fp16` level (the fused graph in fp16, for GPU) and the graph TensorRT builds fp16 engines from."""

from __future__ import annotations

from pathlib import Path

import onnx

from packager.errors import PackagerError, first_line
from packager.optimize.base import LevelGraph, LevelInputs, quiet

# Ops kept in fp32 in an fp16 graph: normalisation, softmax and the reductions/divisions of the pooling, whose
# sums and small denominators (clamp at 1e-9) lose too much in fp16. The fused LayerNorm/Attention contrib ops
# accumulate in fp32 internally and stay fp16.
FP16_KEEP_FP32_OPS = (
    "LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Div", "Clip",
)


def fp16_graph(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of `src` to `dst`: fp16 weights and compute, inputs and outputs in their original types,
    FP16_KEEP_FP32_OPS in fp32. Works on the plain export (for TensorRT) and on the fused graph (ORT contrib ops)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    try:
        with quiet():
            model.convert_float_to_float16(
                keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
            )
    except Exception as exc:
        raise PackagerError(f"fp16 conversion of {src.name} failed: {first_line(exc)}") from None
    model.topological_sort()  # the converter appends its Cast nodes at the end; parsers need graph order
    onnx.save(model.model, str(dst))
    return dst


def build_fp16(inputs: LevelInputs) -> LevelGraph:
    base = inputs.built["fused"]
    return LevelGraph(fp16_graph(base.path, inputs.output("fp16")), base.fusions)
