"""The benchmark on the tiny model: inputs, FLOPs, peak, interleaved in-process timing, the closed-loop clients, and one
small run with a real Triton server whose report is checked for structure and sane numbers (never for speed)."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from packager import source
from packager.bench.cli import add_arguments, options_from_args
from packager.bench.flops import Peak, best_peaks, measure_peaks, model_flops
from packager.bench.measure import benchmark, ensure_build
from packager.bench.mixed import mixed_lengths
from packager.bench.options import BenchOptions, Budget, LoadBudget
from packager.bench.in_process import PYTORCH, graphs_of, interleaved, measure_in_process
from packager.bench.served import PHASES, closed_loop
from packager.bench.workload import make_workload, text_of_length, token_count
from packager.errors import PackagerError, UsageError
from packager.tasks import get_task
from tests.live_server import native_backend

TINY_SHAPE = (1, 16)
CONCURRENCY = (1, 2)
PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="module")
def build(tiny_recipe_embeddings, tmp_path_factory):
    """The tiny model built by the bench itself (no build folder yet), as `packager package` builds it."""
    return ensure_build(tiny_recipe_embeddings, tmp_path_factory.mktemp("build"))


def gated_levels(build) -> list[str]:
    """The levels of the build that passed their gates, in the recipe's order."""
    return [level.level for level in build.record.optimize.levels if level.passed]


@pytest.fixture(scope="module")
def loaded(tiny_recipe_embeddings):
    return source.load(tiny_recipe_embeddings)


