"""Publishing where a fleet reads: the pin switch's order, S3 (a real moto server on loopback) and local stores behind
one set of release operations (publish, status, verify, rollback, prune), the S3 lock's lease, one-line S3 errors,
and a live tritonserver in poll mode reading the bucket while versions are published, rolled back and a publisher is
SIGKILLed mid-upload.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from packager import cli, fleet, pins, storage
from packager.errors import PackagerError, UsageError
from packager.triton.process import free_ports
from tests.test_repository import PYTHON_ONLY, exported, models_for, release  # noqa: F401 (a fixture)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TEXT = "A man is playing a guitar."
RECIPE = """name = "tiny"
task = "embeddings"
[source]
path = "{source}"
[profile]
batch = [1, 2, 4]
sequence = [2, 16, 32]
[serving]
targets = ["python"]
[optimize]
cpu = ["plain"]
"""


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on a free loopback port, with AWS-style environment credentials: its endpoint URL."""
    port = free_ports(1)[0]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in [*CREDENTIALS, "AWS_ENDPOINT_URL", fleet.SWITCH_WAIT_VARIABLE]}
    os.environ.update(CREDENTIALS)
    os.environ[fleet.SWITCH_WAIT_VARIABLE] = "0"  # no server polls these buckets, but the live test's (it sets its own)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.1)
        yield endpoint
    finally:
        server.kill()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny recipe (name 'tiny', the python target) as a file the CLI reads."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(RECIPE.format(source=tiny_bert_dir))
    return path


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"fleet-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> storage.Store:
    if request.param == "local":
        return storage.LocalStore(tmp_path / "model_repository")
    endpoint = request.getfixturevalue("moto")
    return storage.S3Store(f"s3://{new_bucket(endpoint)}/fleet/repo", endpoint)


def config_pins(store: storage.Store) -> dict[str, list[int]]:
    return {name: sorted(pins.pinned(text)) for name, text in fleet.configs(store).items()}


# ---- the switch's order ------------------------------------------------------------------------------------------


def test_the_switch_lists_both_versions_then_moves_ensembles_then_drops_the_old(exported):
    models = models_for(exported, PYTHON_ONLY)  # tokenizer, model (steps), then the ensemble
    current = {model.name: model.config_text(1) for model in models}
    targets = {model.name: model.config_text(2) for model in models}
    writes = pins.plan(current, targets, {})
    assert [(w.model, w.phase, sorted(pins.pinned(w.text))) for w in writes] == [
        ("tiny_tokenizer", 1, [1, 2]), ("tiny_onnx_python", 1, [1, 2]),
        ("tiny_python", 2, [2]),
        ("tiny_tokenizer", 3, [2]), ("tiny_onnx_python", 3, [2]),
    ]
    assert pins.step_pins(writes[2].text) == {"tiny_tokenizer": 2, "tiny_onnx_python": 2}
    kept = pins.plan(current, targets, {"tiny_tokenizer": frozenset({1})})  # another recipe's ensemble pins it
    last = [w for w in kept if w.model == "tiny_tokenizer"][-1]
    assert sorted(pins.pinned(last.text)) == [1, 2], "a step version another ensemble pins stays listed"
    assert pins.plan(targets, targets, {}) == [], "a switch to what is there writes nothing"


# ---- release operations, local and S3 ----------------------------------------------------------------------------


