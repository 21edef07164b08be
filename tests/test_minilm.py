"""Integration: the embedded all-MiniLM-L6-v2, exported and gated end to end."""

import numpy as np
import pytest

from packager import pipeline, source, validate
from packager.errors import GateFailed
from packager.recipe import load_recipe
from packager.tasks import get_task
from tests.test_validate import perturb_largest_weight

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The export gate only: tests/test_optimize.py and tests/test_tensorrt.py cover the later stages on MiniLM."""
    options = pipeline.BuildOptions(build_root=tmp_path_factory.mktemp("build"), trt_backend="none")
    return pipeline.build(load_recipe("bert").override({"optimize": {"cpu": ["plain"]}}), options)


def test_minilm_passes_the_gate_at_every_profile_shape(packaged):
    export_gate = packaged.record.parity[0]
    assert export_gate.variant == "onnx" and export_gate.passed
    assert {row.shape for row in export_gate.rows} >= {"1x2", "8x128", "32x256"}
    assert export_gate.outputs()["sentence_embedding"].metric_value >= 0.9999
    plain = packaged.record.optimize.level("plain")
    assert plain.invariance.passed and plain.invariance.max_abs <= 1e-5
    assert packaged.spec.output_names == ["token_embeddings", "sentence_embedding"]
    assert packaged.spec.tensor("sentence_embedding").dims == ("batch", 384)


def test_served_embedding_equals_sentence_transformers(packaged):
    from sentence_transformers import SentenceTransformer

    recipe = packaged.recipe
    folder = source.resolve_folder(recipe.source)
    texts = list(validate.VALIDATION_TEXTS)
    expected = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    tokenizer = packaged.model().tokenizer
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=recipe.profile.sequence.max,
                        return_tensors="np")
    run = validate.onnxruntime_runner(packaged.level_path("plain"), packaged.spec)
    got = run({t.name: encoded[t.name].astype(t.numpy_dtype) for t in packaged.spec.inputs})["sentence_embedding"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_perturbed_minilm_graph_fails_the_gate(packaged, tmp_path):
    recipe = packaged.recipe
    loaded = packaged.model()
    task = get_task(recipe.task)
    batches = validate.make_batches(loaded.tokenizer, packaged.spec, recipe.profile)[:2]
    validator = validate.Validator(task, packaged.spec, batches, task.reference(loaded, packaged.spec),
                                   recipe.gates.fp32)
    perturb_largest_weight(packaged.level_path("plain"), tmp_path / "bad.onnx", scale=0.2)
    with pytest.raises(GateFailed, match="parity gate failed for perturbed"):
        bad = validate.onnxruntime_runner(tmp_path / "bad.onnx", packaged.spec)
        validate.require_parity(validator.check("perturbed", bad))
