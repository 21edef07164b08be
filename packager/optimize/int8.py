"""The `int8` level (CPU): static int8 of the fused graph, the same for a text whatever its batch mates.

Every quantized node reads its activation through a QuantizeLinear with a CONSTANT scale and zero point chosen on
calibration text (packager.optimize.calibration, never the validation text): a token's int8 codes depend only on its
own values, the int8 products are exact integers, and everything else works per token or per masked row. So a
text's answer does not depend on the requests the dynamic batcher joins it with, nor on their padded length
(dynamic quantization, with one activation scale per batch tensor, moved MiniLM's token embeddings by up to 0.4).

    MatMul(x, W)          -> [Mul(x, 1/s)] -> QuantizeLinear -> MatMulIntegerToFloat(x8, W8)
                             [+ MatMulIntegerToFloat(x8, R8) on W's rounding residual] [+ x[:, C] @ W[C] in fp32]
    Attention(x, W, b, m) -> [Mul(x, 1/s)] -> QuantizeLinear -> QAttention(x8, W8, b, m)

Weights are per output column; with 7-bit codes ([-64, 64], the default) the u8s8 kernels of AVX2 and of AVX-512
without VNNI cannot saturate their 16-bit pair sums (2 * 255 * 64 < 32767), so every x86 class computes the same
integers and the gate passed here holds on each of them. 8-bit codes hold only on the class that gated them.
Smoothing (s), the fp32 outlier channels (C) and the range of each node come from int8_plan. The feed-forward
MatMuls get a weight residual (R8). When the gate still fails, more MatMuls get a residual, then the nodes whose
product loses most keep fp32, one more at a time, up to the recipe's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from packager.cpu import cpu_class
from packager.errors import PackagerError, first_line
from packager.optimize.base import LevelGraph, LevelInputs
from packager.optimize.calibration import calibration_examples, calibration_texts
from packager.optimize.int8_plan import NodePlan, capture, plan_node, weight_codes
from packager.validate import ParityReport, onnxruntime_runner, token_lengths, tokenize

MS_DOMAIN = "com.microsoft"
INT8_OPS = ("MatMul", "Attention")
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Choice:
    """Which nodes get a weight residual and which stay fp32 (the rest is int8 as planned)."""

    residual: tuple[str, ...]
    fp32: tuple[str, ...] = ()


def build_int8(inputs: LevelInputs) -> LevelGraph:
    settings = inputs.settings.int8
    fused = inputs.built["fused"]
    model = onnx.load(str(fused.path))
    plans = calibrate(model, inputs)
    path = inputs.output("int8")
    choice = Choice(feed_forward_matmuls(model) if settings.ffn_residuals else ())
    planned = _gate(inputs, write(model, plans, choice, settings.weight_bits, path))
    report = planned
    notes = [f"static int8 ({settings.weight_bits}-bit weights) calibrated on {len(calibration_texts())} texts; "
             f"{len(choice.residual)} feed-forward MatMul(s) with a weight residual"]
    if not report.passed:
        choice, report, tried = _search(inputs, model, plans, choice, planned, path)
        notes.append(tried)
    notes.append("fp32 outlier channels: " + (", ".join(f"{p.name} {len(p.outliers)}" for p in plans.values()
                                                      if len(p.outliers)) or "none"))
    valid_for = None if settings.weight_bits == 7 else (cpu_class(),)
    return LevelGraph(path, fused.fusions, tuple(notes), report, valid_for)


def calibrate(model: onnx.ModelProto, inputs: LevelInputs) -> dict[str, NodePlan]:
    """Every int8 node's plan, from the calibration text's activations at real tokens."""
    settings = inputs.settings.int8
    nodes = int8_nodes(model)
    weights = {init.name: init for init in model.graph.initializer}
    activations = capture(model, list(dict.fromkeys(node.input[0] for node in nodes)), _calibration_batches(inputs),
                          _mask_input(inputs))
    return {
        node.name: plan_node(node.name, node.op_type, activations[node.input[0]],
                             numpy_helper.to_array(weights[node.input[1]]).astype(np.float32),
                             settings.weight_bits, settings.smooth, settings.max_outlier_channels)
        for node in nodes
    }


def write(model: onnx.ModelProto, plans: dict[str, NodePlan], choice: Choice, bits: int, path: Path) -> Path:
    """The int8 graph of `model` under `plans` and `choice`, saved to `path`."""
    try:
        onnx.save(_quantized(model, plans, choice, bits), str(path))
    except (ValueError, KeyError) as exc:
        raise PackagerError(f"int8 quantization failed: {first_line(exc)}") from None
    return path


def _search(inputs: LevelInputs, model: onnx.ModelProto, plans: dict[str, NodePlan], choice: Choice,
            planned: ParityReport, path: Path) -> tuple[Choice, ParityReport, str]:
    """More weight residuals, then fp32 nodes, each on the nodes that lose most first, until the gate passes."""
    settings = inputs.settings.int8
    order = sorted(plans, key=lambda name: plans[name].error, reverse=True)
    residual_candidates = [n for n in order if plans[n].op == "MatMul" and n not in choice.residual]
    steps = [Choice(choice.residual + tuple(residual_candidates[:count]))
             for count in range(1, min(settings.max_residual_nodes, len(residual_candidates)) + 1)]
    widest = steps[-1].residual if steps else choice.residual
    steps += [Choice(widest, tuple(order[:count])) for count in range(1, min(settings.max_fp32_nodes, len(order)) + 1)]
    for step in steps:
        report = _gate(inputs, write(model, plans, step, settings.weight_bits, path))
        if report.passed:
            return step, report, f"search: passed with {_describe(step, choice)}"
    write(model, plans, choice, settings.weight_bits, path)  # the graph left behind is the planned one, as gated
    last = _describe(steps[-1], choice) if steps else "nothing to try (limits are 0)"
    return choice, planned, f"search: failed the gate with up to {last}"


def _describe(step: Choice, start: Choice) -> str:
    added = [name for name in step.residual if name not in start.residual]
    parts = [f"{len(added)} more weight residual(s) ({', '.join(added)})" if added else "",
             f"{len(step.fp32)} node(s) kept in fp32 ({', '.join(step.fp32)})" if step.fp32 else ""]
    return "; ".join(part for part in parts if part) or "the plan"


def _gate(inputs: LevelInputs, path: Path) -> ParityReport:
    return inputs.validator.check("int8", onnxruntime_runner(path, inputs.exported.spec), inputs.gates.int8)


def int8_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul and Attention nodes whose weight is a constant: what becomes int8."""
    constants = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type in INT8_OPS and node.input[1] in constants]


