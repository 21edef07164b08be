"""The live smoke against the real tritonserver serving the tiny models' repository: the python target always, the
native onnxruntime target when its backend is built (required in CI)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np

import pytest

pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")

from packager import source, validate
from packager.errors import GateFailed, UsageError
from packager.iospec import IOSpec
from packager.triton.client import PROTOCOLS as WIRES, connection
from packager.triton.discovery import discover, published_models
from packager.triton.reference import Reference
from packager.triton.rows import CheckStatus
from packager.triton.smoke import require, smoke
from tests.live_server import native_backend, require_native_backend
from tests.tiny_model import tiny_recipe, write_tiny_bert

PROTOCOLS = ("http", "grpc")
BAD_REQUESTS = ("wrong datatype", "wrong rank", "missing input", "batch above max_batch_size")


def run_on_live_server(server, repository, published, reference=None, **options):
    """The smoke through the url launcher: the session's server is used, not started or stopped."""
    return smoke(
        repository, reference or published.reference, "url",
        url=server.http_url, grpc_url=server.grpc_url, models=options.pop("models", published.models), **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def embeddings_smoke(live_server, live_repository, live_embeddings, live_loaded):
    return run_on_live_server(live_server, live_repository, live_embeddings)


def checks_of(result, model, protocol):
    return {row.check: row for row in result.rows if row.model == model and row.protocol == protocol}


def served_targets(published) -> list[tuple[str, str]]:
    """(ensemble, model) of each target this server serves: python always, onnxruntime with its built backend."""
    targets = [(published.named("_python"), published.named("_onnx_python"))]
    return targets + ([(published.named(""), published.named("_onnx"))] if native_backend() else [])


def assert_full_checks(result, ensemble, model, protocol):
    """Metadata, text through the ensemble and tensors through the model against PyTorch, concurrency, bad requests."""
    text_checks = checks_of(result, ensemble, protocol)
    assert {"model ready", "metadata = IO spec", "config = IO spec", "concurrent = one by one",
            "healthy after bad requests"} <= set(text_checks)  # fmt: skip
    assert {f"bad request: {bad}" for bad in BAD_REQUESTS} <= set(text_checks)
    cases = [check for check in text_checks if check.startswith("text → PyTorch")]
    assert any("longer than max sequence" in c for c in cases) and any("non-ASCII" in c for c in cases)
    assert all("cosine" in text_checks[c].detail for c in cases)

    token_checks = checks_of(result, model, protocol)
    assert {"metadata = IO spec", "config = IO spec", "healthy after bad requests"} <= set(token_checks)
    assert any(check.startswith("tokens → PyTorch") for check in token_checks)
    assert "joined up to" in token_checks["concurrent = one by one"].detail
    assert {f"bad request: {bad}" for bad in BAD_REQUESTS} <= set(token_checks)
    assert all(row.passed for row in [*text_checks.values(), *token_checks.values()])


def test_smoke_passes_over_http_and_grpc(embeddings_smoke, live_embeddings):
    assert embeddings_smoke.passed, embeddings_smoke.summary()
    tokenizer = live_embeddings.named("_tokenizer")
    targets = served_targets(live_embeddings)
    assert set(embeddings_smoke.served) == {tokenizer, *(name for target in targets for name in target)}
    for protocol in PROTOCOLS:
        for ensemble, model in targets:
            assert_full_checks(embeddings_smoke, ensemble, model, protocol)
        assert checks_of(embeddings_smoke, tokenizer, protocol)["tokens = HF tokenizer"].passed
        unknown = f"{targets[-1][1]}_no_such_model"
        assert checks_of(embeddings_smoke, unknown, protocol)["bad request: unknown model"].passed


def test_the_native_backend_serves_the_onnx_model_and_its_ensemble(embeddings_smoke, live_embeddings):
    """Triton's onnxruntime backend, built against the ORT library that gated the graph: the same checks as the
    python target; its batcher joins only equal shapes, so the ensemble's ragged texts need not be joined."""
    require_native_backend()
    ensemble, model = live_embeddings.named(""), live_embeddings.named("_onnx")
    assert {ensemble, model} <= set(embeddings_smoke.served) and not embeddings_smoke.not_loadable
    for protocol in PROTOCOLS:
        assert_full_checks(embeddings_smoke, ensemble, model, protocol)
        joined = checks_of(embeddings_smoke, ensemble, protocol)["concurrent = one by one"].detail
        assert f"{model} joined up to" in joined or f"{model} joined none" in joined


def test_the_native_backend_computes_what_onnxruntime_computes_in_process(
    live_server, live_repository, live_embeddings, live_loaded
):
    """The served graph's answers equal the same graph on the in-process ONNX Runtime: one library, one version."""
    require_native_backend()
    model = live_embeddings.named("_onnx")
    graph = live_repository / model / "1" / "model.onnx"
    batch = live_embeddings.reference.tokenize(validate.VALIDATION_TEXTS[:4])
    expected = validate.onnxruntime_runner(graph, live_embeddings.spec)(batch.inputs)
    with connection(WIRES["grpc"], live_server) as client:
        served = client.infer(model, batch.inputs, list(live_embeddings.spec.output_names))
    for name, values in served.items():
        np.testing.assert_allclose(values, expected[name], rtol=0, atol=1e-5, err_msg=name)


def test_bad_requests_show_tritons_errors(embeddings_smoke, live_embeddings):
    model = live_embeddings.named("_onnx_python")
    for protocol in PROTOCOLS:
        checks = checks_of(embeddings_smoke, model, protocol)
        assert "data-type is 'FP64'" in checks["bad request: wrong datatype"].detail
        assert "batch-size must be <= 4" in checks["bad request: batch above max_batch_size"].detail
        assert "missing required input" in checks["bad request: missing input"].detail


def test_models_without_their_backend_are_reported_not_passed(tmp_path, live_repository, live_embeddings,
                                                             without_native_backend):
    """A local server of its own, without the onnxruntime backend: the native target is reported, not passed."""
    onnxruntime_model, onnxruntime_ensemble = live_embeddings.named("_onnx"), live_embeddings.named("")
    models = [onnxruntime_model, onnxruntime_ensemble]
    result = smoke(live_repository, live_embeddings.reference, "local", models=models)
    expected = "not loadable on this server: backend onnxruntime missing"
    assert result.not_loadable == {onnxruntime_model: expected, onnxruntime_ensemble: expected}
    assert not result.served and [row.check for row in result.failures] == ["text end to end"]
    summary = result.summary()
    assert "Models in the repository" in summary and expected in summary


def test_loading_serves_what_the_server_has_a_backend_for(live_loaded, live_embeddings, live_classifier):
    for published in (live_embeddings, live_classifier):
        ensembles = {published.named("_python"), published.named("")}
        python_ensemble, tokenizer = published.named("_python"), published.named("_tokenizer")
        assert live_loaded[python_ensemble].status is CheckStatus.PASS
        assert live_loaded[python_ensemble].detail.startswith("loaded in")
        assert live_loaded[tokenizer].detail in {f"loaded as a step of {ensemble}" for ensemble in ensembles}
        for name in (published.named("_onnx"), published.named("")):
            row = live_loaded[name]
            if native_backend():
                assert row.status is CheckStatus.PASS, row.detail
            else:
                assert row.status is CheckStatus.SKIP and "backend onnxruntime missing" in row.detail


def test_classifier_is_checked_with_argmax(live_server, live_repository, live_classifier, live_loaded):
    ensemble = live_classifier.named("_python")
    portable = [ensemble, live_classifier.named("_onnx_python"), live_classifier.named("_tokenizer")]
    result = run_on_live_server(live_server, live_repository, live_classifier, models=portable, protocols=("grpc",))
    assert result.passed, result.summary()
    text_rows = [row for row in result.rows if row.model == ensemble and row.check.startswith("text → PyTorch")]
    assert text_rows and all("argmax 1.000000" in row.detail for row in text_rows)


def test_answers_of_another_model_fail_the_smoke(tmp_path, live_server, live_repository, live_embeddings, live_loaded):
    other = tiny_recipe(write_tiny_bert(tmp_path / "other", seed=1))
    reference = Reference.of(other, live_embeddings.spec, source.load(other))
    ensemble = live_embeddings.named("_python")
    result = run_on_live_server(
        live_server, live_repository, live_embeddings, reference, models=[ensemble], protocols=("http",)
    )
    failed = {row.check for row in result.failures}
    assert any(check.startswith("text → PyTorch") for check in failed)
    assert "max |Δ|" in result.failures[0].detail
    with pytest.raises(GateFailed, match=f"live Triton smoke failed .* {ensemble}"):
        require(result)


def test_a_spec_that_differs_from_the_served_config_fails_metadata_and_config(
    live_server, live_repository, live_embeddings, live_loaded
):
    spec = live_embeddings.spec
    changed = IOSpec((dataclasses.replace(spec.inputs[0], dtype="INT32"), *spec.inputs[1:]), spec.outputs)
    reference = dataclasses.replace(live_embeddings.reference, spec=changed)
    model = live_embeddings.named("_onnx_python")
    result = run_on_live_server(
        live_server, live_repository, live_embeddings, reference, models=[model], protocols=("grpc",)
    )
    checks = checks_of(result, model, "grpc")
    name = spec.inputs[0].name
    assert not checks["metadata = IO spec"].passed
    assert f"input '{name}': served INT64 [-1, -1], expected INT32 [-1, -1]" in checks["metadata = IO spec"].detail
    assert f"input '{name}': served TYPE_INT64 [-1], expected TYPE_INT32 [-1]" in checks["config = IO spec"].detail


def test_a_broken_config_fails_naming_the_model_and_the_cause(tmp_path, live_repository, live_embeddings,
                                                             without_native_backend):
    """A local server of its own, without the onnxruntime backend: the GPU instance group cannot load on a CPU-only
    server."""
    repository = tmp_path / "model_repository"
    for name in live_embeddings.models:
        shutil.copytree(live_repository / name, repository / name)
    model, onnxruntime_model = live_embeddings.named("_onnx_python"), live_embeddings.named("_onnx")
    config = repository / model / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_CPU", "KIND_GPU"))

    result = smoke(repository, live_embeddings.reference, "local", models=[model, onnxruntime_model])

    assert not result.passed
    load = {row.model: row for row in result.rows if row.check == "load"}
    assert load[model].status is CheckStatus.FAIL
    assert f"model {model} has kind KIND_GPU but no GPUs are available" in load[model].detail
    assert load[onnxruntime_model].status is CheckStatus.SKIP  # the local launcher knows its backends before loading
    assert [row.check for row in result.failures] == ["load", "text end to end"]
    assert model in result.log_tail


def test_an_unreadable_config_is_a_failed_row_naming_the_file(tmp_path):
    (tmp_path / "good" / "1").mkdir(parents=True)
    (tmp_path / "good" / "config.pbtxt").write_text('name: "good"\nbackend: "python"\nmax_batch_size: 4\n')
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "config.pbtxt").write_text('name: "typo"\nbakend: "python"\n')
    models, rows = discover(tmp_path)
    assert list(models) == ["good"] and models["good"].backend == "python" and models["good"].version == 1
    [row] = rows
    assert row.model == "typo" and row.status is CheckStatus.FAIL
    assert "typo/config.pbtxt: not a valid model config" in row.detail and "bakend" in row.detail


def test_published_models_come_from_the_manifests(live_repository, live_embeddings, live_classifier):
    names, spec = published_models(live_repository, live_embeddings.recipe.name)
    assert sorted(names) == sorted(live_embeddings.models)
    assert spec == live_embeddings.spec
    with pytest.raises(UsageError, match="no model of recipe 'nothing'"):
        published_models(live_repository, "nothing")


def test_unknown_protocol_is_a_usage_error(live_repository, live_embeddings):
    with pytest.raises(UsageError, match="choose from http, grpc"):
        smoke(live_repository, live_embeddings.reference, "url", url="127.0.0.1:1", protocols=("websocket",))
