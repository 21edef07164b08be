"""The tasks beyond embeddings and classification: token classification, extractive question answering, and text
pairs (a cross-encoder). Each is inferred from a folder, gated with its metric, rendered (golden files) and served
live through its ensemble on the session's server.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/test_tasks.py -k golden` and review the diff.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from packager import export, render, source, validate
from packager.errors import PackagerError, UsageError
from packager.recipe import Profile, Range, Tolerances, load_recipe
from packager.tasks import get_task
from tests.test_render import assert_golden
from tests.tiny_families import write_tiny
from tests.tiny_model import tiny_recipe, write_tiny_bert

GOLDEN = Path(__file__).parent / "golden"
NEW_TASKS = ("token-classification", "question-answering", "text-pair-classification")
# One tiny recipe per new task: its name and sequence range (a question is never truncated: QA needs room for it).
CELLS = {
    "token-classification": ("tinytok", [2, 16, 32]),
    "question-answering": ("tinyqa", [16, 24, 32]),
    "text-pair-classification": ("tinypair", [4, 16, 32]),
}
METRICS = {"token-classification": "token-argmax", "question-answering": "span", "text-pair-classification": "argmax"}


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}  # B-/I- tags and an ignored label, as NER models name them


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The token classifier is a tiny BERT with a WordPiece tokenizer trained offline (real word pieces and character
    offsets for its entities); the others are tiny BERTs too."""
    folders = {task: write_tiny_bert(tmp_path_factory.mktemp(task), task=task) for task in NEW_TASKS[1:]}
    ner = write_tiny("bert", "token-classification", tmp_path_factory.mktemp("ner"), id2label=NER_LABELS,
                     label2id={label: index for index, label in NER_LABELS.items()})
    return {"token-classification": ner, **folders}


def recipe_of(task: str, folder: Path):
    """The task's tiny recipe; the token classifier also serves its entity spans."""
    name, sequence = CELLS[task]
    serving = {"serving": {"entities": True}} if task == "token-classification" else {}
    return tiny_recipe(folder, task=task, name=name, profile={"batch": [1, 2, 4], "sequence": sequence}, **serving)


# ---- task inference -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("architecture", "extra", "task"), [
    ("BertForTokenClassification", {}, "token-classification"),
    ("BertForQuestionAnswering", {}, "question-answering"),
    ("BertForSequenceClassification", {}, "sequence-classification"),
    ("BertForSequenceClassification", {"sentence_transformers": {"activation_fn": "torch.nn.Identity"}},
     "text-pair-classification"),
])
def test_the_task_is_inferred_from_the_folders_auto_class(tmp_path, architecture, extra, task):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture], **extra}))
    recipe = load_recipe(str(tmp_path))
    assert recipe.task == task
    if task in ("question-answering", "text-pair-classification"):
        assert recipe.profile.sequence.min == 16  # room for a question and some context
    assert load_recipe(str(tmp_path), task="embeddings").task == "embeddings"  # --task overrides


# ---- the metrics ----------------------------------------------------------------------------------------------


def test_best_spans_stay_inside_the_context_and_the_answer_length():
    start = np.full((1, 20), -10.0)
    start[0, 0], start[0, 2] = 9.0, 5.0
    end = np.zeros_like(start)
    end[0, 0], end[0, 3], end[0, 19] = 9.0, 1.0, 8.0  # position 0 is outside the context, 19 is too far from 2
    context = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert validate.best_spans(start, end, context).tolist() == [[2, 3]]
    assert validate.best_spans(start, end, np.zeros_like(context)).tolist() == [[-1, -1]]


def tokenizer_batch(folder: Path, task: str, examples, sequence: int):
    recipe = recipe_of(task, folder)
    loaded = source.load(recipe)
    spec = export.export_onnx(loaded, get_task(task), folder / "model.onnx", recipe.opset).spec
    return loaded, spec, validate.encode_batch(loaded.tokenizer, spec, get_task(task), list(examples), sequence)


def test_a_flipped_best_span_fails_the_gate_and_names_the_example(folders):
    task = get_task("question-answering")
    loaded, spec, batch = tokenizer_batch(folders["question-answering"], task.name, validate.QA_EXAMPLES[:2], 24)
    reference = task.reference(loaded, spec)(batch)
    assert validate.span_row("onnx", task, batch, reference, reference, Tolerances()).passed
    flipped = {name: values.copy() for name, values in reference.items()}
    first_context = int(np.flatnonzero(batch.context[1])[0])
    spans = validate.best_spans(reference["start_logits"], reference["end_logits"], batch.context)
    target = first_context if spans[1, 0] != first_context else first_context + 1
    flipped["start_logits"][1, target] += 100.0
    row = validate.span_row("onnx", task, batch, reference, flipped, Tolerances())
    assert not row.passed and row.metric_value == 0.5
    assert row.reason == "best span agreement 0.500 < 1.0" and row.worst_text == validate.label(batch.texts[1])


