"""The family × task matrix, served live: each cell is a tiny random model of one family (tests/tiny_families.py)
exported, gated, rendered, published to the session's live repository, loaded on the one live server, answered
through its ensemble and compared with the task's reference (the smoke's checks and Reference:
sentence-transformers for embeddings, the transformers model otherwise), then unloaded.

One serving target per cell keeps the matrix within its CI budget: the native onnxruntime ensemble when its
backend is built (it loads no python stub for the graph), else the python one. The tokenizer model is python in
both. `pytest tests/test_matrix.py --matrix-table` prints the README's table from the measured run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")

from packager import validate
from packager.recipe import PAIR_TASKS, model_positions
from packager.triton.checks import Checks
from packager.triton.client import PROTOCOLS, connection
from packager.triton.discovery import Role, load_servable
from packager.triton.rows import LOAD, CheckStatus, SmokeRow
from packager.triton.server import unload_models
from tests.live_server import Published, native_backend, publish_recipe
from tests.tiny_families import FAMILIES, FAMILIES_TABLE, write_tiny
from tests.tiny_model import tiny_recipe

# (family, task): every family embeds; classification on families of each tokenizer kind and input set.
# New tasks add their rows here.
MATRIX: tuple[tuple[str, str], ...] = (
    *((family, "embeddings") for family in FAMILIES),
    ("bert", "sequence-classification"),
    ("roberta", "sequence-classification"),
    ("deberta-v3", "sequence-classification"),
    ("modernbert", "sequence-classification"),
    ("bert", "token-classification"),
    ("roberta", "token-classification"),
    ("xlm-roberta", "token-classification"),
    ("bert", "question-answering"),
    ("distilbert", "question-answering"),
    ("roberta", "question-answering"),
    ("bert", "text-pair-classification"),
    ("xlm-roberta", "text-pair-classification"),
    ("deberta-v3", "text-pair-classification"),
)
PAIR_PROFILE = {"batch": [1, 2, 4], "sequence": [16, 24, 32]}  # room for a question: it is never truncated


@dataclass(frozen=True)
class Cell:
    """One served cell: what was published, the rows of its checks, its worst parity, and its seconds."""

    family: str
    task: str
    published: Published
    target: str
    rows: tuple[SmokeRow, ...]
    parity: tuple[validate.ParityRow, ...]  # the ensemble's answers to the task's examples against the reference
    configs: dict[str, str]  # model -> its config.pbtxt as served
    seconds: float  # write, build, publish, load, check and unload

    @property
    def failures(self) -> list[str]:
        rows = [f"{row.check} [{row.model}]: {row.detail}" for row in self.rows if row.status is not CheckStatus.PASS]
        return rows + [f"parity {row.output} {row.shape}: {row.reason}" for row in self.parity if not row.passed]

    @property
    def worst_metric(self) -> validate.ParityRow:
        return min((row for row in self.parity if row.metric), key=lambda row: row.metric_value)

    def table_row(self) -> str:
        worst = self.worst_metric
        served = "served" if not self.failures else "FAILED"
        max_abs = max(row.max_abs for row in self.parity)
        return (f"| {self.family} | {self.task} | {served} ({self.target}) | {worst.metric} {worst.metric_value:.6f} "
                f"| {max_abs:.1e} | {self.seconds:.1f} |")


TABLE_HEADER = ("| family | task | served (target) | parity, worst | max abs diff | seconds |\n"
                "|---|---|---|---|---|---|")


def ensemble_name(published: Published, target: str) -> str:
    return published.named("" if target == "onnxruntime" else "_python")


def _serve_cell(server, repository: Path, published: Published, target: str) -> tuple[tuple, tuple, dict]:
    """Load the cell's models, run the smoke's checks on its ensemble and tokenizer over HTTP, compare the
    ensemble's answers with the reference, unload them and take them out of the repository (configs returned)."""
    ensemble = ensemble_name(published, target)
    found, rows = load_servable(server, repository, published.models)
    served = [found[row.model] for row in rows if row.status is CheckStatus.PASS]
    reference, model = published.reference, found[ensemble]
    assert model.gate is not None, f"{ensemble} has no gate in its manifest"
    texts, step = reference.examples, reference.profile.batch.max
    try:
        with connection(PROTOCOLS["http"], server) as client:
            checks = Checks(client, reference, served)
            rows += [row for text_model in served if text_model.role is not Role.MODEL
                     for row in checks.describe(text_model) + checks.answers(text_model)]
            parity = []
            for chunk in (tuple(texts[i:i + step]) for i in range(0, len(texts), step)):
                batch = reference.tokenize(chunk)
                answer = client.infer(ensemble, model.text_request(chunk), model.output_names)
                parity += validate.compare_outputs("served", reference.task, reference.spec, batch,
                                                   reference.answer(chunk), answer, model.gate)
    finally:
        unload_models(server, [ensemble, *(name for name in published.models if name != ensemble)])
        configs = {name: (repository / name / "config.pbtxt").read_text() for name in published.models}
        for name in published.models:  # out of the live repository: live_loaded loads every model it holds
            shutil.rmtree(repository / name)
    return tuple(rows), tuple(parity), configs


