"""Embedding folders follow their own sentence-transformers modules, checked against sentence-transformers itself.

The folders are written the way sentence-transformers 2.x wrote them (bge, gte and e5 ship this layout): a tiny
random BERT at the top, modules.json with the legacy type names, 1_Pooling/config.json with the legacy boolean keys,
optional Dense and Normalize, sentence_bert_config.json and config_sentence_transformers.json. The reference in every
check is sentence-transformers' own `encode` of the folder, never the packager's wrapper.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from packager import export, sentence_modules, source, validate
from packager.errors import GateFailed, PackagerError
from packager.sentence_modules import LEGACY_POOLING_KEYS
from packager.tasks import get_task
from tests.tiny_model import tiny_recipe, write_tiny_bert

PROMPTS = {"query": "query: ", "passage": "passage: "}


def write_sentence_folder(folder: Path, pooling: tuple[str, ...] = ("mean",), dense: tuple[tuple[int, str], ...] = (),
                          normalize: bool = False, do_lower_case: bool = False, prompts: dict | None = None,
                          seed: int = 0) -> Path:
    """A sentence-transformers 2.x folder over a tiny BERT; `dense` = (out_features, activation class) per layer.
    With do_lower_case the folder's own tokenizer keeps case (sentence-transformers lowercases the text first)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast

    write_tiny_bert(folder, seed=seed)
    if do_lower_case:
        BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

    def add(kind: str, config: dict | None) -> Path:
        index = len(modules)
        path = f"{index}_{kind}"
        modules.append({"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"})
        (folder / path).mkdir()
        if config is not None:
            (folder / path / "config.json").write_text(json.dumps(config))
        return folder / path

    flags = {key: mode in pooling for key, mode in LEGACY_POOLING_KEYS.items()}
    add("Pooling", {"word_embedding_dimension": 32, **flags})
    width = 32 * len(pooling)
    generator = torch.Generator().manual_seed(seed + 1)
    for out_features, activation in dense:
        path = add("Dense", {"in_features": width, "out_features": out_features, "bias": True,
                             "activation_function": f"torch.nn.modules.activation.{activation}"})
        save_file({"linear.weight": torch.randn(out_features, width, generator=generator) * 0.3,
                   "linear.bias": torch.randn(out_features, generator=generator) * 0.1}, str(path / "model.safetensors"))
        width = out_features
    if normalize:
        add("Normalize", None)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": do_lower_case}))
    if prompts:
        (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts,
                                                                              "default_prompt_name": None}))
    return folder


def sentence_transformers_encode(folder: Path, texts: list[str], **options) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(texts, **options)


def gate_export(recipe, folder: Path, loaded: source.LoadedModel | None = None) -> validate.ParityReport:
    """Export the folder and gate the graph against sentence-transformers, as the build does (plus invariance)."""
    loaded = loaded or source.load(recipe)
    task = get_task(recipe.task)
    exported = export.export_onnx(loaded, task, folder / "model.onnx", recipe.opset)
    batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
    invariance = validate.invariance_layouts(loaded.tokenizer, exported.spec, recipe.profile)
    validator = validate.Validator(task, exported.spec, batches, task.reference(loaded, exported.spec),
                                   recipe.gates.fp32, invariance)
    runner = validate.onnxruntime_runner(exported.path, exported.spec)
    validate.require_invariant(validator.check_invariance("onnx", runner, recipe.gates.fp32))
    return validator.check("onnx", runner)


