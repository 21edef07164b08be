"""Publishing to a model repository: layout, manifests, versions, names, roll-back, SIGKILL recovery, the lock, and
published version folders that a real tritonserver serves without changing a byte.

The kill and lock tests run real publisher processes (tests/publisher.py is written here, see PUBLISHER) that
stop at a point the test chooses; the test then kills them with SIGKILL or releases the lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import closing, suppress
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from packager import export, render, repository, source
from packager.errors import PackagerError, UsageError
from packager.record import Manifest
from packager.render import Artifacts
from packager.tasks import get_task
from packager.triton.server import load_models, serve
from tests.tiny_model import sample_release

PYTHON_ONLY = ("python",)
BOTH = ("python", "onnxruntime")
PUBLISHER = textwrap.dedent('''
    """A publisher process for the tests: publishes prepared models, optionally stopping at a chosen point."""
    import json, os, sys, time
    from dataclasses import dataclass
    from pathlib import Path

    sys.path.insert(0, os.getcwd())  # the project root: tests.tiny_model
    from packager import repository
    from packager.iospec import IOSpec
    from tests.tiny_model import sample_release


    @dataclass(frozen=True)
    class Prepared:
        name: str
        files: dict
        configs: dict

        def config_text(self, version):
            return self.configs[str(version)]


    def stop(marker):
        Path(marker).write_text("stopped")
        time.sleep(600)


    def stop_before_journal(marker):
        repository._write_journal = lambda *args: stop(marker)


    def stop_after_moves(count, marker):
        apply, done = repository._apply, [0]

        def counting_apply(move):
            if done[0] == count:
                stop(marker)
            apply(move)
            done[0] += 1

        repository._apply = counting_apply


    job = json.loads(Path(sys.argv[1]).read_text())
    if job["stop"] == "journal":
        stop_before_journal(job["marker"])
    elif job["stop"] is not None:
        stop_after_moves(job["stop"], job["marker"])
    models = [Prepared(m["name"], {k: Path(v) for k, v in m["files"].items()}, m["configs"]) for m in job["models"]]
    release = sample_release(IOSpec.from_dict(job["spec"]), {"name": "tiny", "publisher": job["publisher"]})
    Path(job["marker"] + ".ready").write_text("publishing")
    result = repository.publish(job["root"], models, release, {}, job["version"], job["force"])
    print(f"published version {result.version}", flush=True)
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_recipe_embeddings):
    loaded = source.load(tiny_recipe_embeddings)
    folder = tmp_path_factory.mktemp("tiny")
    result = export.export_onnx(loaded, get_task("embeddings"), folder / "model.onnx", tiny_recipe_embeddings.opset)
    return tiny_recipe_embeddings, result.spec, Artifacts(result.path, loaded.tokenizer), loaded.weights_sha256


def models_for(exported, targets: tuple[str, ...]) -> list[render.RenderedModel]:
    recipe, spec, artifacts, _ = exported
    return render.render_repository(recipe.override({"serving": {"targets": list(targets)}}), spec, artifacts)


def release(exported, **recipe_data):
    """A release of the exported tiny model; `recipe_data` marks it (e.g. build="first")."""
    return sample_release(exported[1], {"name": "tiny", **recipe_data})


def publish(root, exported, targets, version=None, force=False, **mark):
    return repository.publish(root, models_for(exported, targets), release(exported, **mark), {}, version, force)


def mark(folder: Path) -> dict:
    """The recipe data a version's manifest records (where the tests put their marks)."""
    return Manifest.read(folder).release.recipe


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "model_repository"


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a content hash (files) or 'dir'."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def complete(version_folder: Path) -> bool:
    """A version folder holds exactly the files its manifest lists, with their digests."""
    manifest = Manifest.read(version_folder)
    files = {str(p.relative_to(version_folder)) for p in version_folder.rglob("*") if p.is_file()}
    return files == set(manifest.files) | {repository.MANIFEST_FILE} and all(
        hashlib.sha256((version_folder / name).read_bytes()).hexdigest() == digest
        for name, digest in manifest.files.items()
    )


