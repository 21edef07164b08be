"""Rendering the Triton configs: golden files, names against the ONNX graph, schema errors, the [serving] section,
and the python-backend models served by the real tritonserver (tokenizer + portable ONNX Runtime model).

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/test_render.py -k golden` and review the diff.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
from tritonclient.grpc import model_config_pb2

from packager import export, iospec, render, repository, source, validate
from packager.errors import PackagerError, UsageError
from packager.recipe import Range, Serving, load_recipe, padded_length
from packager.record import ProfileShapes
from packager.render import Artifacts, TensorRTPlan
from packager.tasks import get_task
from packager.triton.server import TritonServer, load_models, serve
from tests.tiny_model import sample_release

GOLDEN = Path(__file__).parent / "golden"
ALL_TARGETS = {"targets": ["onnxruntime", "python", "tensorrt"]}


@dataclasses.dataclass(frozen=True)
class Exported:
    recipe: object
    spec: iospec.IOSpec
    onnx: Path
    tokenizer: object

    def plan(self, max_batch: int = 4) -> TensorRTPlan:
        """Profiles as the TensorRT stage reports them; rendering never reads the engine file."""
        profile = ProfileShapes("default", 0, {name: ((1, 2), (2, 16), (4, 32)) for name in self.spec.input_names})
        return TensorRTPlan(self.onnx.with_name("model.plan"), (profile,), max_batch)

    def render(self, serving: dict = ALL_TARGETS, plan: bool = True) -> dict[str, render.RenderedModel]:
        """The models of the recipe with its [serving] section set to `serving`."""
        artifacts = Artifacts(self.onnx, self.tokenizer, self.plan() if plan else None)
        recipe = self.recipe.override({"serving": serving})
        return {m.name: m for m in render.render_repository(recipe, self.spec, artifacts)}

    def publish(self, root: Path, models) -> None:
        repository.publish(root, list(models), sample_release(self.spec), {})


def _export(recipe, folder: Path) -> Exported:
    loaded = source.load(recipe)
    exported = export.export_onnx(loaded, get_task(recipe.task), folder / "model.onnx", recipe.opset)
    return Exported(recipe, exported.spec, exported.path, loaded.tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_recipe_embeddings) -> Exported:
    return _export(tiny_recipe_embeddings, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["embeddings", "sequence-classification"])
def any_task(request, tmp_path_factory, tiny, tiny_recipe_classifier) -> Exported:
    if request.param == "embeddings":
        return tiny
    return _export(tiny_recipe_classifier, tmp_path_factory.mktemp("tinycls"))


def slow_tokenizer(exported: Exported) -> BertTokenizerLegacy:
    """The same vocab in transformers' slow (pure Python) BERT tokenizer, which saves no tokenizer.json."""
    vocab = Path(exported.recipe.source.path) / "vocab.txt"
    return BertTokenizerLegacy(vocab_file=str(vocab), do_lower_case=True, model_input_names=exported.spec.input_names)


def slow(exported: Exported) -> Exported:
    """Served by the slow tokenizer, under the recipe name tinyslow."""
    return dataclasses.replace(exported, recipe=exported.recipe.replace(name="tinyslow"),
                               tokenizer=slow_tokenizer(exported))


def left_sided(exported: Exported) -> Exported:
    """Padded and truncated on the left, and padded to at least 12 tokens, under the recipe name tinyleft."""
    tokenizer = AutoTokenizer.from_pretrained(exported.recipe.source.path, padding_side="left", truncation_side="left")
    profile = dataclasses.replace(exported.recipe.profile, sequence=Range(12, 16, 32))
    return dataclasses.replace(exported, recipe=exported.recipe.replace(name="tinyleft", profile=profile),
                               tokenizer=tokenizer)


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def io(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def graph_io(spec: iospec.IOSpec, tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.triton_type, t.triton_dims()) for t in tensors]


# ---- golden files and the graph's names -------------------------------------------------------------------------


def assert_golden(models: dict, folder: Path) -> None:
    """Each rendered config (version 1) equals its golden file in `folder`, and no golden file is left over;
    UPDATE_GOLDEN=1 rewrites them."""
    if os.environ.get("UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.pbtxt"):
            stale.unlink()
        for name, model in models.items():
            (folder / f"{name}.pbtxt").write_text(model.config_text(1))
    assert sorted(p.stem for p in folder.glob("*.pbtxt")) == sorted(models)
    for name, model in models.items():
        assert model.config_text(1) == (folder / f"{name}.pbtxt").read_text(), f"{name} differs from its golden file"