def test_token_argmax_counts_real_tokens_only(folders):
    task = get_task("token-classification")
    loaded, spec, batch = tokenizer_batch(folders["token-classification"], task.name, ["Ok.", "A man is playing."], 16)
    reference = task.reference(loaded, spec)(batch)["logits"]
    padded = reference.copy()
    padded[0, int(batch.mask[0].sum()):] *= -1  # padding differs: no meaning, not counted
    row = validate.compare_output("onnx", task, spec, "logits", batch, reference, padded, Tolerances())
    assert row.passed and row.metric == "token-argmax" and row.metric_value == 1.0
    flipped = reference.copy()
    flipped[1, 1] = -flipped[1, 1]  # one real token of 1 + 5 (+ specials) changes its label
    row = validate.compare_output("onnx", task, spec, "logits", batch, reference, flipped,
                                  Tolerances(max_abs=np.inf))
    real = int(batch.mask.sum())
    assert not row.passed and row.metric_value == pytest.approx((real - 1) / real)


def test_pairs_use_the_tokenizers_pair_template_and_the_tasks_truncation(folders):
    long = validate.VALIDATION_TEXTS[9]
    pairs = [("Who plays?", long), ("A man.", "Ok.")]
    loaded, spec, batch = tokenizer_batch(folders["question-answering"], "question-answering", pairs, 20)
    expected = loaded.tokenizer(["Who plays?", "A man."], [long, "Ok."], truncation="only_second", max_length=20,
                                padding="max_length")
    assert batch.inputs["input_ids"].tolist() == expected["input_ids"]
    question = len(loaded.tokenizer("Who plays?")["input_ids"])  # [CLS] question [SEP]: never truncated
    assert batch.inputs["input_ids"][0, :question].tolist() == loaded.tokenizer("Who plays?")["input_ids"]
    assert batch.context[0].tolist() == [0] * question + [1] * (20 - question - 1) + [0]
    assert batch.inputs["token_type_ids"][0, question:-1].tolist() == [1] * (20 - question - 1)


def test_a_profile_too_short_for_the_validation_questions_is_refused(folders):
    task = get_task("question-answering")
    loaded, spec, _ = tokenizer_batch(folders["question-answering"], task.name, validate.QA_EXAMPLES[:1], 24)
    short = Profile(Range(1, 2, 4), Range(4, 16, 32))
    with pytest.raises(PackagerError, match=r"profile sequence min 4 is below the \d+ tokens .* validation question"):
        validate.make_batches(loaded.tokenizer, spec, short, task)


def test_bench_says_it_does_not_measure_the_new_tasks(folders):
    from packager.bench.cli import run
    from packager.cli import build_parser

    args = build_parser().parse_args(["bench", str(folders["question-answering"])])
    with pytest.raises(UsageError, match="packager bench is not supported for task question-answering"):
        run(args)


# ---- rendering --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(folders, tmp_path_factory) -> dict[str, dict[str, render.RenderedModel]]:
    models = {}
    for task, folder in folders.items():
        recipe = recipe_of(task, folder)
        loaded = source.load(recipe)
        path = tmp_path_factory.mktemp(task) / "model.onnx"
        exported = export.export_onnx(loaded, get_task(task), path, recipe.opset)
        models[task] = {m.name: m for m in render.render_repository(
            recipe, exported.spec, render.Artifacts(path, loaded.tokenizer, labels=loaded.labels))}
    return models


@pytest.mark.parametrize("task", NEW_TASKS)
def test_rendered_configs_of_each_new_task_match_the_golden_files(rendered, task):
    assert_golden(rendered[task], GOLDEN / CELLS[task][0])


@pytest.mark.parametrize("task", NEW_TASKS)
def test_the_ensemble_takes_the_tasks_texts_and_the_tokenizer_its_truncation(rendered, task):
    name = CELLS[task][0]
    texts = get_task(task).text_inputs or ("text",)
    ensemble, tokenizer = rendered[task][name].context, rendered[task][f"{name}_tokenizer"]
    assert [t["name"] for t in ensemble["inputs"]] == list(texts)
    assert ensemble["steps"][0]["input_map"] == {text: text for text in texts}
    assert [t["name"] for t in tokenizer.context["inputs"]] == list(texts)
    encoding = json.loads(tokenizer.files[render.ENCODING_FILE])
    assert encoding["truncation_strategy"] == get_task(task).truncation