def workspace(root: Path) -> Path:
    return root.parent / f".{root.name}.publish"


# ---- layout, manifest, versions ------------------------------------------------------------------------------------


def test_publish_lays_out_models_versions_and_manifests(exported, root):
    recipe, spec, artifacts, weights = exported
    gates = {"tiny_onnx": release(exported).build.shipped_gate}
    result = repository.publish(root, models_for(exported, BOTH), release(exported), gates)
    names = ["tiny_tokenizer", "tiny_onnx_python", "tiny_python", "tiny_onnx", "tiny"]
    assert result.version == 1 and result.paths == {name: root / name / "1" for name in names}
    assert sorted(p.name for p in root.iterdir()) == sorted(names), "only model folders in the repository"
    assert sorted(p.name for p in (root / "tiny_onnx" / "1").iterdir()) == ["config.pbtxt", "manifest.json",
                                                                           "model.onnx"]
    assert sorted(p.name for p in (root / "tiny" / "1").iterdir()) == ["config.pbtxt", "manifest.json"]
    for name in names:  # each version keeps the config it was published with (what a rollback switches back to)
        assert (root / name / "1" / "config.pbtxt").read_text() == (root / name / "config.pbtxt").read_text()
    graphs = [root / "tiny_onnx" / "1" / "model.onnx", root / "tiny_onnx_python" / "1" / "model.onnx"]
    assert graphs[0].stat().st_ino == graphs[1].stat().st_ino and graphs[0].stat().st_nlink == 2, \
        "the graph both models serve is stored once (a hard link)"
    assert (root / "tiny_tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    for name in names:
        assert parse(root / name / "config.pbtxt").name == name and complete(root / name / "1")
    record = json.loads((root / "tiny_onnx" / "1" / "manifest.json").read_text())
    assert record["schema"] == 1 and record["version"] == 1 and record["model"] == "tiny_onnx"
    assert record["models"] == names and record["gate"]["name"] == "fp32"
    shared = record["release"]
    assert shared["iospec"]["inputs"][0]["name"] == "input_ids" and shared["build"]["optimize"]["shipped"] == "plain"
    assert set(shared["packages"]) >= {"python", "torch", "transformers", "onnx", "onnxruntime", "tritonclient"}
    assert all(shared["packages"][name] for name in ("torch", "onnx", "onnxruntime", "tritonclient"))
    assert shared["created"] and "lock_sha256" in shared
    assert record["files"]["model.onnx"] == hashlib.sha256(artifacts.onnx.read_bytes()).hexdigest()
    assert Manifest.read(root / "tiny_tokenizer" / "1").gate is None, "the tokenizer runs no gated graph"


def test_each_publish_adds_the_next_version_across_the_recipes_models(exported, root):
    assert publish(root, exported, PYTHON_ONLY).version == 1
    first = tree(root / "tiny_onnx_python" / "1")
    result = publish(root, exported, BOTH)  # tiny_onnx and tiny are new: they start at 2
    assert result.version == 2
    assert repository.versions(root / "tiny_onnx_python") == [1, 2] and repository.versions(root / "tiny_onnx") == [2]
    assert tree(root / "tiny_onnx_python" / "1") == first, "an earlier version is left alone"
    ensemble = parse(root / "tiny_python" / "config.pbtxt")
    assert [step.model_version for step in ensemble.ensemble_scheduling.step] == [2, 2]
    assert list(parse(root / "tiny_onnx_python" / "config.pbtxt").version_policy.specific.versions) == [2]


def test_an_existing_version_is_replaced_only_with_force(exported, root):
    publish(root, exported, PYTHON_ONLY, build="first")
    publish(root, exported, PYTHON_ONLY, build="second")
    with pytest.raises(UsageError, match="version 1 of tiny_tokenizer, tiny_onnx_python, tiny_python exists.*--force"):
        publish(root, exported, PYTHON_ONLY, version=1, build="third")
    assert mark(root / "tiny_python" / "1")["build"] == "first"
    result = publish(root, exported, PYTHON_ONLY, version=1, force=True, build="third")
    assert result.version == 1 and repository.versions(root / "tiny_python") == [1, 2]
    assert mark(root / "tiny_python" / "1")["build"] == "third"
    assert list(parse(root / "tiny_python" / "config.pbtxt").version_policy.specific.versions) == [1]
    assert publish(root, exported, PYTHON_ONLY, version=7).version == 7
    assert publish(root, exported, PYTHON_ONLY).version == 8


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "-flag", "with space", "", "model\\x", "é"])
def test_names_that_could_escape_or_are_not_triton_names_are_refused(exported, root, name):
    with pytest.raises(UsageError, match="invalid model name"):
        repository.check_name(name)
    model = models_for(exported, PYTHON_ONLY)[0]
    renamed = render.RenderedModel(name, model.template, model.context, model.files)
    with pytest.raises(UsageError):
        repository.publish(root, [renamed], release(exported), {})
    assert not root.exists() or not any(root.iterdir())