@pytest.mark.parametrize("pooling, dense, normalize", [
    (("cls",), (), False),
    (("max",), (), True),
    (("mean",), ((24, "Tanh"),), True),
    (("mean_sqrt_len_tokens",), (), False),
    (("weightedmean",), (), False),
    (("lasttoken",), ((16, "ReLU"), (8, "Tanh")), False),
    (("cls", "max", "mean"), (), True),  # the legacy keys concatenate in this order
])
def test_every_pooling_mode_dense_and_normalize_pass_the_gate_against_sentence_transformers(
        tmp_path, pooling, dense, normalize):
    folder = write_sentence_folder(tmp_path / "model", pooling, dense, normalize)
    recipe = tiny_recipe(folder, name="pooled")
    report = validate.require_parity(gate_export(recipe, tmp_path))
    summary = report.outputs()["sentence_embedding"]
    assert summary.metric_value >= 0.99999 and summary.max_abs <= 1e-5
    width = dense[-1][0] if dense else 32 * len(pooling)
    assert source.load(recipe).modules.describe().startswith("+".join(pooling))
    expected = sentence_transformers_encode(folder, ["A man is playing a guitar."])
    assert expected.shape == (1, width)


def test_the_old_mean_and_normalize_wrapper_fails_the_gate_on_a_cls_folder(tmp_path):
    """The reference is sentence-transformers, not the packager's reading of the folder: exporting the wrong
    pooling (the packager's old fixed mean + Normalize) is caught."""
    folder = write_sentence_folder(tmp_path / "model", ("cls",))
    recipe = tiny_recipe(folder, name="cls")
    loaded = source.load(recipe)
    misread = dataclasses.replace(loaded, modules=dataclasses.replace(loaded.modules, pooling=("mean",),
                                                                      normalize=True))
    report = gate_export(recipe, tmp_path, misread)
    assert not report.passed
    with pytest.raises(GateFailed, match="output 'sentence_embedding'"):
        validate.require_parity(report)


def test_a_plain_folder_is_embedded_as_sentence_transformers_embeds_it(tiny_bert_dir):
    modules = sentence_modules.read(tiny_bert_dir)
    assert (modules.pooling, modules.dense, modules.normalize, modules.from_modules_file) == (("mean",), (), False,
                                                                                               False)


@pytest.mark.parametrize("edit, message", [
    (lambda f: _module_type(f, 1, "sentence_transformers.models.LayerNorm"),
     r"module '1' of type 'sentence_transformers.models.LayerNorm' cannot be exported"),
    (lambda f: _edit_json(f / "1_Pooling/config.json", include_prompt=False), r"include_prompt = false"),
    (lambda f: _edit_json(f / "2_Dense/config.json", activation_function="my_package.Swish"),
     r"activation 'my_package.Swish' cannot be exported"),
    (lambda f: _edit_json(f / "1_Pooling/config.json", pooling_mode="median"), r"unknown pooling mode \['median'\]"),
    (lambda f: (f / "2_Dense/model.safetensors").unlink(), r"has no Dense weights"),
])
def test_a_module_the_packager_cannot_export_is_refused_by_name(tmp_path, edit, message):
    folder = write_sentence_folder(tmp_path / "model", ("cls",), ((8, "Tanh"),))
    edit(folder)
    with pytest.raises(PackagerError, match=message):
        source.load(tiny_recipe(folder, name="refused"))


def _module_type(folder: Path, index: int, type_name: str) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules[index]["type"] = type_name
    (folder / "modules.json").write_text(json.dumps(modules))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---- served live: CLS pooling, no Normalize, a Dense layer, do_lower_case and prompts ----------------------------


@pytest.fixture(scope="module")
def served_cls(tmp_path_factory, live_repository, live_server):
    """A CLS-pooling folder without Normalize, packaged (export gate against sentence-transformers), published to
    the live repository and its portable ensemble loaded."""
    from tests.live_server import publish_recipe
    from tritonclient.http import InferenceServerClient

    folder = write_sentence_folder(tmp_path_factory.mktemp("cls") / "model", ("cls",), ((16, "Tanh"),),
                                   do_lower_case=True, prompts=PROMPTS, seed=3)
    published = publish_recipe(tiny_recipe(folder, name="tinycls_st"), tmp_path_factory.mktemp("build"),
                               live_repository)
    ensemble = published.named("_python")
    client = InferenceServerClient(live_server.http_url)
    client.load_model(ensemble)
    yield folder, published, client
    client.unload_model(ensemble, unload_dependents=True)
    client.close()


