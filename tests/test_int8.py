"""The int8 level: static activation scales (batch-invariant by construction), 7-bit weights (the same integers on
every x86 class), outlier channels, weight residuals and the search, on the tiny models with real ONNX Runtime.

The assertions are about mechanisms (what the graph holds, what the search tried, what the gate decided), never a
threshold next to today's measured accuracy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.cpu import CPU_CLASSES, cpu_class
from packager.optimize import int8
from packager.optimize.calibration import calibration_texts
from packager.optimize.int8_plan import activation_range, capture, plan_node, weight_codes
from packager.validate import VALIDATION_TEXTS
from tests.test_optimize import make_stage

INT8_KERNELS = ("MatMulIntegerToFloat", "QAttention")


@pytest.fixture(scope="module")
def embeddings(tiny_recipe_embeddings, tmp_path_factory):
    return make_stage(tiny_recipe_embeddings, tmp_path_factory.mktemp("export"))


def run_int8(stage, tmp_path, settings: dict | None = None, **gate):
    """The int8 level (and fused, so that a failing int8 still leaves a level to ship), with [optimize.int8]
    settings and [gates.int8] keys."""
    recipe = stage.changed({"cpu": ["fused", "int8"], "int8": settings or {}}, int8=gate)
    return stage.run(tmp_path, recipe=recipe).level("int8")


@pytest.fixture(scope="module")
def default_int8(embeddings, tmp_path_factory):
    return run_int8(embeddings, tmp_path_factory.mktemp("int8"))


def graph_of(level) -> onnx.GraphProto:
    return onnx.load(str(level.path)).graph


def int8_weights(graph: onnx.GraphProto) -> list[np.ndarray]:
    """The weight codes every int8 kernel multiplies with (residual products included)."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return [constants[node.input[1]] for node in graph.node if node.op_type in INT8_KERNELS]


def test_activation_scales_are_constants_so_answers_do_not_depend_on_batch_mates(default_int8):
    graph = graph_of(default_int8)
    ops = [node.op_type for node in graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    constants = {init.name for init in graph.initializer}
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    assert quantizers and all(node.input[1] in constants and node.input[2] in constants for node in quantizers)
    assert default_int8.invariance.passed and default_int8.invariance.max_abs <= 1e-5, default_int8.invariance.reason


def test_seven_bit_weights_cannot_saturate_so_the_gate_holds_on_every_x86_class(default_int8):
    weights = int8_weights(graph_of(default_int8))
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64 for w in weights)
    assert default_int8.valid_for is None  # every class: 2 * 255 * 64 = 32640 fits the 16-bit pair sums
    assert set(CPU_CLASSES) == {"avx2", "avx512", "avx512-vnni"}


def test_eight_bit_weights_hold_only_on_the_class_that_gated_them(embeddings, tmp_path):
    level = run_int8(embeddings, tmp_path, {"weight_bits": 8}, max_invariance=float("inf"), min_cosine=-1.0,
                     min_argmax_agreement=0.0)
    assert max(np.abs(w.astype(np.int32)).max() for w in int8_weights(graph_of(level))) == 127
    assert level.valid_for == (cpu_class(),)


def test_the_feed_forward_matmuls_get_a_weight_residual(default_int8):
    graph = graph_of(default_int8)
    residuals = [node for node in graph.node if node.name.endswith("_residual_int8")]
    assert len(residuals) == 4  # two layers, each with its up and down projection
    assert all(node.op_type == "MatMulIntegerToFloat" for node in residuals)


def attempts(monkeypatch) -> list[int8.Choice]:
    """Record every choice the int8 level writes a graph for."""
    seen, write = [], int8.write

    def recording(model, plans, choice, bits, path):
        seen.append(choice)
        return write(model, plans, choice, bits, path)

    monkeypatch.setattr(int8, "write", recording)
    return seen


def test_the_search_adds_weight_residuals_before_it_keeps_nodes_in_fp32(embeddings, tmp_path, monkeypatch):
    seen = attempts(monkeypatch)
    level = run_int8(embeddings, tmp_path, {"max_residual_nodes": 2, "max_fp32_nodes": 2}, min_cosine=1.0)
    assert not level.passed  # a cosine of exactly 1 is out of reach: the search runs to its limits
    planned, *searched, restored = seen
    assert [len(c.residual) - len(planned.residual) for c in searched] == [1, 2, 2, 2]
    assert [len(c.fp32) for c in searched] == [0, 0, 1, 2]
    assert restored == planned and "search: failed the gate with up to 2 more weight residual(s)" in level.notes[1]


def test_the_search_keeps_the_nodes_that_lose_most_in_fp32_until_the_gate_passes(embeddings, tmp_path, monkeypatch):
    """A gate only the fp32 graph meets: the search ends with every int8 node kept in fp32, the fused graph again."""
    seen = attempts(monkeypatch)
    level = run_int8(embeddings, tmp_path, {"max_residual_nodes": 0, "max_fp32_nodes": 8}, max_abs=1e-4)
    assert level.passed, level.reason
    kept = seen[-1].fp32
    assert kept and [len(choice.fp32) for choice in seen[1:]] == list(range(1, len(kept) + 1))
    remaining = {node.name for node in graph_of(level).node if node.op_type in INT8_KERNELS}
    assert not any(name.startswith(tuple(kept)) for name in remaining)


def test_the_classifier_is_gated_on_argmax(tiny_recipe_classifier, tmp_path):
    stage = make_stage(tiny_recipe_classifier, tmp_path)
    level = run_int8(stage, tmp_path / "levels")
    assert {row.metric for row in level.parity.rows if row.metric} == {"argmax"}
    assert level.invariance.max_abs <= 1e-5


