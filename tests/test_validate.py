import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from packager import export, source, validate
from packager.errors import GateFailed, PackagerError
from packager.recipe import Profile, Range
from packager.tasks import get_task


def perturb_largest_weight(src, dst, scale=0.05):
    """Write a copy of the graph with noise added to its largest float weight."""
    model = onnx.load(str(src))
    init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: np.prod(i.dims))
    array = numpy_helper.to_array(init)
    noisy = array + np.random.default_rng(0).normal(0, scale * array.std(), array.shape).astype(array.dtype)
    init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(dst))
    return init.name


@pytest.fixture(scope="module", params=["embeddings", "sequence-classification"])
def setup(request, tmp_path_factory, tiny_recipe_embeddings, tiny_recipe_classifier):
    recipe = tiny_recipe_embeddings if request.param == "embeddings" else tiny_recipe_classifier
    loaded = source.load(recipe)
    task = get_task(recipe.task)
    folder = tmp_path_factory.mktemp("validate")
    exported = export.export_onnx(loaded, task, folder / "model.onnx", recipe.opset)
    batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
    validator = validate.Validator(task, exported.spec, batches,
                                   task.reference(loaded, exported.spec), recipe.gates.fp32)
    return recipe, loaded, exported, validator, folder


def test_batches_cover_the_profile_grid_with_real_padded_text(setup):
    recipe, _, _, validator, _ = setup
    shapes = {(b.batch, b.sequence) for b in validator.batches}
    assert shapes == {(b, s) for b in recipe.profile.batch.values() for s in recipe.profile.sequence.values()}
    texts = {t for b in validator.batches for t in b.texts}
    assert "" in texts and any(ord(c) > 0x1F000 for t in texts for c in t)  # empty string and emoji
    assert any(b.mask.sum() < b.mask.size for b in validator.batches)  # some padding
    assert all(b.inputs[name].shape == (b.batch, b.sequence) for b in validator.batches for name in b.inputs)


def test_the_exported_graph_passes_the_gate(setup):
    _, _, exported, validator, _ = setup
    report = validate.require_parity(validator.check("onnx", validate.onnxruntime_runner(exported.path, exported.spec)))
    assert report.passed and len(report.rows) == len(validator.batches) * len(exported.spec.outputs)
    metric_rows = [r for r in report.rows if r.metric]
    assert metric_rows and all(r.metric_value >= 0.9999 for r in metric_rows)


def test_a_perturbed_weight_fails_the_gate_naming_the_worst_case(setup):
    _, _, exported, validator, folder = setup
    perturb_largest_weight(exported.path, folder / "bad.onnx", scale=0.5)
    report = validator.check("bad", validate.onnxruntime_runner(folder / "bad.onnx", exported.spec))
    assert not report.passed
    with pytest.raises(GateFailed, match=r"parity gate failed for bad: output '\w+' at batch x sequence \d+x\d+: max"):
        validate.require_parity(report)


def test_padding_differences_are_not_counted(setup):
    """Garbage in padded positions of a sequence output must not fail the gate."""
    _, _, exported, validator, _ = setup
    onnx_run = validate.onnxruntime_runner(exported.path, exported.spec)
    seq_outputs = [t.name for t in exported.spec.outputs if t.axis("sequence") == 1]
    if not seq_outputs:
        pytest.skip("task has no sequence output")

    def noisy_padding(inputs):
        outputs = onnx_run(inputs)
        pad = inputs["attention_mask"] == 0
        for name in seq_outputs:
            outputs[name][pad] += 100.0
        return outputs

    assert validator.check("noisy-padding", noisy_padding).passed


def test_profile_below_the_tokenizer_minimum_is_refused(setup):
    recipe, loaded, exported, _, _ = setup
    profile = Profile(batch=recipe.profile.batch, sequence=Range(1, 16, 32))
    with pytest.raises(PackagerError, match="sequence min 1 is below the 2 tokens"):
        validate.make_batches(loaded.tokenizer, exported.spec, profile)
