"""The optimize stage: fused / int8 / fp16 levels on real ONNX Runtime, each gated, the fastest passing one shipped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from packager import export, iospec, optimize, source, validate
from packager.errors import GateFailed
from packager.optimize.fp16 import fp16_graph
from packager.recipe import Recipe, load_recipe
from packager.tasks import get_task


@dataclasses.dataclass
class Stage:
    """What the pipeline hands the optimize stage."""

    recipe: Recipe
    loaded: source.LoadedModel
    exported: export.Exported
    validator: validate.Validator

    def run(self, work_dir: Path, device: str = "cpu", recipe: Recipe | None = None):
        task = get_task(self.recipe.task)
        return optimize.optimize(self.loaded, task, self.exported, self.validator, recipe or self.recipe, device,
                                 work_dir)

    def changed(self, optimize: dict | None = None, **gates: dict) -> Recipe:
        """The stage's recipe with [optimize] keys and [gates] tables changed."""
        return self.recipe.override({"optimize": optimize or {}, "gates": gates})


def make_stage(recipe: Recipe, folder: Path, attn_implementation: str | None = None) -> Stage:
    loaded = source.load(recipe)
    if attn_implementation:
        loaded.model.set_attn_implementation(attn_implementation)
    task = get_task(recipe.task)
    exported = export.export_onnx(loaded, task, folder / "model.onnx", recipe.opset)
    batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
    reference = task.reference(loaded, exported.spec)
    invariance = validate.invariance_layouts(loaded.tokenizer, exported.spec, recipe.profile)
    validator = validate.Validator(task, exported.spec, batches, reference, recipe.gates.fp32, invariance)
    return Stage(recipe, loaded, exported, validator)