def test_calibration_text_is_fixed_varied_and_never_the_validation_text():
    texts = calibration_texts()
    assert texts == calibration_texts() and len(texts) >= 300
    assert not set(texts) & set(VALIDATION_TEXTS) and all(text.strip() for text in texts)
    assert any(len(text) > 1000 for text in texts) and any(not text.isascii() for text in texts)


@pytest.mark.parametrize("bits, limit", [(7, 64), (8, 127)])
def test_weight_codes_are_symmetric_per_output_column(bits, limit):
    weight = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32) * np.arange(1, 6, dtype=np.float32)
    codes, scale = weight_codes(weight, bits)
    assert (np.abs(codes).max(axis=0) == limit).all() and scale.shape == (5,)
    assert np.abs(codes * scale - weight).max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("low, high", [(0.5, 3.0), (-2.0, -0.5), (-1.0, 1.0)])
def test_an_activation_range_covers_its_values_and_zero_exactly(low, high):
    scale, zero = activation_range(low, high)
    assert 0 <= zero <= 255
    for value in (low, high, 0.0):
        code = round(value / scale) + zero
        assert 0 <= code <= 255 and abs((code - zero) * scale - value) <= scale / 2 + 1e-7


def test_a_channel_far_above_the_rest_is_left_out_of_the_int8_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32)).astype(np.float32)
    x[:8, 5] = 200.0  # a few tokens carry one huge channel, as MiniLM's [CLS] does
    weight = rng.normal(size=(32, 16)).astype(np.float32)
    split = plan_node("m", "MatMul", x, weight, bits=7, smooth=False, max_outliers=8)
    whole = plan_node("m", "MatMul", x, weight, bits=7, smooth=False, max_outliers=0)
    assert 5 in split.outliers and split.error < whole.error / 2


# ---- every x86 class computes the same integers: checked under AVX2 emulation (qemu-x86_64 -cpu Haswell) ----------

QEMU = shutil.which("qemu-x86_64")
RUN_GRAPH = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inputs = dict(np.load(sys.argv[2]))
np.savez(sys.argv[3], *session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()}))
"""


def run_graph(graph: Path, inputs: dict[str, np.ndarray], folder: Path, avx2: bool) -> list[np.ndarray]:
    """The graph's outputs from ONNX Runtime, natively or on an emulated AVX2-only CPU (no AVX-512, no VNNI)."""
    np.savez(folder / "inputs.npz", **inputs)
    out = folder / ("avx2.npz" if avx2 else "native.npz")
    command = [sys.executable, "-c", RUN_GRAPH, str(graph), str(folder / "inputs.npz"), str(out)]
    subprocess.run(([QEMU, "-cpu", "Haswell"] if avx2 else []) + command, check=True, capture_output=True)
    saved = np.load(out)
    return [saved[f"arr_{index}"] for index in range(len(saved.files))]


def saturating_matmul(bits: int, path: Path) -> Path:
    """x @ w in int8 with every weight code at the limit of `bits`: the largest pair sums int8 kernels can see."""
    codes, scale = weight_codes(np.ones((64, 8), np.float32), bits)
    node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "x_scale", "w_scale", "x_zero"], ["y"],
                            domain="com.microsoft")
    constants = [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scale, "w_scale"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "x_zero")]
    graph = helper.make_graph([node], "saturation", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], initializer=constants)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it)")
def test_avx2_saturates_eight_bit_weights_but_computes_seven_bit_weights_exactly(tmp_path):
    """u8 255 x s8 127 pair sums (64770) overflow AVX2's 16-bit vpmaddubsw; with 7-bit codes (32640) they fit."""
    x = {"x": np.full((2, 64), 255, np.uint8)}
    for bits, same in ((8, False), (7, True)):
        graph = saturating_matmul(bits, tmp_path / f"w{bits}.onnx")
        (native,), (avx2,) = run_graph(graph, x, tmp_path, avx2=False), run_graph(graph, x, tmp_path, avx2=True)
        assert np.array_equal(native, avx2) == same, (bits, native[0, 0], avx2[0, 0])


@pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it)")
def test_the_int8_graph_answers_the_same_on_an_avx2_machine(default_int8, embeddings, tmp_path):
    batch = embeddings.validator.batches[-1]
    native = run_graph(default_int8.path, batch.inputs, tmp_path, avx2=False)
    avx2 = run_graph(default_int8.path, batch.inputs, tmp_path, avx2=True)
    assert max(float(np.abs(a - b).max()) for a, b in zip(native, avx2)) <= 1e-5  # fp32 kernel noise only


def test_calibration_takes_real_tokens_of_per_token_tensors_and_every_row_of_the_others():
    """DeBERTa's relative position embeddings ([1, positions, hidden]) are not per token: all their rows count."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(1, 3, 4), "table")
    nodes = [helper.make_node("Relu", ["x"], ["tokens"]), helper.make_node("Identity", ["table"], ["positions"]),
             helper.make_node("Identity", ["tokens"], ["out"])]
    graph = helper.make_graph(nodes, "g", [x, mask], [out], initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batch = {"x": np.ones((2, 5, 4), np.float32), "attention_mask": np.array([[1] * 5, [1, 1, 0, 0, 0]])}
    rows = capture(model, ["tokens", "positions"], [batch, batch], "attention_mask")
    assert rows["tokens"].shape == (2 * 7, 4)  # 7 real tokens per batch
    assert rows["positions"].shape == (2 * 3, 4)