@pytest.fixture(scope="module")
def report(tiny_recipe_embeddings, build, tmp_path_factory):
    """One tiny run, served part included (a real local tritonserver), written to disk."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    options = BenchOptions(
        build_root=build.folder.parent, shapes=(TINY_SHAPE,), concurrency=CONCURRENCY, protocols=PROTOCOLS,
        budget=Budget(warmup=1, max_rounds=3, seconds=2, passes=2),
        load=LoadBudget(warmup=1, max_requests=12, seconds=2), peak_size=128, command="pytest tiny bench",
    )
    report = benchmark(tiny_recipe_embeddings, options)
    return report, report.write(tmp_path_factory.mktemp("reports") / tiny_recipe_embeddings.name)


# ---- inputs


@pytest.mark.parametrize("tokens", [2, 3, 17, 32])
def test_text_of_length_gives_exactly_that_many_tokens(loaded, tokens):
    text = text_of_length(loaded.tokenizer, tokens)
    assert token_count(loaded.tokenizer, text, 64) == tokens
    assert tokens == 2 or text.strip()


def test_workload_tokens_are_what_the_served_tokenizer_gives(loaded, build, tiny_recipe_embeddings):
    workload = make_workload(loaded.tokenizer, build.spec, 4, 32)
    assert workload.shape == "4x32" and len(workload.texts) == 4
    assert all(value.shape == (4, 32) for value in workload.inputs.values())
    lengths = workload.inputs["attention_mask"].sum(axis=1)
    assert lengths[0] == 32 and (lengths[1:] < 32).all()  # one exact row, the others real shorter texts
    # The served tokenizer pads a request to its longest text, truncating at the profile's max: the same tensors.
    served = loaded.tokenizer(list(workload.texts), padding="longest", truncation=True,
                              max_length=tiny_recipe_embeddings.profile.sequence.max, return_tensors="np")
    for name, value in workload.inputs.items():
        assert (served[name] == value).all(), name


# ---- FLOPs and peak


def tiny_bert_flops(batch: int, sequence: int, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> float:
    """2 × multiply-accumulates of a BERT encoder: QKV and output projections, the FFN, QKᵀ and softmax·V."""
    projections = 3 * hidden * hidden + hidden * hidden + 2 * hidden * intermediate
    return layers * (2.0 * batch * sequence * projections + 4.0 * batch * sequence * sequence * hidden)


def test_flops_of_plain_and_fused_graphs_match_the_architecture(build):
    shapes = [(1, 16), (3, 32)]
    plain = model_flops(build.level_path("plain"), build.spec, shapes)
    fused = model_flops(build.folder / "levels" / "model.fused.onnx", build.spec, shapes)
    assert plain == fused == {shape: tiny_bert_flops(*shape) for shape in shapes}


def test_flops_need_concrete_shapes(build, tmp_path):
    with pytest.raises(PackagerError, match="cannot infer the shapes of model.int8.onnx"):
        model_flops(build.folder / "levels" / "model.int8.onnx", build.spec, [TINY_SHAPE])
    assert not list(Path.cwd().glob("sym_shape_infer_temp*"))  # its failure leaves nothing in the working directory


def test_peaks_are_measured_per_precision():
    peaks = measure_peaks(threads=1, size=128, repeats=2)
    assert set(peaks) == {"fp32", "int8"}
    assert all(peak.gflops > 0 and "128x128" in peak.method for peak in peaks.values())


# ---- in process


def test_interleaved_measures_round_robin_within_its_budget():
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = interleaved(candidates, Budget(warmup=2, max_rounds=4, seconds=60, passes=1))
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warmup, not timed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # rotated each round
    assert {name: len(t.samples_ms) for name, t in timings.items()} == {"a": 4, "b": 4, "c": 4}
    slow = interleaved({"sleep": lambda: time.sleep(0.02)}, Budget(warmup=0, max_rounds=1000, seconds=0.05))
    assert 2 <= len(slow["sleep"].samples_ms) < 10  # the time budget ends the pass long before max_rounds


def test_measure_in_process_reports_every_gated_level_against_pytorch(build, loaded):
    graphs = graphs_of(build)
    assert [g.level for g in graphs] == gated_levels(build) and {"plain", "fused"} <= set(gated_levels(build))
    assert all(g.precision == ("int8" if g.level == "int8" else "fp32") for g in graphs)
    assert [g.shipped for g in graphs] == [g.level == build.record.optimize.shipped for g in graphs]
    assert graphs[0].path == build.level_path("plain")
    wrapper = get_task(build.recipe.task).wrapper(loaded, build.spec.input_names).eval()
    workloads = [make_workload(loaded.tokenizer, build.spec, *shape) for shape in [(1, 16), (2, 32)]]
    budget = Budget(warmup=1, max_rounds=3, seconds=5, passes=2)
    measurements = measure_in_process(wrapper, build.spec, graphs, workloads, budget, threads=1)
    candidates = [PYTORCH, *(f"onnxruntime {level}" for level in gated_levels(build))]
    assert [(m.candidate, m.batch, m.sequence) for m in measurements] == [
        (c, b, s) for b, s in [(1, 16), (2, 32)] for c in candidates]
    assert all(m.speedup == 1.0 and m.parity == "reference" for m in measurements if m.candidate == PYTORCH)
    assert all(m.latency.requests == 6 and m.latency.p50_ms > 0 and m.threads == 1 for m in measurements)
    shipped = next(m for m in measurements if m.candidate == f"onnxruntime {build.record.optimize.shipped}")
    assert shipped.parity.startswith("cosine ") and shipped.parity.endswith("(shipped)")


# ---- the closed loop of served clients


@contextmanager
def counting_client(calls: list, fail_at: int | None = None):
    def call(check: bool) -> None:
        calls.append((threading.get_ident(), check))
        if fail_at is not None and len(calls) >= fail_at:
            raise PackagerError("the server said no")
    yield call


def test_closed_loop_stops_at_its_request_budget_after_a_checked_warmup():
    calls: list = []
    ready: list[int] = []
    budget = LoadBudget(warmup=2, max_requests=10, seconds=60)
    latencies, seconds = closed_loop(lambda: counting_client(calls), 3, budget, lambda: ready.append(len(calls)))
    assert ready == [6]  # when_ready runs once, after every client's warmup
    assert sum(check for _, check in calls) == 6 and len(calls) == 16 and len(latencies) == 10
    assert len({thread for thread, _ in calls}) == 3 and 0 < seconds < 60


def test_closed_loop_raises_the_first_client_error():
    calls: list = []
    with pytest.raises(PackagerError, match="a benchmark request failed: the server said no"):
        closed_loop(lambda: counting_client(calls, fail_at=5), 2, LoadBudget(warmup=1, max_requests=100,
                                                                                           seconds=60))
    assert len(calls) < 100


# ---- the tiny run, served part included


def numbers(value, path="$"):
    """Every number of a JSON document with its path (booleans are flags, not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_report_files_and_json_structure(report, build, tiny_recipe_embeddings):
    result, paths = report
    assert {path.name for path in paths.values()} == {"bench.json", "bench.md", "bench.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"model", "command", "settings", "machine", "peaks", "flops", "in_process", "served"}
    assert data["model"] == tiny_recipe_embeddings.name and data["command"] == "pytest tiny bench"
    assert data["flops"] == {"1x16": tiny_bert_flops(*TINY_SHAPE)} and set(data["peaks"]) == {"fp32", "int8"}
    assert [row["candidate"] for row in data["in_process"]] == [
        PYTORCH, *(f"onnxruntime {level}" for level in gated_levels(build))]
    row_keys = {"latency", "p50_vs_pytorch", "throughput_vs_pytorch", "gflops_per_s", "percent_of_peak",
                "sequences_per_s"}
    assert all(row_keys <= set(row) for row in data["in_process"] + data["served"]["points"])
    assert set(data["in_process"][0]["latency"]) == {"requests", "p50_ms", "p90_ms", "p99_ms", "inferences_per_s"}
    bad = [(path, value) for path, value in numbers(data) if not (math.isfinite(value) and value > 0)]
    assert not bad, bad


def served_endpoints(name: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Endpoint -> (backend, steps): the python target always, the native one when its backend is built."""
    python = {f"{name}_python": ("python", (f"{name}_tokenizer", f"{name}_onnx_python")),
              f"{name}_onnx_python": ("python", (f"{name}_onnx_python",))}
    native = {name: ("onnxruntime", (f"{name}_tokenizer", f"{name}_onnx")),
              f"{name}_onnx": ("onnxruntime", (f"{name}_onnx",))}
    return python | (native if native_backend() else {})


def test_served_points_cover_the_grid_with_server_statistics(report, build, tiny_recipe_embeddings):
    result, _ = report
    name = tiny_recipe_embeddings.name
    served, endpoints = result.served, served_endpoints(name)
    assert served.shipped_level == build.record.optimize.shipped and served.server_version
    grid = {(p.protocol, p.model, p.dynamic_batching, p.concurrency) for p in served.points}
    assert grid == {(protocol, model, batching, clients) for protocol in PROTOCOLS for model in endpoints
                    for batching in (True, False) for clients in CONCURRENCY}
    # without the built onnxruntime backend, the wheel's server reports the native target as not served
    assert set(served.not_served) == ({name, f"{name}_onnx"} - set(endpoints))
    for point in served.points:
        times = {t.model: t for t in point.server}
        # Triton counted exactly the timed requests: the warmup came before the first statistics snapshot.
        assert times[point.model].requests == point.latency.requests
        assert all(times[step].requests == point.latency.requests for step in point.steps)
        assert all(point.phase_ms(phase) > 0 for phase in PHASES)
        assert (point.backend, point.steps) == endpoints[point.model]
        if not point.dynamic_batching:
            assert point.average_batch == 1.0  # reloaded without dynamic batching: one request per execution


def test_markdown_tables(report, build):
    result, paths = report
    text = paths["markdown"].read_text()
    assert text.startswith(f"# Benchmark: {result.model}") and "![latency against throughput](bench.png)" in text
    in_process = result.in_process_table().splitlines()
    served = result.served_table().splitlines()
    assert len(in_process) == 2 + 1 + len(gated_levels(build)) and in_process[2].startswith("| pytorch eager | 1×16 |")
    endpoints = served_endpoints(result.model)
    assert len(served) == 2 + len(result.served.points) == 2 + len(endpoints) * 2 * 2 * len(CONCURRENCY)
    assert all(line.count("|") == served[0].count("|") for line in served)
    assert {f"→ {model} ({backend})" for model, (backend, _) in endpoints.items()} == {
        line.split(" | ")[1].split(" ", 1)[1] for line in served[2:]}
    backends = result.backends_table().splitlines()
    names = sorted({backend for backend, _ in endpoints.values()}, key=["onnxruntime", "python"].index)
    assert len(backends) == 2 + len(PROTOCOLS) * 2 * len(CONCURRENCY)  # protocol × input × clients, batching on
    assert all(f"{backend}: p50 ms / seq/s" in backends[0] for backend in names)
    assert "–" not in "".join(backends[2:])  # every backend and the in-process graph measured at every row
    assert "\n".join(in_process) in text and "\n".join(served) in text and "\n".join(backends) in text


# ---- options


def parse(*argv: str) -> BenchOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(argv))


def test_command_line_options():
    default = parse()
    assert default.shapes is None and default.concurrency == (1, 2, 4, 8) and default.serve
    assert default.launcher == "local" and parse("--launcher", "docker").launcher == "docker"
    options = parse("bert", "--shapes", "1x128, 8X64", "--served-shapes", "2x32", "--concurrency", "1,3",
                    "--protocols", "grpc", "--no-serve", "--passes", "1", "--requests", "5", "--point-seconds", "0.5")
    assert options.shapes == ((1, 128), (8, 64)) and options.served_shapes == ((2, 32),)
    assert options.concurrency == (1, 3) and options.protocols == ("grpc",) and not options.serve
    assert options.budget.passes == 1 and options.load == LoadBudget(max_requests=5, seconds=0.5)
    for bad, message in [(["--shapes", "1x"], "--shapes"), (["--served-shapes", "0x8"], "--served-shapes"),
                         (["--concurrency", "0"], "--concurrency"), (["--concurrency", "a"], "--concurrency"),
                         (["--protocols", "udp"], "--protocols"), (["--passes", "0"], "--passes"),
                         (["--point-seconds", "0"], "--point-seconds"), (["--requests", "-1"], "--requests")]:
        with pytest.raises(UsageError, match=message):
            parse(*bad)


def test_grid_defaults_to_the_profile_and_stays_inside_it(tiny_recipe_embeddings):
    assert BenchOptions().grid(tiny_recipe_embeddings) == ([(1, 16), (2, 16)], [(1, 16)])
    shapes, served = BenchOptions(shapes=((4, 32),), served_shapes=((1, 8),)).grid(tiny_recipe_embeddings)
    assert shapes == [(4, 32), (1, 8)] and served == [(1, 8)]  # served shapes get their PyTorch baseline
    with pytest.raises(UsageError, match="shape 8x16 is outside the profile"):
        BenchOptions(shapes=((8, 16),)).grid(tiny_recipe_embeddings)


def test_packager_bench_subcommand():
    from packager import cli

    args = cli.build_parser().parse_args(["bench", "bert", "--served-shapes", "1x64", "--no-serve"])
    assert args.run is cli.cmd_bench and options_from_args(args).served_shapes == ((1, 64),)


def test_best_peaks_keeps_the_highest_measurement_per_precision():
    early = {"fp32": Peak("fp32", 100.0, "a"), "int8": Peak("int8", 500.0, "a")}
    late = {"fp32": Peak("fp32", 150.0, "b"), "int8": Peak("int8", 400.0, "b")}
    assert best_peaks(early, late) == {"fp32": late["fp32"], "int8": early["int8"]}


def test_mixed_length_clients_go_through_every_ensemble_with_buckets_on_and_off(report, tiny_recipe_embeddings):
    result, paths = report
    name = tiny_recipe_embeddings.name
    mixed = result.served.mixed
    ensembles = {p.model for p in mixed}
    assert f"{name}_python" in ensembles
    for ensemble in ensembles:
        assert sorted(p.buckets for p in mixed if p.model == ensemble) == [False, True]
    assert all(p.lengths == (8, 16) and p.clients == 2 and p.latency.requests > 0 for p in mixed)
    assert all(p.average_batch is None or p.average_batch >= 1 for p in mixed)
    data = json.loads(paths["json"].read_text())
    assert len(data["served"]["mixed_lengths"]) == len(mixed)
    assert "### Mixed lengths: what length buckets do" in paths["markdown"].read_text()


def test_mixed_lengths_spread_from_the_shortest_to_the_longest():
    assert mixed_lengths(8, 128, 8) == (8, 12, 18, 26, 39, 58, 86, 128)
    assert mixed_lengths(8, 16, 2) == (8, 16)