def test_rendered_configs_match_the_golden_files(tiny):
    assert_golden(tiny.render(), GOLDEN / tiny.recipe.name)


def test_every_config_carries_the_onnx_graphs_names_types_and_dims(any_task):
    graph = iospec.from_onnx(any_task.onnx)  # read again from the file, not the spec given to render
    inputs, outputs = graph_io(graph, graph.inputs), graph_io(graph, graph.outputs)
    name = any_task.recipe.name
    models = {key: parse(model.config_text(7)) for key, model in any_task.render().items()}
    assert set(models) == {f"{name}_tokenizer", f"{name}_onnx", name, f"{name}_onnx_python", f"{name}_python",
                           f"{name}_tensorrt_plan", f"{name}_tensorrt"}
    for model in (f"{name}_onnx", f"{name}_onnx_python", f"{name}_tensorrt_plan"):
        assert io(models[model].input) == inputs and io(models[model].output) == outputs, model
    assert io(models[f"{name}_tokenizer"].output) == inputs
    for ensemble, step in ((name, f"{name}_onnx"), (f"{name}_python", f"{name}_onnx_python"),
                           (f"{name}_tensorrt", f"{name}_tensorrt_plan")):
        config = models[ensemble]
        assert io(config.input) == [("text", "TYPE_STRING", [1])] and io(config.output) == outputs
        tokenize, run = config.ensemble_scheduling.step
        assert (tokenize.model_name, run.model_name) == (f"{name}_tokenizer", step)
        assert dict(tokenize.output_map) == dict(run.input_map) == {n: n for n in graph.input_names}
        assert dict(run.output_map) == {n: n for n in graph.output_names}
        assert tokenize.model_version == run.model_version == 7
    for config in models.values():
        assert list(config.version_policy.specific.versions) == [7]
        assert config.max_batch_size == any_task.recipe.profile.batch.max