@pytest.fixture(scope="module")
def embeddings(tiny_recipe_embeddings, tmp_path_factory):
    return make_stage(tiny_recipe_embeddings, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def cpu_result(embeddings, tmp_path_factory):
    return embeddings.run(tmp_path_factory.mktemp("cpu"))


def test_fused_level_reports_its_fusions_and_passes(cpu_result):
    fused = cpu_result.level("fused")
    assert fused.passed, fused.reason
    assert fused.fusions["Attention"] == 2  # one per layer of the tiny model
    assert fused.fusions["SkipLayerNormalization"] == 4
    assert fused.fusions["EmbedLayerNormalization"] == 1
    ops = {node.op_type for node in onnx.load(str(fused.path)).graph.node}
    assert "Attention" in ops and "Softmax" not in ops


def test_every_level_is_gated_and_the_fastest_passing_one_is_shipped(cpu_result):
    assert [result.name for result in cpu_result.levels] == ["plain", "fused", "int8"]
    for result in cpu_result.levels:
        assert result.parity is not None and result.parity.variant == result.name
        assert result.invariance is not None and result.invariance.variant == result.name
        assert result.passed == (result.parity.passed and result.invariance.passed), result.reason
    passing = [result.name for result in cpu_result.levels if result.passed]
    assert {"plain", "fused"} <= set(passing)
    fastest = next(name for name in optimize.SPEED_ORDER["cpu"] if name in passing)
    assert cpu_result.chosen.name == fastest and cpu_result.chosen.shipped
    assert [result.shipped for result in cpu_result.levels] == [r.name == fastest for r in cpu_result.levels]
    record = cpu_result.to_record(Path("/"))
    assert record.shipped == fastest and "int8 > fused > plain" in record.why
    assert record.level("fused").fusions["Attention"] == 2 and record.level("fused").gate.name == "fp32"
    assert all(name in cpu_result.table() for name in ("plain", "fused", "int8", "token_embeddings", "alone vs"))


def test_fp32_levels_answer_the_same_alone_and_in_any_batch(cpu_result):
    for name in ("plain", "fused"):
        invariance = cpu_result.level(name).invariance
        assert invariance.passed and invariance.max_abs <= 1e-5, invariance.reason
        assert {row.output for row in invariance.rows} == {"token_embeddings", "sentence_embedding"}


def test_a_level_that_fails_its_gate_is_not_shipped(embeddings, tmp_path):
    recipe = embeddings.changed({"int8": {"max_residual_nodes": 0, "max_fp32_nodes": 0}}, int8={"min_cosine": 1.0})
    result = embeddings.run(tmp_path, recipe=recipe)
    int8 = result.level("int8")
    assert not int8.passed and not int8.shipped
    assert "cosine" in int8.reason and "< 1.0" in int8.reason
    assert result.chosen.name == "fused"
    assert "int8 failed" in result.why


def test_no_level_passing_is_a_gate_failure(embeddings, tmp_path):
    recipe = embeddings.changed({"cpu": ["fused"]}, fp32={"max_abs": 0.0})
    with pytest.raises(GateFailed, match="no optimization level passed.*fused: 'token_embeddings'"):
        embeddings.run(tmp_path, recipe=recipe)


def test_gpu_target_ships_fp16_built_and_gated_on_cpu(embeddings, tmp_path):
    result = embeddings.run(tmp_path, device="gpu")
    assert [r.name for r in result.levels] == ["plain", "fused", "fp16"]
    assert result.chosen.name == "fp16", result.table()
    assert iospec.from_onnx(result.chosen.path) == embeddings.exported.spec


def test_fp16_graph_keeps_io_types_and_sensitive_ops_in_fp32(embeddings, tmp_path):
    half = fp16_graph(embeddings.exported.path, tmp_path / "model.fp16.onnx")
    onnx.checker.check_model(str(half), full_check=True)
    assert iospec.from_onnx(half) == embeddings.exported.spec  # INT64 inputs, FLOAT outputs, same dims
    model = onnx.shape_inference.infer_shapes(onnx.load(str(half)))
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.value_info}
    weights = [init for init in model.graph.initializer if init.name.endswith("weight") or "MatMul" in init.name]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights if len(init.dims) == 2)
    kept = [node for node in model.graph.node if node.op_type in ("LayerNormalization", "Softmax", "ReduceSum")]
    assert kept and all(types[node.output[0]] == onnx.TensorProto.FLOAT for node in kept)
    batch = embeddings.validator.batches[-1]
    got = validate.onnxruntime_runner(half, embeddings.exported.spec)(batch.inputs)
    want = embeddings.validator.references[-1]
    cosine = (got["sentence_embedding"] * want["sentence_embedding"]).sum(axis=1)
    assert np.all(cosine > 0.999)


def test_unfused_attention_is_a_warning_naming_the_cause(tiny_recipe_embeddings, tmp_path, capsys):
    stage = make_stage(tiny_recipe_embeddings, tmp_path, attn_implementation="sdpa")
    fused = stage.run(tmp_path / "levels", recipe=stage.changed({"cpu": ["fused"]})).level("fused")
    assert "Attention" not in fused.fusions
    assert fused.passed  # still correct, only slower
    assert "attn_implementation='sdpa'" in fused.notes[0]
    assert "warning: attention did not fuse" in capsys.readouterr().out


def test_recipe_optimize_section():
    recipe = load_recipe("bert")
    assert (recipe.optimize.cpu, recipe.optimize.gpu) == (("plain", "fused", "int8"), ("plain", "fused", "fp16"))
    assert recipe.gates.int8.max_abs == float("inf") and recipe.optimize.int8.max_fp32_nodes == 4


@pytest.mark.slow
def test_minilm_fused_graph_has_fused_attention_and_passes_the_gate(tmp_path):
    stage = make_stage(load_recipe("bert"), tmp_path)
    result = stage.run(tmp_path / "levels", recipe=stage.changed({"cpu": ["fused"]}))
    fused = result.level("fused")
    assert fused.passed and fused.shipped, fused.reason
    assert fused.fusions["Attention"] == 6 and fused.fusions["SkipLayerNormalization"] == 12
    assert sum(node.op_type == "Attention" for node in onnx.load(str(fused.path)).graph.node) == 6