def test_files_that_would_leave_the_version_folder_are_refused(exported, root):
    model = models_for(exported, PYTHON_ONLY)[0]
    sneaky = render.RenderedModel(model.name, model.template, model.context, {"../config.pbtxt": b"x"})
    with pytest.raises(UsageError, match="invalid file name"):
        repository.publish(root, [sneaky], release(exported), {})


# ---- python modules byte-compiled at staging ---------------------------------------------------------------------


PYC = f"__pycache__/model.{sys.implementation.cache_tag}.pyc"


def test_python_backend_modules_are_published_with_their_hash_checked_bytecode(exported, root):
    result = publish(root, exported, BOTH)
    for name in ("tiny_tokenizer", "tiny_onnx_python"):
        folder = result.paths[name]
        assert PYC in Manifest.read(folder).files and complete(folder)
        compiled = (folder / PYC).read_bytes()
        assert compiled[:4] == importlib.util.MAGIC_NUMBER
        assert int.from_bytes(compiled[4:8], "little") == 0b11, "hash-based and checked, not an mtime check"
        assert compiled[8:16] == importlib.util.source_hash((folder / "model.py").read_bytes())
    assert not (result.paths["tiny_onnx"] / "__pycache__").exists(), "no python module, no bytecode"
    again = publish(root, exported, BOTH)
    assert (again.paths["tiny_tokenizer"] / PYC).read_bytes() == (result.paths["tiny_tokenizer"] / PYC).read_bytes()


def test_a_python_module_that_does_not_compile_stops_the_publish(exported, root, tmp_path):
    broken = tmp_path / "model.py"
    broken.write_text("def initialize(self:\n")
    model = models_for(exported, PYTHON_ONLY)[0]
    broken_model = render.RenderedModel(model.name, model.template, model.context, {"model.py": broken})
    with pytest.raises(PackagerError, match=r"model.py of tiny_tokenizer does not compile: .*line 1"):
        repository.publish(root, [broken_model], release(exported), {})
    assert not any(root.iterdir())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every path under `folder`, the folder itself included: its content hash (or 'dir') and its mtime."""
    return {
        str(p.relative_to(folder)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest(),
                                     p.stat().st_mtime_ns)
        for p in [folder, *sorted(folder.rglob("*"))]
    }


def test_serving_a_published_version_changes_nothing_in_its_folder(exported, root):
    """The real tritonserver loads and runs the python models; their version folders stay byte-for-byte the same."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    result = publish(root, exported, PYTHON_ONLY)
    before = {name: snapshot(folder) for name, folder in result.paths.items()}
    with serve("local", root, ready_timeout_s=60) as server:
        loaded = load_models(server, ["tiny_python"])["tiny_python"]
        assert loaded.ok, loaded.error
        text = httpclient.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"A man is playing a guitar."], [b"Ok."]], dtype=object))
        with closing(httpclient.InferenceServerClient(server.http_url)) as client:
            assert client.infer("tiny_python", [text]).as_numpy("sentence_embedding").shape == (2, 32)
    for name, folder in result.paths.items():
        assert snapshot(folder) == before[name], f"serving changed {name}'s published version"
        assert complete(folder)


# ---- failures and roll-back ----------------------------------------------------------------------------------------