def test_publish_status_verify_rollback_and_prune(exported, store, recipe_file):
    models = models_for(exported, PYTHON_ONLY)
    for build in ("first", "second"):
        fleet.publish(store, models, release(exported, build=build), {})
    names = ["tiny_onnx_python", "tiny_python", "tiny_tokenizer"]
    assert config_pins(store) == {name: [2] for name in names}
    assert fleet.recipe_models(store, "tiny") == names
    facts = fleet.status(store, "tiny")
    assert [(f.model, f.version, f.pinned) for f in facts if f.model == "tiny_python"] == [
        ("tiny_python", 1, False), ("tiny_python", 2, True)]
    assert "pinned" in fleet.status_table(facts)

    checked, problems = fleet.verify(store, "tiny")
    assert problems == [] and checked == sum(len(f.manifest.files) for f in facts if f.version == 2)
    store.write("tiny_onnx_python/1/model.onnx", b"not the graph")
    assert fleet.verify(store, "tiny")[1] == [], "the served version is whole"
    assert [(p.model, p.file, p.what) for p in fleet.verify(store, "tiny", version=1)[1]] == [
        ("tiny_onnx_python", "model.onnx", "sha256 differs")]
    with pytest.raises(PackagerError, match="1 problem.*tiny_onnx_python/1/model.onnx sha256 differs"):
        cli.cmd_verify(cli.build_parser().parse_args(["verify", str(recipe_file), "--version", "1"] + _where(store)))

    assert fleet.rollback(store, "tiny") == 1
    assert config_pins(store) == {name: [1] for name in names}
    assert fleet.rollback(store, "tiny", to=2) == 2 and config_pins(store) == {name: [2] for name in names}
    fleet.rollback(store, "tiny", to=1)
    assert fleet.prune(store, "tiny", keep=1) == {name: [] for name in names}, "1 is served, 2 the newest"
    fleet.publish(store, models, release(exported, build="third"), {})
    assert fleet.prune(store, "tiny", keep=1) == {name: [1, 2] for name in names}
    assert {name: fleet.versions(store, name) for name in names} == {name: [3] for name in names}
    assert fleet.verify(store, "tiny")[1] == []
    with pytest.raises(UsageError, match="no version of 'tiny' older than 3"):
        fleet.rollback(store, "tiny")


def _where(store: storage.Store) -> list[str]:
    if isinstance(store, storage.S3Store):
        return ["--repository", store.url, "--s3-endpoint", store._endpoint]
    return ["--repository", str(store.root)]


def test_a_served_version_is_never_replaced_in_a_bucket(exported, moto):
    store = storage.S3Store(f"s3://{new_bucket(moto)}/repo", moto)
    fleet.publish(store, models_for(exported, PYTHON_ONLY), release(exported), {})
    with pytest.raises(UsageError, match="version 1 of .* is pinned"):
        fleet.publish(store, models_for(exported, PYTHON_ONLY), release(exported), {}, version=1, force=True)


# ---- the S3 lock -------------------------------------------------------------------------------------------------