@pytest.fixture(scope="session")
def matrix_cell(request, tmp_path_factory, live_server, live_repository):
    """(family, task) -> its served Cell, built once per session (the regression tests reuse the matrix's).

    With --matrix-table, the measured cells are printed as the README's table at the end of the session."""
    cells: dict[tuple[str, str], Cell] = {}
    target = "onnxruntime" if native_backend() else "python"

    def cell(family: str, task: str) -> Cell:
        if (family, task) not in cells:
            started = time.monotonic()
            name = f"m_{family.replace('-', '_')}_{task.split('-')[0]}"
            folder = write_tiny(family, task, tmp_path_factory.mktemp(name))
            pairs = task in PAIR_TASKS
            recipe = tiny_recipe(folder, task=task, name=name, serving={"targets": [target]},
                                 **({"profile": PAIR_PROFILE} if pairs else {}))
            published = publish_recipe(recipe, tmp_path_factory.mktemp("build"), live_repository)
            rows, parity, configs = _serve_cell(live_server, live_repository, published, target)
            cells[family, task] = Cell(family, task, published, target, rows, parity, configs,
                                       time.monotonic() - started)
        return cells[family, task]

    yield cell
    if request.config.getoption("--matrix-table") and cells:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print("\n" + "\n".join([TABLE_HEADER, *(cells[key].table_row() for key in MATRIX if key in cells)]))


@pytest.mark.parametrize("family, task", MATRIX, ids=[f"{f}-{t}" for f, t in MATRIX])
def test_every_cell_is_served_through_its_ensemble_like_its_reference(matrix_cell, family, task):
    cell = matrix_cell(family, task)
    assert not cell.failures, "\n".join(cell.failures)
    checked = {row.check for row in cell.rows if row.model == ensemble_name(cell.published, cell.target)}
    assert {LOAD, "config = IO spec", "metadata = IO spec"} <= checked
    assert any(check.startswith("text → PyTorch") for check in checked)
    tokenizer = cell.published.named("_tokenizer")
    assert "tokens = HF tokenizer" in {row.check for row in cell.rows if row.model == tokenizer}
    worst = cell.worst_metric
    assert worst.metric_value >= (0.9999 if worst.metric == "cosine" else 1.0), worst


@pytest.mark.parametrize("family", FAMILIES)
def test_each_tiny_family_loads_with_its_own_tokenizer_class_and_model(family, tmp_path):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    folder = write_tiny(family, "embeddings", tmp_path / family)
    spec = FAMILIES_TABLE[family]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer) is getattr(transformers, spec.tokenizer_class)
    kind = {"wordpiece": "WordPiece", "bpe": "BPE", "unigram": "Unigram"}[spec.tokenizer]
    assert type(tokenizer.backend_tokenizer.model).__name__ == kind
    assert type(AutoConfig.from_pretrained(folder)).__name__ == spec.config_class
    assert tokenizer.convert_ids_to_tokens(tokenizer("the fox")["input_ids"])[0] == tokenizer.cls_token


def test_a_served_cell_is_unloaded_afterwards(matrix_cell, live_server, live_repository):
    """Explicit model control keeps the server's memory flat: a cell's models leave the server and the repository
    once it is checked."""
    import tritonclient.http as httpclient

    cell = matrix_cell("bert", "embeddings")
    assert not any((live_repository / name).exists() for name in cell.published.models)
    client = httpclient.InferenceServerClient(live_server.http_url)
    try:
        deadline = time.monotonic() + 30
        while ready := [name for name in cell.published.models if client.is_model_ready(name)]:
            assert time.monotonic() < deadline, f"still loaded: {ready}"
            time.sleep(0.2)
    finally:
        client.close()


def test_deberta_v3_without_token_type_ids_is_packaged_and_served(matrix_cell):
    """Failure 2 of issue 13: the exporter drops the unused token_type_ids; the spec, the tokenizer model's
    outputs and every config leave it out, while the tokenizer still produces it."""
    cell = matrix_cell("deberta-v3", "embeddings")
    assert cell.published.spec.input_names == ["input_ids", "attention_mask"]
    assert "token_type_ids" in cell.published.reference.tokenizer("a text")  # the tokenizer still makes it
    assert set(cell.configs) == set(cell.published.models)
    for model, config in cell.configs.items():
        assert "token_type_ids" not in config, model
    assert not cell.failures, "\n".join(cell.failures)


def test_roberta_with_a_short_position_table_caps_the_profile_at_its_usable_length(tmp_path, capsys):
    """Failure 3 of issue 13: 66 positions less RoBERTa's offset (padding_idx + 1 = 2) serve 64 tokens. A folder's
    default profile stops there and packages; a profile asking for 66 is one clear error, before any export."""
    from packager.cli import main

    folder = write_tiny("roberta", "embeddings", tmp_path / "roberta66", max_position_embeddings=66)
    assert model_positions(json.loads((folder / "config.json").read_text())).usable == 64
    common = ["--levels", "plain", "--trt-backend", "none", "--no-smoke", "--repository", str(tmp_path / "repo")]
    assert main(["package", str(folder), "--build-dir", str(tmp_path / "build"), *common]) == 0
    spec = json.loads((tmp_path / "build" / "roberta66" / "iospec.json").read_text())
    assert spec["inputs"][0]["name"] == "input_ids"
    out = capsys.readouterr().out
    assert "x64" in out and "x66" not in out  # the gate ran at the capped length

    assert main(["package", str(folder), "--sequence", "2,16,66", "--build-dir", str(tmp_path / "b2"), *common]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: profile sequence max 66 exceeds the 64 positions (roberta: max_position_embeddings 66 "
                      f"less its position offset 2) of the model in {folder}: lower it (--sequence)"]
    assert "Traceback" not in err and not (tmp_path / "b2" / "roberta66").exists()