def test_model_configs_batch_warm_up_and_use_the_recipe(tiny):
    serving = {"preferred_batch_sizes": [2], "max_queue_delay_us": 250, "instances": 2,
               "onnxruntime": {"intra_op_thread_count": 1, "graph_optimization_level": "basic"}}
    models = tiny.render(serving, plan=False)
    onnx, portable = parse(models["tiny_onnx"].config_text(1)), parse(models["tiny_onnx_python"].config_text(1))
    for config in (onnx, portable):
        assert list(config.dynamic_batching.preferred_batch_size) == [2]
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
        assert config.optimization.graph.level == -1
        assert config.parameters["intra_op_thread_count"].string_value == "1"
        assert [(w.batch_size, list(w.inputs["input_ids"].dims)) for w in config.model_warmup] == [(1, [2]), (4, [32])]
    assert onnx.platform == "onnxruntime_onnx" and portable.backend == "python"
    assert [(g.kind, g.count) for g in onnx.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert not any(t.allow_ragged_batch for t in onnx.input) and all(t.allow_ragged_batch for t in portable.input)
    assert "tiny_tensorrt_plan" not in models, "no engine, no tensorrt model"


def test_gpu_config_can_enable_the_tensorrt_accelerator_in_fp16(tiny):
    config = parse(tiny.render({"device": "gpu", "tensorrt_accelerator": True})["tiny_onnx"].config_text(1))
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    plain = parse(tiny.render()["tiny_onnx"].config_text(1))
    assert not plain.optimization.execution_accelerators.gpu_execution_accelerator


def test_tensorrt_config_uses_the_engines_profiles_by_index(tiny):
    profiles = tuple(ProfileShapes(f"p{i}", i, {n: ((1, 2), (2, 8), (4, 16)) if i == 0 else ((1, 16), (2, 32), (2, 32))
                                                for n in tiny.spec.input_names}) for i in range(2))
    plan = TensorRTPlan(tiny.onnx.with_name("model.plan"), profiles, max_batch_size=2)
    recipe = tiny.recipe.override({"serving": {"targets": ["tensorrt"]}})
    artifacts = Artifacts(tiny.onnx, tiny.tokenizer, plan)
    models = {m.name: m for m in render.render_repository(recipe, tiny.spec, artifacts)}
    config = parse(models["tiny_tensorrt_plan"].config_text(1))
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 2
    assert list(config.dynamic_batching.preferred_batch_size) == [2], "preferred sizes above the plan's max dropped"
    assert [(g.kind, list(g.profile)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, ["0", "1"])]
    warmups = [(w.batch_size, list(w.inputs["attention_mask"].dims)) for w in config.model_warmup]
    assert warmups == [(1, [2]), (2, [16]), (1, [16]), (2, [32])], "each profile's ends, batch capped at 2"
    assert parse(models["tiny_tensorrt"].config_text(1)).max_batch_size == 2
    assert models["tiny_tensorrt_plan"].files == {"model.plan": plan.path}


@pytest.mark.parametrize("profile, message", [
    ({"input_ids": ((1, 2), (2, 8), (4, 16))}, "sizes ['input_ids']"),
    ("rank", "not of rank 2"),
])
def test_tensorrt_profiles_that_do_not_fit_the_graph_are_refused(tiny, profile, message):
    if profile == "rank":
        profile = {n: ((1,), (2,), (4,)) for n in tiny.spec.input_names}
    plan = TensorRTPlan(Path("model.plan"), (ProfileShapes("default", 0, profile),), 4)
    recipe = tiny.recipe.override({"serving": ALL_TARGETS})
    with pytest.raises(PackagerError, match=re.escape(message)):
        render.render_repository(recipe, tiny.spec, Artifacts(tiny.onnx, tiny.tokenizer, plan))


# ---- the files of the python-backend models --------------------------------------------------------------------


def test_tokenizer_model_ships_tokenizer_json_and_how_to_encode_like_the_source(tiny):
    files = tiny.render()["tiny_tokenizer"].files
    assert files["model.py"] == render.PYTHON_MODELS / "tokenizer_model.py"
    assert json.loads(files[render.ENCODING_FILE]) == {
        "library": "tokenizers",
        "fields": {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"},
        "pad_values": {"input_ids": tiny.tokenizer.pad_token_id, "token_type_ids": 0, "attention_mask": 0},
        "padding_side": "right",
        "truncation_side": "right",
        "truncation_strategy": "longest_first",
        "split_special_tokens": False,
    }
    served = Tokenizer.from_str(files[f"{render.TOKENIZER_FOLDER}/tokenizer.json"].decode())
    served.no_padding()  # the file keeps the padding of the tokenizer's last call; tokenizer_model.py resets it too
    texts = [*validate.VALIDATION_TEXTS, "[SEP] inside [PAD] a text"]
    assert [e.ids for e in served.encode_batch(texts)] == tiny.tokenizer(texts)["input_ids"]


def test_a_slow_tokenizer_is_served_by_transformers(tiny):
    files = slow(tiny).render()["tinyslow_tokenizer"].files
    assert f"{render.TOKENIZER_FOLDER}/tokenizer.json" not in files and f"{render.TOKENIZER_FOLDER}/vocab.txt" in files
    encoding = json.loads(files[render.ENCODING_FILE])
    assert encoding["library"] == "transformers" and encoding["fields"] == {}


@pytest.mark.parametrize("template", ["tokenizer_model.py", "onnxruntime_model.py"])
def test_python_models_import_neither_torch_nor_transformers(template):
    """The module-level imports of a python-backend model (what every load runs), in a fresh interpreter."""
    body = ast.parse((render.PYTHON_MODELS / template).read_text()).body
    modules = [alias.name for node in body if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module for node in body if isinstance(node, ast.ImportFrom)]
    modules.remove("triton_python_backend_utils")  # the server's own module
    code = f"import sys, {', '.join(modules)}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.split() == ["[]"], f"{template} imports {imported.strip()}"


def test_portable_model_ships_graph_code_and_padding_facts(tiny):
    files = tiny.render()["tiny_onnx_python"].files
    assert files["model.onnx"] == tiny.onnx and files["model.py"] == render.PYTHON_MODELS / "onnxruntime_model.py"
    padding = json.loads(files[render.PADDING_FILE])
    assert padding == {
        "sequence_axes": {"input_ids": 1, "token_type_ids": 1, "attention_mask": 1, "token_embeddings": 1},
        "pad_values": {"input_ids": tiny.tokenizer.pad_token_id, "token_type_ids": 0, "attention_mask": 0},
    }


# ---- errors ------------------------------------------------------------------------------------------------------


def test_a_schema_error_stops_rendering_with_the_template_and_the_problem(tiny):
    context = dict(tiny.render()["tiny_onnx"].context)
    context["inputs"] = [{**context["inputs"][0], "data_type": "TYPE_TEXT"}]
    with pytest.raises(PackagerError) as failure:
        render.render_config("onnxruntime.pbtxt.j2", {**context, "version": 1})
    message = str(failure.value)
    assert "onnxruntime.pbtxt.j2" in message and "TYPE_TEXT" in message and "\n" not in message


def test_a_missing_template_variable_is_an_error_not_an_empty_string(tiny):
    context = dict(tiny.render()["tiny"].context)
    del context["steps"]
    with pytest.raises(PackagerError, match=r"template ensemble.pbtxt.j2: 'steps' is undefined"):
        render.render_config("ensemble.pbtxt.j2", {**context, "version": 1})


def test_text_input_may_not_clash_with_a_model_tensor(tiny):
    with pytest.raises(UsageError, match="clashes"):
        tiny.render({"text_input": "input_ids"})


# ---- the [serving] section -----------------------------------------------------------------------------------------


def test_serving_defaults_when_the_recipe_has_no_section(tiny_recipe_embeddings):
    assert tiny_recipe_embeddings.serving == Serving()
    assert tiny_recipe_embeddings.serving.batch_sizes(tiny_recipe_embeddings.profile) == (2, 4)


def test_bert_recipe_serving_section_parses():
    serving = load_recipe("bert").serving
    assert serving.targets == ("onnxruntime", "python", "tensorrt") and serving.text_input == "text"
    assert serving.preferred_batch_sizes == (8, 32) and serving.onnxruntime.execution_mode == "sequential"


@pytest.mark.parametrize("section, message", [
    ({"target": ["python"]}, "[serving]: unknown key 'target'; did you mean 'targets'?"),
    ({"instances": "2"}, "[serving] instances must be an integer; got '2'"),
    ({"preferred_batch_sizes": [2, 8]}, "exceeds the profile's max batch 4"),
    ({"targets": ["python", "triton"]}, "[serving] targets[1] must be one of 'onnxruntime', 'python', 'tensorrt'"),
    ({"tensorrt_accelerator": True}, "tensorrt_accelerator needs device"),
    ({"onnxruntime": {"graph_optimization_level": "max"}}, "graph_optimization_level must be one of"),
    ({"onnxruntime": {"threads": 2}}, "[serving.onnxruntime]: unknown key 'threads'"),
])
def test_bad_serving_keys_are_usage_errors_naming_the_key(tiny_recipe_embeddings, section, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        tiny_recipe_embeddings.override({"serving": section})


# ---- live: the python-backend models in the real tritonserver ------------------------------------------------------

JOIN = 4  # requests the batcher must gather before it runs them (the queue delay is far longer than the test)


@dataclasses.dataclass(frozen=True)
class Live:
    server: TritonServer
    root: Path
    client: httpclient.InferenceServerClient


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory) -> Live:
    """tiny_python (tokenizer + portable model) published and loaded; the batcher waits for JOIN rows."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    serving = {"targets": ["python"], "preferred_batch_sizes": [JOIN], "max_queue_delay_us": 60_000_000,
               "pad_to": "buckets"}
    root = tmp_path_factory.mktemp("served") / "model_repository"
    tiny.publish(root, tiny.render(serving, plan=False).values())
    with serve("local", root, ready_timeout_s=60) as server:
        loaded = load_models(server, ["tiny_python"])
        assert loaded["tiny_python"].ok, loaded["tiny_python"].error
        client = httpclient.InferenceServerClient(server.http_url, concurrency=JOIN)
        try:
            yield Live(server, root, client)
        finally:
            client.close()


@pytest.fixture(scope="module")
def served(live) -> httpclient.InferenceServerClient:
    return live.client


def _infer_texts(client, model: str, texts: list[str]):
    tensor = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return client.infer(model, [tensor])


def test_served_tokenizer_truncates_pads_and_keeps_the_graphs_types(served, tiny):
    texts = ["Ok.", "A man is playing a guitar on stage.", validate.VALIDATION_TEXTS[9]]  # the last needs truncation
    result = _infer_texts(served, "tiny_tokenizer", texts)
    expected = tiny.tokenizer(texts, truncation=True, max_length=32, padding="longest", return_tensors="np")
    for tensor in tiny.spec.inputs:
        got = result.as_numpy(tensor.name)
        assert got.dtype == tensor.numpy_dtype and got.shape == (3, 32)
        np.testing.assert_array_equal(got, expected[tensor.name])


@pytest.mark.parametrize("variant", [left_sided, slow], ids=["left sides, min sequence 12", "slow tokenizer"])
def test_served_tokenizer_gives_the_hugging_face_tokenizers_tokens(live, tiny, variant):
    exported = variant(tiny)
    name = f"{exported.recipe.name}_tokenizer"
    exported.publish(live.root, [exported.render({"targets": ["python"]}, plan=False)[name]])
    loaded = load_models(live.server, [name])[name]
    assert loaded.ok, loaded.error
    for texts in (["Ok.", ""], ["[SEP] inside [PAD] a text", validate.VALIDATION_TEXTS[9], "Où est la gare ?"]):
        result = _infer_texts(live.client, name, texts)
        expected = hugging_face_tokens(exported, texts)
        for tensor in exported.spec.inputs:
            assert result.as_numpy(tensor.name).dtype == tensor.numpy_dtype
            np.testing.assert_array_equal(result.as_numpy(tensor.name), expected[tensor.name], err_msg=tensor.name)


def hugging_face_tokens(exported: Exported, texts: list[str]) -> dict[str, np.ndarray]:
    """The source tokenizer's tokens, truncated at the profile's max sequence, padded to the longest text (at least
    to the profile's min sequence) rounded up to a length bucket, as the smoke's reference tokenizes."""
    profile = exported.recipe.profile
    lengths = exported.tokenizer(texts, truncation=True, max_length=profile.sequence.max)["input_ids"]
    length = padded_length(max(map(len, lengths)), profile.sequence.min, exported.recipe.serving.buckets(profile))
    return validate.tokenize(exported.tokenizer, exported.spec, texts, length)


def test_served_ensemble_embeds_text_like_onnx_runtime(served, tiny):
    texts = ["", "Ok.", "Où est la gare ?", "Great job team 🎉🚀 see you tomorrow 👋"]  # 2 to 14 tokens
    result = _infer_texts(served, "tiny_python", texts)
    session = validate.onnxruntime_runner(tiny.onnx, tiny.spec)
    longest = max(len(tiny.tokenizer(t)["input_ids"]) for t in texts)
    assert longest < 16 and result.as_numpy("token_embeddings").shape == (4, 16, 32), "padded up to the bucket"
    for row, text in enumerate(texts):
        alone = validate.tokenize(tiny.tokenizer, tiny.spec, [text], len(tiny.tokenizer(text)["input_ids"]))
        np.testing.assert_allclose(result.as_numpy("sentence_embedding")[row], session(alone)["sentence_embedding"][0],
                                   atol=1e-5)


def test_portable_model_pads_requests_of_different_lengths_that_the_batcher_joins(served, tiny):
    texts = [["Ok."], ["A man is playing a guitar on stage.", "Hi"], [validate.VALIDATION_TEXTS[3]]]  # 1 + 2 + 1 rows
    requests = [{t.name: v for t, v in zip(tiny.spec.inputs, _encode(tiny, batch))} for batch in texts]
    assert len({r["input_ids"].shape[1] for r in requests}) == 3, "three different sequence lengths"
    before = _executions(served)

    pending = [served.async_infer("tiny_onnx_python", _tensors(tiny, inputs)) for inputs in requests]
    results = [request.get_result() for request in pending]
    executions, inferences = (now - then for now, then in zip(_executions(served), before))
    assert (executions, inferences) == (1, JOIN), "the batcher joined all requests into one execution"
    session = validate.onnxruntime_runner(tiny.onnx, tiny.spec)
    for inputs, result in zip(requests, results):
        alone = session(inputs)
        for name in tiny.spec.output_names:
            assert result.as_numpy(name).shape == alone[name].shape, "outputs cut back to the request's own length"
            np.testing.assert_allclose(result.as_numpy(name), alone[name], atol=1e-5)


def _tensors(tiny, inputs: dict[str, np.ndarray]) -> list[httpclient.InferInput]:
    tensors = []
    for tensor in tiny.spec.inputs:
        tensors.append(httpclient.InferInput(tensor.name, list(inputs[tensor.name].shape), tensor.triton_datatype))
        tensors[-1].set_data_from_numpy(inputs[tensor.name])
    return tensors


def _encode(tiny, texts: list[str]) -> list[np.ndarray]:
    encoded = tiny.tokenizer(texts, padding="longest", return_tensors="np")
    return [encoded[t.name].astype(t.numpy_dtype) for t in tiny.spec.inputs]


def _executions(client) -> tuple[int, int]:
    (stats,) = client.get_inference_statistics("tiny_onnx_python")["model_stats"]
    return int(stats["execution_count"]), int(stats["inference_count"])