def test_a_failure_while_staging_leaves_the_repository_as_it_was(exported, root, tmp_path):
    publish(root, exported, PYTHON_ONLY)
    before = tree(root)
    models = models_for(exported, PYTHON_ONLY)
    broken = render.RenderedModel(models[-1].name, models[-1].template, models[-1].context,
                                  {"model.onnx": tmp_path / "missing.onnx"})
    with pytest.raises(PackagerError, match="cannot copy .*missing.onnx into tiny_python"):
        repository.publish(root, models[:-1] + [broken], release(exported), {})
    assert tree(root) == before and not list(workspace(root).glob("txn-*"))


def test_a_failure_while_moving_is_rolled_back_at_once(exported, root):
    publish(root, exported, PYTHON_ONLY)
    config = root / "tiny_python" / repository.CONFIG_FILE
    config.unlink()
    config.mkdir()  # a folder where the ensemble's config must go: its move fails after the others went through
    before = tree(root)
    with pytest.raises(OSError):
        publish(root, exported, PYTHON_ONLY)
    assert tree(root) == before and not list(workspace(root).glob("txn-*"))


# ---- real publisher processes: SIGKILL half-way, and two at once ----------------------------------------------------


def prepare(exported, targets: tuple[str, ...], folder: Path) -> list[dict]:
    """The rendered models as data a publisher process reads: files on disk, configs for versions 1..9."""
    prepared = []
    for model in models_for(exported, targets):
        files = {}
        for relative, data in model.files.items():
            if isinstance(data, bytes):
                path = folder / model.name / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                data = path
            files[relative] = str(data)
        configs = {str(version): model.config_text(version) for version in range(1, 10)}
        prepared.append({"name": model.name, "files": files, "configs": configs})
    return prepared