def _served(client, ensemble: str, texts: list[str], **parameters) -> np.ndarray:
    """The ensemble's sentence embeddings of `texts`, sent in requests of up to the tiny profile's max batch (4)."""
    from tritonclient.http import InferInput

    answers = []
    for start in range(0, len(texts), 4):
        chunk = texts[start:start + 4]
        text = InferInput("text", [len(chunk), 1], "BYTES")
        text.set_data_from_numpy(np.array([[t.encode()] for t in chunk], dtype=object))
        answers.append(client.infer(ensemble, [text], parameters=parameters or None).as_numpy("sentence_embedding"))
    return np.concatenate(answers)


def _agreement(served: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    cosines = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    return float(cosines.min()), float(np.abs(served - expected).max())


def test_a_cls_folder_without_normalize_is_served_equal_to_sentence_transformers(served_cls):
    folder, published, client = served_cls
    ensemble = published.named("_python")
    texts = list(validate.VALIDATION_TEXTS)
    served = _served(client, ensemble, texts)
    expected = sentence_transformers_encode(folder, texts)
    worst_cosine, max_abs = _agreement(served, expected)
    assert worst_cosine >= 0.9999 and max_abs <= 1e-4, (worst_cosine, max_abs)
    assert np.abs(np.linalg.norm(served, axis=1) - 1).max() > 0.01  # not normalised, as the folder says


def test_a_prompt_named_in_the_request_is_served_as_sentence_transformers_applies_it(served_cls):
    folder, published, client = served_cls
    ensemble = published.named("_python")
    texts = list(validate.VALIDATION_TEXTS[:4])
    served = _served(client, ensemble, texts, prompt_name="query")
    expected = sentence_transformers_encode(folder, texts, prompt_name="query")
    worst_cosine, max_abs = _agreement(served, expected)
    assert worst_cosine >= 0.9999 and max_abs <= 1e-4, (worst_cosine, max_abs)
    unprompted = sentence_transformers_encode(folder, texts, prompt="")
    assert np.abs(served - unprompted).max() > 1e-3  # the prompt changed the answer: no prompt is the default


def test_an_unknown_prompt_name_is_refused_with_the_prompts_the_model_has(served_cls):
    from tritonclient.utils import InferenceServerException

    _, published, client = served_cls
    ensemble = published.named("_python")
    with pytest.raises(InferenceServerException, match=r"unknown prompt_name 'queryy' \(this model's prompts: "
                                                       r"passage, query\)"):
        _served(client, ensemble, ["hello"], prompt_name="queryy")


def test_the_live_smoke_checks_each_prompt_and_refuses_an_unknown_one(served_cls, live_server, live_repository):
    from tests.test_smoke import run_on_live_server

    _, published, _ = served_cls
    ensemble = published.named("_python")
    models = [ensemble, published.named("_tokenizer"), published.named("_onnx_python")]
    result = run_on_live_server(live_server, live_repository, published, models=models, protocols=("http",))
    rows = {row.check: row for row in result.rows if row.model == ensemble}
    assert {f"text with prompt '{name}' → PyTorch" for name in PROMPTS} <= set(rows)
    assert "bad request: unknown prompt_name" in rows
    assert result.passed, result.summary()


def test_packaging_a_folder_with_a_module_it_cannot_export_is_one_line_and_writes_nothing(capsys, tmp_path):
    from tests.test_cli import assert_one_line_error, package_args, run_cli

    folder = write_sentence_folder(tmp_path / "model", ("cls",))
    _module_type(folder, 1, "sentence_transformers.models.WordWeights")
    code, _, err = run_cli(capsys, "package", str(folder), *package_args(tmp_path))
    assert code != 0
    assert_one_line_error(err, "sentence_transformers.models.WordWeights", "cannot be exported")
    assert not (tmp_path / "repo").exists() and not any((tmp_path / "build").glob("model*"))
