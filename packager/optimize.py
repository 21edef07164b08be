"""Graph optimization levels: fused attention (fp32), int8 for CPU, fp16 for GPU, each behind the parity gate."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from packager.errors import PackagerError, first_line

# Ops kept in fp32 in an fp16 graph: normalisation, softmax and the reductions/divisions of the pooling, whose
# sums and small denominators (clamp at 1e-9) lose too much in fp16. Casts are inserted around them.
FP16_KEEP_FP32_OPS = (
    "LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "SimplifiedLayerNormalization",
    "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Div", "Clip",
)


def fp16_graph(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of `src` to `dst`: fp16 weights and compute, inputs and outputs in their original types,
    FP16_KEEP_FP32_OPS in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = convert_float_to_float16(
                model, keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
            )
    except Exception as exc:
        raise PackagerError(f"fp16 conversion of {src.name} failed: {first_line(exc)}") from None
    sorted_model = OnnxModel(half)
    sorted_model.topological_sort()  # the converter appends its Cast nodes at the end; parsers need graph order
    onnx.save(sorted_model.model, str(dst))
    return dst
