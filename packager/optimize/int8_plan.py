"""The numbers of static int8: weight codes, activation ranges, and each node's plan chosen on calibration text.

A node's plan fixes everything its int8 form needs before the graph is written: the smoothing scale s (x @ W ==
(x / s) @ (s W)), the activation channels left out of the int8 product (added back in fp32), and one constant
uint8 scale and zero point for its activation. Each choice minimises the simulated error of the node's product on
the calibration rows, so the plan depends on the calibration text only, never on the validation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

SMOOTHING_ALPHAS = (None, 0.7, 0.8, 0.9, 1.0)  # None: no smoothing
OUTLIER_COUNTS = (0, 1, 2, 4, 8)  # activation channels a MatMul may leave out of its int8 product
SEARCH_ROWS = 512  # calibration rows the choices are simulated on (plus each top channel's extreme rows)
SEED = 0


@dataclass(frozen=True)
class NodePlan:
    name: str
    op: str  # MatMul or Attention
    smooth: np.ndarray | None  # s per input channel, or None
    outliers: np.ndarray  # input channels computed in fp32 instead of int8 (MatMul only)
    a_scale: float  # uint8 activation scale and zero point, constant: the same for every batch
    a_zero: int
    error: float  # simulated relative error of the node's product: how sensitive the node is


def weight_codes(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes per output column (last axis) and their scales. 7 bits keep codes in [-64, 64]."""
    limit = {8: 127, 7: 64}[bits]
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / limit
    codes = np.clip(np.round(weight / scale), -limit, limit).astype(np.int8)
    return codes, scale.astype(np.float32)


def activation_range(low: float, high: float) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point covering [low, high] (widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return float(np.float32(scale)), int(np.clip(np.round(-low / scale), 0, 255))


def _fake_quantized(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    codes = np.clip(np.round(x / np.float32(scale)) + zero, 0, 255)
    return ((codes - zero) * np.float32(scale)).astype(np.float32)


def capture(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
            mask_input: str | None) -> dict[str, np.ndarray]:
    """Each tensor's rows at real tokens (where `mask_input` is 1; every row without a mask), over all batches.

    A tensor that is not per token (DeBERTa's relative position embeddings, [1, positions, hidden]) gives all rows.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {output.name for output in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in tensors if name not in known)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    rows: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for batch in batches:
        values = session.run(tensors, {name: batch[name] for name in inputs})
        real = batch[mask_input].astype(bool) if mask_input else np.ones(batch[inputs[0]].shape, bool)
        for name, value in zip(tensors, values):
            per_token = value.shape[:real.ndim] == real.shape
            rows[name].append((value[real] if per_token else value.reshape(-1, value.shape[-1])).astype(np.float32))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def plan_node(name: str, op: str, x: np.ndarray, weight: np.ndarray, bits: int, smooth: bool,
              max_outliers: int) -> NodePlan:
    """The outlier channels, smoothing and activation range of one node with the least simulated error.

    A larger outlier set must lower the error by 5% to be kept. The activation range is the min/max of all
    calibration rows once smoothed, outliers excluded (they clip harmlessly: their weight rows are zero in int8).
    """
    rows = _search_rows(x)
    reference = rows @ weight
    norm = max(float(np.linalg.norm(reference)), 1e-12)
    x_peak, w_peak = np.abs(x).max(axis=0), np.abs(weight).max(axis=1)
    counts = [k for k in OUTLIER_COUNTS if k <= max_outliers] if op == "MatMul" else [0]
    best: NodePlan | None = None
    for count in counts:
        outliers = np.sort(np.argsort(-x_peak)[:count]).astype(np.int64)
        keep = np.ones(x.shape[1], bool)
        keep[outliers] = False
        side = rows[:, outliers] @ weight[outliers] if count else 0.0
        for alpha in SMOOTHING_ALPHAS if smooth else (None,):
            scale = None if alpha is None else _smoothing_scale(np.where(keep, x_peak, np.median(x_peak)), w_peak,
                                                                alpha, keep)
            smoothed = rows if scale is None else rows / scale
            codes, w_scale = weight_codes((weight if scale is None else weight * scale[:, None]) * keep[:, None], bits)
            dequantized = codes.astype(np.float32) * w_scale
            a_scale, a_zero = activation_range(float(smoothed[:, keep].min()), float(smoothed[:, keep].max()))
            product = _fake_quantized(smoothed, a_scale, a_zero) @ dequantized + side
            error = float(np.linalg.norm(product - reference)) / norm
            margin = 0.95 if best is not None and count > len(best.outliers) else 1.0
            if best is None or error < best.error * margin:
                best = NodePlan(name, op, scale, outliers, a_scale, a_zero, error)
    keep = np.ones(x.shape[1], bool)
    keep[best.outliers] = False
    smoothed = (x if best.smooth is None else x / best.smooth)[:, keep]
    a_scale, a_zero = activation_range(float(smoothed.min()), float(smoothed.max()))
    return NodePlan(best.name, op, best.smooth, best.outliers, a_scale, a_zero, best.error)


def _smoothing_scale(x_peak: np.ndarray, w_peak: np.ndarray, alpha: float, keep: np.ndarray) -> np.ndarray:
    """s = max|x|^a / max|w|^(1-a) per input channel, maxima floored at their median; 1 on outlier channels."""
    x_peak = np.maximum(x_peak, np.median(x_peak))
    w_peak = np.maximum(w_peak, np.median(w_peak))
    scale = (x_peak**alpha / w_peak ** (1 - alpha)).astype(np.float32)
    scale[~keep] = 1.0
    return scale


def _search_rows(x: np.ndarray) -> np.ndarray:
    """SEARCH_ROWS random rows, plus the rows holding the extremes of the 32 channels with the largest max|x|."""
    if len(x) <= SEARCH_ROWS:
        return x
    top = np.argsort(-np.abs(x).max(axis=0))[:32]
    extremes = np.concatenate([x[:, top].argmax(axis=0), x[:, top].argmin(axis=0), [np.abs(x).max(axis=1).argmax()]])
    picked = np.random.default_rng(SEED).choice(len(x), size=SEARCH_ROWS, replace=False)
    return x[np.unique(np.concatenate([picked, extremes]))]
