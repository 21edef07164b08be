import onnx
import pytest

from packager import export, iospec, source
from packager.errors import PackagerError
from packager.tasks import get_task


@pytest.fixture(scope="module", params=["embeddings", "sequence-classification"])
def exported(request, tmp_path_factory, tiny_recipe_embeddings, tiny_recipe_classifier):
    recipe = tiny_recipe_embeddings if request.param == "embeddings" else tiny_recipe_classifier
    loaded = source.load(recipe)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    return loaded, get_task(recipe.task), export.export_onnx(loaded, get_task(recipe.task), path, recipe.opset)


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_every_dynamic_axis_is_named_in_the_graph(exported):
    loaded, task, result = exported
    graph = onnx.load(str(result.path)).graph
    inputs = {v.name: _dims(v) for v in graph.input}
    assert list(inputs) == list(loaded.tokenizer.model_input_names)
    for dims in inputs.values():
        assert dims == ["batch", "sequence"]
    outputs = {v.name: _dims(v) for v in graph.output}
    for out in task.outputs:
        for axis, name in out.axes.items():
            assert outputs[out.name][axis] == name
        fixed = [d for i, d in enumerate(outputs[out.name]) if i not in out.axes]
        assert all(isinstance(d, int) and d > 0 for d in fixed)


def test_iospec_is_read_back_from_the_graph_and_round_trips(exported, tmp_path):
    _, _, result = exported
    assert result.spec == iospec.from_onnx(result.path)
    result.spec.write(tmp_path / "iospec.json")
    assert iospec.IOSpec.read(tmp_path / "iospec.json") == result.spec
    assert all(t.triton_dims() == [-1] for t in result.spec.inputs)


def test_a_dynamic_axis_that_came_out_fixed_is_an_error(exported, tmp_path):
    _, _, result = exported
    model = onnx.load(str(result.path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 16  # sequence pinned to 16
    with pytest.raises(PackagerError, match=r"axis 1 of '\w+' should be named 'sequence' but came out as 16"):
        iospec.from_onnx(model, {model.graph.input[0].name: {0: "batch", 1: "sequence"}})


def test_export_failure_is_one_clear_error(exported, tmp_path):
    loaded, task, _ = exported
    with pytest.raises(PackagerError, match="ONNX export failed at opset 7"):
        export.export_onnx(loaded, task, tmp_path / "m.onnx", opset=7)


def test_an_input_the_exporter_drops_leaves_the_spec_and_the_wrapper(tmp_path):
    """DeBERTa-v3 (type_vocab_size 0) does not use token_type_ids: the graph, the spec and the returned wrapper take
    input_ids and attention_mask only, and the graph answers as sentence-transformers does on that folder."""
    import numpy as np
    import onnxruntime
    from sentence_transformers import SentenceTransformer

    from tests.tiny_families import write_tiny
    from tests.tiny_model import tiny_recipe

    loaded = source.load(tiny_recipe(write_tiny("deberta-v3", "embeddings", tmp_path / "deberta")))
    assert "token_type_ids" in loaded.tokenizer.model_input_names
    result = export.export_onnx(loaded, get_task("embeddings"), tmp_path / "model.onnx", 17)
    assert result.spec.input_names == result.wrapper.input_names == ["input_ids", "attention_mask"]
    texts = ["a short text", "a longer text with more words"]
    encoded = loaded.tokenizer(texts, padding=True, return_tensors="np")
    feeds = {name: encoded[name] for name in result.spec.input_names}
    served = onnxruntime.InferenceSession(str(result.path)).run(["sentence_embedding"], feeds)[0]
    expected = SentenceTransformer(str(loaded.folder), device="cpu").encode(texts)
    np.testing.assert_allclose(served, expected, atol=1e-5)