def start_publisher(tmp_path: Path, root: Path, models: list[dict], publisher: str, stop=None,
                    version: int | None = None, force: bool = False, spec=None) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    marker = tmp_path / f"{publisher}.stopped"
    marker.unlink(missing_ok=True)
    job = tmp_path / f"{publisher}.json"
    job.write_text(json.dumps({"root": str(root), "models": models, "publisher": publisher, "stop": stop,
                               "marker": str(marker), "version": version, "force": force, "spec": spec}))
    process = subprocess.Popen([sys.executable, str(script), str(job)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parent.parent)
    return process, marker


def wait_stopped_or_done(process: subprocess.Popen, marker: Path) -> bool:
    """True when the publisher stopped at its point, False when it finished (it had fewer moves)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        if process.poll() is not None:
            output = process.stdout.read()
            assert process.returncode == 0, output
            return False
        time.sleep(0.02)
    process.kill()
    raise AssertionError("the publisher neither stopped nor finished")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()


def assert_killed_publish_is_undone(root: Path, before: dict[str, str], moved: bool) -> None:
    """Right after the kill every version folder is whole and every config parses; recovery restores the rest."""
    for model in root.iterdir():
        parse(model / repository.CONFIG_FILE)
        for version in repository.versions(model):
            assert complete(model / str(version)), f"{model.name}/{version} is half-written"
    assert repository.recover(root) == int(moved), "a journal is rolled back; bare staging is only cleared"
    assert tree(root) == before
    assert not list(workspace(root).glob("txn-*"))


@pytest.mark.parametrize("scenario, moves", [("next version, two new models", 10), ("forced replacement", 3)])
def test_a_publish_killed_at_any_point_leaves_the_repository_exactly_as_it_was(exported, root, tmp_path, scenario,
                                                                               moves):
    publish(root, exported, PYTHON_ONLY, build="original")
    forced = scenario == "forced replacement"
    spec = dataclasses.asdict(exported[1])
    models = prepare(exported, PYTHON_ONLY if forced else BOTH, tmp_path / "prepared")
    before = tree(root)
    killed = 0
    for stop in ["journal", *range(moves + 1)]:
        process, marker = start_publisher(tmp_path, root, models, "killed", stop, version=1 if forced else None,
                                          force=forced, spec=spec)
        if not wait_stopped_or_done(process, marker):
            break
        kill(process)
        killed += 1
        assert_killed_publish_is_undone(root, before, moved=stop != "journal")
    assert killed == moves + 1, "stopped before the journal and after each move but the last"
    expected = 1 if forced else 2
    assert repository.versions(root / "tiny_python")[-1] == expected, "the publish that was not stopped went through"
    assert mark(root / "tiny_python" / str(expected))["publisher"] == "killed"


def test_concurrent_publishers_are_serialised_and_both_versions_land(exported, root, tmp_path):
    publish(root, exported, PYTHON_ONLY)
    models = prepare(exported, PYTHON_ONLY, tmp_path / "prepared")
    spec = dataclasses.asdict(exported[1])
    with (workspace(root) / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # hold the lock until both publishers are queued behind it
        processes = [start_publisher(tmp_path, root, models, name, spec=spec)[0] for name in ("first", "second")]
        for process in processes:
            assert "waiting for another publish" in process.stdout.readline()
        assert repository.versions(root / "tiny_python") == [1], "nobody published while the lock was held"
        fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    published = sorted(int(out.split("published version ")[1]) for out in outputs)
    assert published == [2, 3]
    for model in ("tiny_tokenizer", "tiny_onnx_python", "tiny_python"):
        assert repository.versions(root / model) == [1, 2, 3]
        assert all(complete(root / model / str(version)) for version in (1, 2, 3))
    publishers = {mark(root / "tiny_python" / str(v))["publisher"] for v in (2, 3)}
    assert publishers == {"first", "second"}


def test_recover_on_a_clean_repository_does_nothing(exported, root):
    assert repository.recover(root) == 0
    publish(root, exported, PYTHON_ONLY)
    before = tree(root)
    assert repository.recover(root) == 0 and tree(root) == before


def test_publishes_killed_at_random_moments_leave_a_repository_a_live_server_loads(exported, root, tmp_path):
    """20 publishers killed with SIGKILL at random moments of their publish, each followed by the next publish:
    every version on disk stays whole, and after a last normal publish the real tritonserver serves the newest."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    publish(root, exported, PYTHON_ONLY)
    models = prepare(exported, PYTHON_ONLY, tmp_path / "prepared")
    spec = dataclasses.asdict(exported[1])
    rng = random.Random(20261130)
    for attempt in range(20):
        process, marker = start_publisher(tmp_path, root, models, f"killed{attempt}", spec=spec)
        ready = Path(f"{marker}.ready")
        while not ready.exists() and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        kill(process)
        ready.unlink(missing_ok=True)
        for model in root.iterdir():
            parse(model / repository.CONFIG_FILE)
            assert all(complete(model / str(v)) for v in repository.versions(model)), f"{model.name} half-written"
    final = publish(root, exported, PYTHON_ONLY)
    assert not list(workspace(root).glob("txn-*")), "the last publish cleared what the killed ones left"
    with serve("local", root, ready_timeout_s=60) as server:
        loaded = load_models(server, ["tiny_python"])["tiny_python"]
        assert loaded.ok, loaded.error
        text = httpclient.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"A man is playing a guitar."]], dtype=object))
        with closing(httpclient.InferenceServerClient(server.http_url)) as client:
            assert client.is_model_ready("tiny_python", str(final.version))
            assert client.infer("tiny_python", [text]).as_numpy("sentence_embedding").shape == (1, 32)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (mounting needs root and CAP_SYS_ADMIN, as on the CI machines)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_leaves_no_partial_version(exported, small_disk):
    root = small_disk / "model_repository"
    publish(root, exported, PYTHON_ONLY)
    before = tree(root)
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # fill the disk to its last block
        with suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    with pytest.raises(PackagerError, match="cannot (stage version 2|copy).*No space left on device") as failure:
        publish(root, exported, PYTHON_ONLY)
    assert "\n" not in str(failure.value)
    assert tree(root) == before and not list(workspace(root).glob("txn-*"))
    filler.unlink()
    assert publish(root, exported, PYTHON_ONLY).version == 2 and complete(root / "tiny_python" / "2")