# ---- served live ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_tasks(folders, tmp_path_factory, live_server, live_repository):
    """The three tiny task recipes published to the session's repository; unloaded and taken out of it when the
    module is done (live_loaded loads every model the repository holds)."""
    from tests.live_server import publish_recipe

    build = tmp_path_factory.mktemp("build-tasks")
    published = {task: publish_recipe(recipe_of(task, folder), build, live_repository)
                 for task, folder in folders.items()}
    yield published
    from packager.triton.server import unload_models

    names = [model for cell in published.values() for model in cell.models]
    unload_models(live_server, names)
    for name in names:
        shutil.rmtree(live_repository / name)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_each_task_is_served_through_its_ensemble_as_transformers_answers(live_tasks, live_server, live_repository,
                                                                            task):
    from tests.test_smoke import checks_of, run_on_live_server

    published = live_tasks[task]
    result = run_on_live_server(live_server, live_repository, published, protocols=("grpc",))
    assert result.passed, result.summary()
    ensemble = published.named("_python")
    checks = checks_of(result, ensemble, "grpc")
    cases = [check for check in checks if check.startswith("text → PyTorch")]
    assert len(cases) == 4 and all(f"{METRICS[task]} 1.000000" in checks[c].detail for c in cases)
    tokenizer_checks = checks_of(result, published.named("_tokenizer"), "grpc")
    assert tokenizer_checks["tokens = HF tokenizer"].passed
    if task == "token-classification":  # the entity spans, against transformers' pipeline
        entities = checks_of(result, published.named("_entities"), "grpc")
        cases = {f"entities = transformers pipeline: {case}" for case in
                 ("batch 1", "batch 4, mixed lengths", "longer than max sequence", "non-ASCII")}
        assert cases <= set(entities) and all(entities[case].passed for case in cases), entities
        assert all("as the pipeline groups them" in entities[case].detail for case in cases)
        assert all(row.passed for row in entities.values())
    texts = get_task(task).text_inputs
    if texts:  # a pair request without its second text is refused, naming it
        missing = checks["bad request: missing input"].detail
        assert f"missing required input(s) ['{texts[1]}']" in missing


def test_a_question_longer_than_the_max_sequence_gets_a_clear_error(live_tasks, live_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    ensemble = live_tasks["question-answering"].named("_python")
    question = " ".join(["why"] * 40)
    client = httpclient.InferenceServerClient(live_server.http_url)
    inputs = []
    for name, text in (("question", question), ("context", "A man is playing a guitar.")):
        tensor = httpclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException, match=r"tokenizer: a question \(the first text\) is longer than the 32 tokens"):
        client.infer(ensemble, inputs)
    client.close()


# ---- entity spans and int8 calibration of pairs ------------------------------------------------------------------


def test_entities_are_for_token_classification_with_a_label_per_logit(folders, tmp_path):
    with pytest.raises(UsageError, match=r"\[serving\] entities groups token-classification logits; task is "
                                         "question-answering"):
        recipe_of("question-answering", folders["question-answering"]).override({"serving": {"entities": True}})
    recipe = recipe_of("token-classification", folders["token-classification"])
    loaded = source.load(recipe)
    exported = export.export_onnx(loaded, get_task(recipe.task), tmp_path / "model.onnx", recipe.opset)
    with pytest.raises(PackagerError, match="needs a label for each of the 3 logits; the model's config names 0"):
        render.render_repository(recipe, exported.spec, render.Artifacts(exported.path, loaded.tokenizer))
    models = {m.name: m for m in render.render_repository(
        recipe, exported.spec, render.Artifacts(exported.path, loaded.tokenizer, labels=loaded.labels))}
    settings = json.loads(models["tinytok_entity_groups"].files[render.ENTITIES_FILE])
    assert settings == {"labels": ["O", "B-PER", "I-PER"], "ignore_labels": ["O"],
                        "unk_id": loaded.tokenizer.unk_token_id}


def test_pairs_are_calibrated_as_pairs_and_questions_as_questions():
    from packager.optimize.calibration import calibration_examples, calibration_texts

    texts = calibration_texts()
    assert calibration_examples(pairs=False, questions=False) == texts
    pairs = calibration_examples(pairs=True, questions=False)
    assert pairs[0] == (texts[0], texts[1]) and len(pairs) == len(texts) // 2
    questions = calibration_examples(pairs=True, questions=True)
    assert all(q.endswith("?") and len(q.split()) <= 4 for q, _ in questions)
    assert [context for _, context in questions] == texts[1::2]
