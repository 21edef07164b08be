"""The `int8` level (CPU): dynamic int8 quantization of the fused graph, with the search that keeps it within its
gate.

1. smoothing: each quantized MatMul/Attention input is divided per channel by s (a Mul node) and the weight rows
   multiplied by s, exact in fp32; s = max|x|^a / max|w|^(1-a), with x measured on CALIBRATION_TEXTS (not the
   validation text) and a chosen per node by the simulated quantization error;
2. if the gate still fails, the MatMuls whose quantization alone hurts most on the validation text get a weight
   residual (a second int8 MatMul on w - dequantized(quantized(w)), added to the first: the weight's int8 error
   is gone at about twice the int8 cost of the node), one more at a time, up to `max_residual_nodes`;
3. if that is not enough, the most sensitive nodes stay fp32 instead (about 4x the int8 cost of the node), one
   more at a time, up to `max_fp32_nodes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from packager.cpu import cpu_class
from packager.errors import PackagerError, first_line
from packager.optimize.base import LevelGraph, LevelInputs, quiet
from packager.validate import OutputSummary, ParityReport, Validator, onnxruntime_runner, tokenize

INT8_OPS = ("MatMul", "Attention")
# Smoothing statistics come from these texts, never from validate.VALIDATION_TEXTS (which is the gate's data).
CALIBRATION_TEXTS = (
    "The weather is lovely today and we are going for a walk in the park.",
    "Machine learning models are deployed behind an inference server.",
    "She sold her old car and bought a bicycle instead.",
    "How many people live in the largest city of the country?",
    "Please send me the report before the meeting on Monday.",
    "Les enfants jouent dans le jardin.",
    "Der Zug fährt um acht Uhr ab.",
    "Thanks!",
    "ok",
    "",
)
# How much quantizing one node moves the metric output, per task metric.
SENSITIVITY: dict[str, Callable[[OutputSummary], float]] = {
    "cosine": lambda output: 1 - output.metric_value,
    "argmax": lambda output: output.max_rel,  # agreement is too coarse to rank nodes
}
SMOOTHING_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def build_int8(inputs: LevelInputs) -> LevelGraph:
    settings = inputs.settings.int8
    source = inputs.built["fused"]
    model = onnx.load(str(source.path))
    notes = []
    if settings.smooth:
        smoothed = smooth_model(model, _capture_inputs(model, _int8_nodes(model), _calibration_inputs(inputs)))
        notes.append(f"smoothed {smoothed} MatMul/Attention inputs (per-channel scales from {len(CALIBRATION_TEXTS)} calibration texts)")
    path = quantize_int8(model, inputs.output("int8"), settings.per_channel)
    report = _gate_int8(inputs, path)
    if not report.passed:
        remedy, chosen, report = _search_remedies(inputs, model, path, report)
        done = REMEDIES[remedy].done.format(count=len(chosen))
        notes.append(f"{done}: {', '.join(chosen)}" if report.passed else f"failed the gate with up to {done}")
    here = cpu_class()
    notes.append(f"dynamic u8s8 int8 gated on this {here} machine: other CPU classes may compute it differently")
    return LevelGraph(path, source.fusions, tuple(notes), report, valid_for=(here,))


def _gate_int8(inputs: LevelInputs, path: Path) -> ParityReport:
    return inputs.validator.check("int8", onnxruntime_runner(path, inputs.exported.spec), inputs.gates.int8)


def quantize_int8(model: onnx.ModelProto, path: Path, per_channel: bool, exclude: list[str] | None = None,
                  only: list[str] | None = None) -> Path:
    """Dynamic int8 quantization (uint8 activations, int8 weights) of `model`'s MatMul/Attention nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet():
            quantize_dynamic(
                model, path, op_types_to_quantize=list(INT8_OPS), per_channel=per_channel, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or [], nodes_to_quantize=only or [],
                # the fused graph's contrib-op outputs have no inferred types; they are all float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except Exception as exc:
        raise PackagerError(f"int8 quantization failed: {first_line(exc)}") from None
    return path


def _search_remedies(
    inputs: LevelInputs, model: onnx.ModelProto, path: Path, report: ParityReport
) -> tuple[str, list[str], ParityReport]:
    """Apply each remedy (REMEDIES, cheapest first) to the most sensitive nodes, one more at a time up to its
    limit, until the gate passes. Returns the remedy, the nodes it was applied to and the last gate report.

    A node's sensitivity is how far the task metric output moves (SENSITIVITY) when only that node is quantized,
    on the validation batch at the profile's opt shape.
    """
    settings = inputs.settings.int8
    chosen: list[str] = []
    remedies = [name for name, remedy in REMEDIES.items() if getattr(settings, remedy.limit)]
    if not remedies:
        return "fp32", chosen, report
    order = _sensitivity_order(inputs, model)
    for name in remedies:
        remedy = REMEDIES[name]
        candidates = [node for node in order if remedy.applies(model, node)][: getattr(settings, remedy.limit)]
        for count in range(1, len(candidates) + 1):
            chosen = candidates[:count]
            report = _gate_int8(inputs, remedy.build(model, path, settings.per_channel, chosen))
            if report.passed:
                return name, chosen, report
    return name, chosen, report


def _sensitivity_order(inputs: LevelInputs, model: onnx.ModelProto) -> list[str]:
    """The int8 nodes, most sensitive first (see _search_remedies)."""
    probe = _opt_shape_validator(inputs.validator)
    scratch = inputs.work_dir / "int8-probe.onnx"
    sensitivity = {}
    for node in _int8_nodes(model):
        quantize_int8(model, scratch, inputs.settings.int8.per_channel, only=[node])
        moved = probe.check("int8-probe", onnxruntime_runner(scratch, inputs.exported.spec)).outputs()
        sensitivity[node] = SENSITIVITY[inputs.task.metric](moved[inputs.task.metric_output])
    scratch.unlink(missing_ok=True)
    return sorted(sensitivity, key=sensitivity.get, reverse=True)


def _with_weight_residuals(model: onnx.ModelProto, path: Path, per_channel: bool, nodes: list[str]) -> Path:
    """Quantize a copy of `model` in which each of `nodes` (MatMuls) has a weight residual (see add_weight_residuals)."""
    refined = onnx.ModelProto()
    refined.CopyFrom(model)
    add_weight_residuals(refined, nodes, per_channel)
    return quantize_int8(refined, path, per_channel)


def _with_fp32_nodes(model: onnx.ModelProto, path: Path, per_channel: bool, nodes: list[str]) -> Path:
    return quantize_int8(model, path, per_channel, exclude=nodes)


def add_weight_residuals(model: onnx.ModelProto, nodes: list[str], per_channel: bool) -> None:
    """In place: split each MatMul x @ w in `nodes` into x @ (w - r) + x @ r, r = w - dequantized(int8(w)).

    Exact in fp32. The int8 weight scales are the quantizer's (symmetric, max|w| / 127 per output column, or per
    tensor), so w - r quantizes without error and the sum of both int8 products carries the weight's quantization
    error only to the second order.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    nodes_out = []
    for node in model.graph.node:
        nodes_out.append(node)
        if node.name not in nodes:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        residual = int8_weight_residual(weight, per_channel)
        residual_name, partial, output = f"{node.name}_weight_residual", f"{node.name}_main", node.output[0]
        # w - r is int8(w) dequantized: it quantizes to the same int8 weight, and the sum stays exact in fp32
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight - residual, node.input[1]))
        model.graph.initializer.append(numpy_helper.from_array(residual, residual_name))
        node.output[0] = partial
        nodes_out += [
            helper.make_node("MatMul", [node.input[0], residual_name], [f"{residual_name}_product"], name=f"{residual_name}_MatMul"),
            helper.make_node("Add", [partial, f"{residual_name}_product"], [output], name=f"{residual_name}_Add"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes_out)


def int8_weight_residual(weight: np.ndarray, per_channel: bool) -> np.ndarray:
    """w - dequantized(symmetric int8 w), per output column (the last axis) or per tensor."""
    peak = np.abs(weight).max(axis=0, keepdims=True) if per_channel else np.abs(weight).max()
    step = np.maximum(peak, 1e-12) / 127
    return (weight - np.round(weight / step) * step).astype(np.float32)


def _is_matmul(model: onnx.ModelProto, name: str) -> bool:
    return next(node.op_type for node in model.graph.node if node.name == name) == "MatMul"


@dataclass(frozen=True)
class Remedy:
    limit: str  # the Int8Settings field with the most nodes it may be applied to
    applies: Callable[[onnx.ModelProto, str], bool]
    build: Callable[[onnx.ModelProto, Path, bool, list[str]], Path]
    done: str  # how the note says it was applied to {count} nodes


# Cheapest first (measured on MiniLM, 8x128: a weight residual costs about one more int8 MatMul, fp32 about four).
REMEDIES: dict[str, Remedy] = {
    "residual": Remedy("max_residual_nodes", _is_matmul, _with_weight_residuals,
                       "{count} most sensitive node(s) given a weight residual"),
    "fp32": Remedy("max_fp32_nodes", lambda _model, _node: True, _with_fp32_nodes, "{count} most sensitive node(s) kept in fp32"),
}


def _opt_shape_validator(validator: Validator) -> Validator:
    """The validator restricted to its batch at the profile's opt shape (the middle sizes), its reference reused."""
    batch, sequence = (_middle({getattr(b, axis) for b in validator.batches}) for axis in ("batch", "sequence"))
    index = next(i for i, b in enumerate(validator.batches) if (b.batch, b.sequence) == (batch, sequence))
    reference = validator.references[index]
    return Validator(validator.task, validator.spec, [validator.batches[index]], lambda _inputs: reference, validator.tolerances)


def _middle(values: set[int]) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _int8_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMul/Attention nodes with a constant weight: what dynamic quantization turns into int8."""
    initializers = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type in INT8_OPS and node.input[1] in initializers]


def _calibration_inputs(inputs: LevelInputs) -> dict[str, np.ndarray]:
    """CALIBRATION_TEXTS tokenized at the profile's opt sequence length (padded, as served batches are)."""
    sequence = _middle({batch.sequence for batch in inputs.validator.batches})
    return tokenize(inputs.loaded.tokenizer, inputs.exported.spec, list(CALIBRATION_TEXTS), sequence)


def _capture_inputs(model: onnx.ModelProto, nodes: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` on `inputs` and return each named node's activation input, flattened to (rows, channels)."""
    import onnxruntime as ort

    by_name = {node.name: node for node in model.graph.node}
    tensors = list(dict.fromkeys(by_name[name].input[0] for name in nodes))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(tensors, inputs)
    activations = {name: value.reshape(-1, value.shape[-1]) for name, value in zip(tensors, values)}
    return {name: activations[by_name[name].input[0]] for name in nodes}


def smooth_model(model: onnx.ModelProto, activations: dict[str, np.ndarray]) -> int:
    """Move activation outliers into the weights of each node in `activations`, in place; returns the count.

    x @ w == (x / s) @ (s[:, None] * w): a Mul by 1/s is inserted before the node and w's rows are scaled by s.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name in activations:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            scale = smoothing_scale(activations[node.name], weight)
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), node.input[1]))
            inverse = f"{node.name}_smooth_inverse_scale"
            model.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
            smoothed = f"{node.name}_smoothed_input"
            nodes.append(helper.make_node("Mul", [node.input[0], inverse], [smoothed], name=f"{node.name}_smooth"))
            node.input[0] = smoothed
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(activations)


def smoothing_scale(activation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per input channel s = max|x|^a / max|w|^(1-a), with a minimising the simulated int8 error of x @ w.

    Channel maxima are floored at their median so that a channel quiet in calibration cannot get a huge 1/s.
    """
    x_max = np.abs(activation).max(axis=0)
    w_max = np.abs(weight).max(axis=1)
    x_max = np.maximum(x_max, np.median(x_max))
    w_max = np.maximum(w_max, np.median(w_max))
    candidates = [x_max**alpha / w_max ** (1 - alpha) for alpha in SMOOTHING_ALPHAS]
    reference = activation @ weight
    errors = [_int8_error(activation / s, weight * s[:, None], reference) for s in candidates]
    return candidates[int(np.argmin(errors))].astype(np.float32)


def _int8_error(activation: np.ndarray, weight: np.ndarray, reference: np.ndarray) -> float:
    """Relative error of x @ w with x per-tensor asymmetric uint8 and w per-column symmetric int8, as ORT does."""
    low, high = min(float(activation.min()), 0.0), max(float(activation.max()), 0.0)
    step = max(high - low, 1e-12) / 255
    zero = np.round(-low / step)
    x = (np.clip(np.round(activation / step) + zero, 0, 255) - zero) * step
    w_step = np.maximum(np.abs(weight).max(axis=0, keepdims=True), 1e-12) / 127
    w = np.round(weight / w_step) * w_step
    return float(np.linalg.norm(x @ w - reference) / max(np.linalg.norm(reference), 1e-12))