def feed_forward_matmuls(model: onnx.ModelProto) -> tuple[str, ...]:
    """The feed-forward MatMuls: a constant weight that is not square (hidden -> intermediate, and back)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return tuple(node.name for node in int8_nodes(model)
                 if node.op_type == "MatMul" and len(set(shapes[node.input[1]])) > 1)


def _calibration_batches(inputs: LevelInputs) -> list[dict[str, np.ndarray]]:
    """The calibration texts sorted by length, in batches padded to their longest (truncated at the profile's max)."""
    tokenizer, spec, task = inputs.loaded.tokenizer, inputs.exported.spec, inputs.task
    limit = max(batch.sequence for batch in inputs.validator.batches)  # the profile's max: the truncation length
    texts = calibration_examples(task.pairs, task.truncation == "only_second")
    lengths = token_lengths(tokenizer, task, texts, limit)
    ordered = sorted(zip(lengths, range(len(texts))))
    chunks = [ordered[start:start + CALIBRATION_BATCH] for start in range(0, len(ordered), CALIBRATION_BATCH)]
    return [tokenize(tokenizer, spec, [texts[index] for _, index in chunk], chunk[-1][0], task.truncation)
            for chunk in chunks]


def _mask_input(inputs: LevelInputs) -> str | None:
    """The input that marks real tokens, when the graph has one."""
    spec = inputs.exported.spec
    return "attention_mask" if "attention_mask" in spec.input_names else None


def _quantized(model: onnx.ModelProto, plans: dict[str, NodePlan], choice: Choice, bits: int) -> onnx.ModelProto:
    """A copy of `model` with every planned node (not kept fp32) in its static int8 form."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {init.name: init for init in graph.initializer}
    replaced, nodes, constants = set(), [], []

    def constant(name: str, array: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        plan = plans.get(node.name)
        if plan is None or node.name in choice.fp32:
            nodes.append(node)
            continue
        replaced.add(node.input[1])
        nodes += _int8_node(node, plan, numpy_helper.to_array(weights[node.input[1]]).astype(np.float32),
                            node.name in choice.residual, bits, constant)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + constants)
    return out


def _int8_node(node: onnx.NodeProto, plan: NodePlan, weight: np.ndarray, residual: bool, bits: int,
               constant) -> list[onnx.NodeProto]:
    """The nodes that replace one MatMul or Attention node."""
    base, x, nodes = node.name, node.input[0], []
    if plan.smooth is not None:
        weight = weight * plan.smooth[:, None]
        inverse = constant(f"{base}_smooth_inverse", (1.0 / plan.smooth).astype(np.float32))
        nodes.append(helper.make_node("Mul", [x, inverse], [f"{base}_smoothed"], name=f"{base}_smooth"))
        x = f"{base}_smoothed"
    a_scale = constant(f"{base}_a_scale", np.array(plan.a_scale, np.float32))
    a_zero = constant(f"{base}_a_zero", np.array(plan.a_zero, np.uint8))
    codes_in = f"{base}_x_int8"
    nodes.append(helper.make_node("QuantizeLinear", [x, a_scale, a_zero], [codes_in], name=f"{base}_quantize"))
    int8_weight = weight.copy()
    int8_weight[plan.outliers] = 0.0
    codes, w_scale = weight_codes(int8_weight, bits)
    w_codes, w_scales = constant(f"{base}_w_int8", codes), constant(f"{base}_w_scale", w_scale)
    if node.op_type == "Attention":
        mask = node.input[3] if len(node.input) > 3 else ""
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(helper.make_node("QAttention", [codes_in, w_codes, node.input[2], a_scale, w_scales, mask, a_zero],
                                      list(node.output), name=f"{base}_int8", domain=MS_DOMAIN, **attributes))
        return nodes
    parts = [f"{base}_int8_product"]
    nodes.append(helper.make_node("MatMulIntegerToFloat", [codes_in, w_codes, a_scale, w_scales, a_zero],
                                  parts[:1], name=f"{base}_int8", domain=MS_DOMAIN))
    if residual:
        r_codes, r_scale = weight_codes(int8_weight - codes.astype(np.float32) * w_scale, bits)
        parts.append(f"{base}_residual_product")
        nodes.append(helper.make_node(
            "MatMulIntegerToFloat",
            [codes_in, constant(f"{base}_r_int8", r_codes), a_scale, constant(f"{base}_r_scale", r_scale), a_zero],
            parts[-1:], name=f"{base}_residual_int8", domain=MS_DOMAIN))
    if len(plan.outliers):
        unsmoothed = weight if plan.smooth is None else weight / plan.smooth[:, None]
        channels = constant(f"{base}_outlier_channels", plan.outliers)
        nodes += [
            helper.make_node("Gather", [node.input[0], channels], [f"{base}_outlier_x"], name=f"{base}_outlier_x",
                             axis=-1),
            helper.make_node("MatMul", [f"{base}_outlier_x", constant(f"{base}_outlier_w", unsmoothed[plan.outliers])],
                             [f"{base}_outlier_product"], name=f"{base}_outlier_fp32"),
        ]
        parts.append(f"{base}_outlier_product")
    total = parts[0]
    for index, part in enumerate(parts[1:], 1):
        result = node.output[0] if index == len(parts) - 1 else f"{base}_sum{index}"
        nodes.append(helper.make_node("Add", [total, part], [result], name=f"{base}_add{index}"))
        total = result
    if len(parts) == 1:
        nodes[-1].output[0] = node.output[0]
    return nodes