def test_the_s3_lock_waits_for_a_live_lease_and_takes_over_an_expired_one(moto, capsys):
    store = storage.S3Store(f"s3://{new_bucket(moto)}/repo", moto)
    key = store.state_prefix + "lock"
    client = store._client
    client.put_object(Bucket=store.bucket, Key=key, Body=storage.Lease("dead", time.time() - 1).encode())
    with store.lock():
        held = storage.Lease.decode(client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        assert held.owner != "dead" and held.expires > time.time()
    assert "lease ran out (dead)" in capsys.readouterr().out
    assert store.read_state("lock") is None, "released on exit"

    client.put_object(Bucket=store.bucket, Key=key, Body=storage.Lease("alive", time.time() + 60).encode())
    threading.Timer(1.5, lambda: client.delete_object(Bucket=store.bucket, Key=key)).start()
    started = time.monotonic()
    with store.lock():
        assert time.monotonic() - started >= 1.5, "waited for the holder"
    assert "waiting for another publish" in capsys.readouterr().out


# ---- one-line errors ---------------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err.strip()


def test_s3_failures_are_one_line_errors(moto, capsys, monkeypatch, recipe_file):
    status = ["status", str(recipe_file)]
    code, err = run_cli([*status, "--repository", "s3://no-such-bucket/repo", "--s3-endpoint", moto], capsys)
    assert code == 1 and err == f"error: bucket 'no-such-bucket' does not exist at {moto}"

    started = time.monotonic()
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    code, err = run_cli([*status, "--repository", "s3://bucket/repo", "--s3-endpoint", down], capsys)
    assert code == 1 and err.startswith(f"error: cannot reach the S3 endpoint at {down}") and "\n" not in err
    assert time.monotonic() - started < 10, "an endpoint that is down is a quick error"

    for key in CREDENTIALS:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = run_cli([*status, "--repository", "s3://bucket/repo", "--s3-endpoint", moto], capsys)
    assert code == 1 and err.startswith("error: no AWS credentials for s3://bucket/repo") and "\n" not in err

    code, err = run_cli([*status, "--repository", "s3://bucket"], capsys)
    assert code == 2 and "use s3://BUCKET/PREFIX" in err


# ---- the fleet's view: a live tritonserver polling the bucket ----------------------------------------------------

POLL = ("--model-control-mode=poll", "--repository-poll-secs=1")
SWITCH_WAIT_S = "1.5"  # after the server reports a phase loaded: more than a poll interval
MAX_REQUESTS, LOOP_LIMIT_S, PAUSE_S = 6000, 240.0, 0.03


@dataclass(frozen=True)
class Built:
    """One tiny release: its recipe file, build folder, rendered models, and PyTorch's answer to TEXT."""

    recipe_file: Path
    build_root: Path
    staged: object  # pipeline.StagedRelease
    answer: np.ndarray


@pytest.fixture(scope="module")
def two_releases(tmp_path_factory, tiny_bert_dir) -> tuple[Built, Built]:
    """v1: the session's tiny BERT; v2: the same architecture with other random weights (seed 1)."""
    from packager import pipeline
    from packager.recipe import load_recipe
    from packager.triton.reference import Reference
    from tests.tiny_model import write_tiny_bert

    built = []
    for seed, folder in ((0, tiny_bert_dir), (1, None)):
        folder = folder or write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-seed1"), seed=seed)
        recipe_path = tmp_path_factory.mktemp(f"recipe{seed}") / "tiny.toml"
        recipe_path.write_text(RECIPE.format(source=folder))
        recipe = load_recipe(str(recipe_path))
        build_root = tmp_path_factory.mktemp(f"build{seed}")
        folder_built = pipeline.build(recipe, pipeline.BuildOptions(build_root=build_root, trt_backend="none"))
        loaded = folder_built.model()
        answer = Reference.of(recipe, folder_built.spec, loaded).answer([TEXT])[folder_built.spec.output_names[0]]
        built.append(Built(recipe_path, build_root, pipeline.stage_release(folder_built, loaded), answer))
    assert not np.allclose(built[0].answer, built[1].answer, atol=1e-2), "the two releases answer differently"
    return built[0], built[1]


class ClientLoop(threading.Thread):
    """Requests through the ensemble, one after another, bounded in count and time: each answer is classified as
    release 0 or 1 (within 1e-4 of PyTorch's answer), or recorded as a failure."""

    def __init__(self, url: str, model: str, text_input: str, output: str, answers: list[np.ndarray]):
        super().__init__(daemon=True)
        self.url, self.model, self.text_input, self.output, self.answers = url, model, text_input, output, answers
        self.seen: list[int] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
        started = time.monotonic()
        try:
            while not self.done.is_set() and len(self.seen) + len(self.failures) < MAX_REQUESTS \
                    and time.monotonic() - started < LOOP_LIMIT_S:
                text = httpclient.InferInput(self.text_input, [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[TEXT.encode()]], dtype=object))
                try:
                    served = client.infer(self.model, [text]).as_numpy(self.output)
                except Exception as exc:  # noqa: BLE001 every failure is recorded and fails the test
                    self.failures.append(str(exc).splitlines()[0])
                    continue
                matches = [i for i, answer in enumerate(self.answers) if np.allclose(served, answer, atol=1e-4)]
                if matches:
                    self.seen.append(matches[0])
                else:
                    self.failures.append(f"an answer of neither release (max |Δ| to each: "
                                         f"{[float(np.abs(served - a).max()) for a in self.answers]})")
                time.sleep(PAUSE_S)
        finally:
            client.close()

    def wait_for(self, release: int, timeout_s: float = 30.0, streak: int = 20) -> None:
        """Until the last `streak` answers all came from `release`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.seen) >= streak and set(self.seen[-streak:]) == {release}:
                return
            assert self.is_alive(), f"the client loop ended early ({len(self.seen)} answers, {len(self.failures)} " \
                                    "failures)"
            time.sleep(0.2)
        raise AssertionError(f"release {release} not served within {timeout_s} s; last: {self.seen[-streak:]}")


def packager_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "packager", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                            cwd=Path(__file__).parent.parent)


def test_a_polling_fleet_never_fails_a_request_while_versions_switch(moto, two_releases, monkeypatch):
    """A tritonserver polling the bucket every second serves the ensemble to a client loop while v2 is published,
    the fleet is rolled back to v1 (CLI), and a publisher of v2 is SIGKILLed mid-upload, then the next publish
    cleans up and goes through: zero failed requests, every answer exactly v1's or v2's."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    from packager.recipe import load_recipe
    from packager.triton.server import serve

    first, second = two_releases
    bucket = new_bucket(moto)
    store = storage.S3Store(f"s3://{bucket}/fleet/repo", moto)
    monkeypatch.setenv(fleet.SWITCH_WAIT_VARIABLE, SWITCH_WAIT_S)
    monkeypatch.setenv(storage.LEASE_VARIABLE, "3")
    where = ["--repository", store.url, "--s3-endpoint", moto]
    assert first.staged.publish_to(store) == 1
    ensemble = "tiny_python"
    spec = first.staged.release.iospec
    with serve("local", f"s3://{moto.removeprefix('http://')}/{bucket}/fleet/repo", ready_timeout_s=60,
               server_args=POLL) as server:
        loop = ClientLoop(server.http_url, ensemble, load_recipe(str(first.recipe_file)).serving.text_input,
                          spec.output_names[0], [first.answer, second.answer])
        _wait_ready(server.http_url, ensemble)
        loop.start()
        try:
            loop.wait_for(0)
            assert second.staged.publish_to(store, servers=(server.http_url,)) == 2
            loop.wait_for(1)

            rolled = packager_cli("rollback", str(first.recipe_file), *where, "--wait-ready", server.http_url)
            assert rolled.wait(60) == 0, rolled.stdout.read()
            loop.wait_for(0)

            killed = packager_cli("publish", str(second.recipe_file), "--build-dir", str(second.build_root),
                                  "--no-smoke", *where, env={fleet.UPLOAD_HOOK: "0.3"})
            deadline = time.monotonic() + 60
            while len(store.sizes("tiny_onnx_python/3/")) < 2:  # its model.py and one more file are up
                assert time.monotonic() < deadline and killed.poll() is None, killed.stdout.read()
                time.sleep(0.05)
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            killed.stdout.close()
            assert store.read_state(fleet.JOURNAL_FILE) is not None, "killed mid-upload, its journal left behind"
            time.sleep(3)  # three polls see the half-uploaded, unpinned version 3
            assert set(loop.seen[-20:]) == {0}, "the fleet still serves v1"

            assert second.staged.publish_to(store, servers=(server.http_url,)) == 3, \
                "the next publish rolled the killed one back, then went through"
            loop.wait_for(1)
        finally:
            loop.done.set()
            loop.join()
    assert loop.failures == [], f"{len(loop.failures)} failed requests, e.g. {loop.failures[:3]}"
    assert 100 <= len(loop.seen) <= MAX_REQUESTS and set(loop.seen) == {0, 1}
    switches = sum(1 for a, b in zip(loop.seen, loop.seen[1:]) if a != b)
    assert switches == 3, f"v1 -> v2 -> v1 -> v2 without flapping, saw {switches} switches"
    assert fleet.verify(store, "tiny")[1] == []


def _wait_ready(url: str, model: str, timeout_s: float = 60.0) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    try:
        while not client.is_model_ready(model):
            assert time.monotonic() < deadline, f"{model} did not become ready in poll mode"
            time.sleep(0.2)
    finally:
        client.close()
