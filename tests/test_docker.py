"""The docker launcher: its command line, and live, a container serving the tiny models through the full smoke and
gone afterwards (after success, a failure, Ctrl-C, and a packager killed with SIGKILL).

Live tests use the image $PACKAGER_DOCKER_IMAGE, else the latest `make triton-image`. Without a Docker daemon or
that image they are skipped, saying why; with PACKAGER_REQUIRE_DOCKER=1 (CI) they fail instead.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="the live smoke needs tritonclient and the tiny models' tools")

import packager
import tests.live_server as live
from packager.cli import main
from packager.errors import PackagerError
from packager.triton.docker import (
    CONTAINER_PREFIX,
    DOCKER_IMAGE_ENV,
    LOCAL_IMAGE,
    DockerLauncher,
    docker_command,
    image_backends,
)
from packager.triton.server import available_backends, serve
from packager.triton.smoke import smoke

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ENV, REQUIRE_ENV = "PACKAGER_DOCKER_IMAGE", "PACKAGER_REQUIRE_DOCKER"
NO_IMAGE = "triton-packager/no-such-image:0"
live_repository, live_embeddings = live.live_repository, live.live_embeddings  # session fixtures


def unavailable(reason: str) -> None:
    """Skip, or fail where the docker path is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def daemon() -> None:
    if shutil.which("docker") is None:
        unavailable("no docker command (scripts/start_dockerd.sh installs docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        unavailable("no Docker daemon answers (scripts/start_dockerd.sh starts one)")


@pytest.fixture(scope="module")
def image(daemon) -> str:
    name = os.environ.get(IMAGE_ENV) or LOCAL_IMAGE
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode != 0:
        unavailable(f"no image {name} (make triton-image builds it; {IMAGE_ENV} names another)")
    return name


def containers() -> set[str]:
    """The names of this project's containers, running or not."""
    listed = subprocess.run(
        ["docker", "ps", "--all", f"--filter=name={CONTAINER_PREFIX}", "--format={{.Names}}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(listed.stdout.split())


def wait_until_gone(names: set[str], timeout_s: float) -> float:
    """Seconds until none of `names` exists; fails after `timeout_s`."""
    started = time.monotonic()
    while names & containers():
        assert time.monotonic() - started < timeout_s, f"containers left: {names & containers()}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_docker_command_runs_the_server_under_the_watchdog_on_loopback_with_a_read_only_repository(tmp_path):
    ports = {"http": 18000, "grpc": 18001, "metrics": 18002}
    argv = docker_command(
        tmp_path, image="nvcr.io/nvidia/tritonserver:24.10-py3", container="t1", ports=ports, gpus=False
    )
    assert argv[:4] == ["docker", "run", "--rm", "--interactive"] and "--name=t1" in argv
    assert "--gpus" not in argv
    assert {
        "--publish=127.0.0.1:18000:8000",
        "--publish=127.0.0.1:18001:8001",
        "--publish=127.0.0.1:18002:8002",
    } <= set(argv)
    assert f"--volume={tmp_path.resolve()}:/models:ro" in argv
    after_image = argv[argv.index("nvcr.io/nvidia/tritonserver:24.10-py3") + 1 :]
    assert after_image[:2] == ["sh", "-c"] and "cat <&3" in after_image[2]
    assert after_image[4:6] == ["tritonserver", "--model-repository=/models"]
    assert "--model-control-mode=explicit" in argv and "--pinned-memory-pool-byte-size=0" in argv

    with_gpus = docker_command(tmp_path, image="img", container="t1", ports=ports, gpus=True)
    assert with_gpus[with_gpus.index("--gpus") + 1] == "all" and "--pinned-memory-pool-byte-size=0" not in with_gpus


def test_docker_image_comes_from_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv(DOCKER_IMAGE_ENV, raising=False)
    assert DockerLauncher(gpus=False).image == "nvcr.io/nvidia/tritonserver:24.10-py3"
    monkeypatch.setenv(DOCKER_IMAGE_ENV, "registry.example/tritonserver:25.01-py3")
    assert DockerLauncher(gpus=False).image == "registry.example/tritonserver:25.01-py3"
    assert DockerLauncher(image="mine:1", gpus=False).image == "mine:1"
    assert DockerLauncher(gpus=False).container.startswith(CONTAINER_PREFIX)


def test_the_image_has_the_locked_versions_of_what_the_python_backend_models_import():
    imported = set()
    for path in (Path(packager.__file__).parent / "templates" / "python").glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level: transformers (slow tokenizers only) is not
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"triton_python_backend_utils"}
    listed = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_image.py"), "--requirements"],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pins = dict(line.split(" ")[0].split("==") for line in listed.stdout.splitlines() if "==" in line)
    assert third_party == {"numpy", "onnxruntime", "tokenizers"}  # import names = distribution names
    lock = (ROOT / "requirements.lock").read_text()
    for name in third_party:
        assert f"\n{name}=={pins[name]} " in lock
    assert listed.stdout.count("--hash=sha256:") >= len(pins) and "nvidia-pytriton" not in pins


def test_docker_launcher_without_a_daemon_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    with pytest.raises(PackagerError, match=r"^docker launcher: ") as failure, serve("docker", tmp_path, gpus=False):
        pass
    assert "\n" not in str(failure.value)


def test_a_missing_image_is_one_line_naming_how_to_get_it(daemon, tmp_path):
    with pytest.raises(PackagerError, match="no image .*make triton-image") as failure:
        with serve("docker", tmp_path, image=NO_IMAGE, gpus=False):
            pass
    assert "\n" not in str(failure.value) and f"docker pull {NO_IMAGE}" in str(failure.value)


def test_backends_come_from_the_images_label(image, monkeypatch):
    backends = image_backends(image)
    assert backends is not None and "python" in backends
    monkeypatch.setenv(DOCKER_IMAGE_ENV, image)
    assert available_backends("docker") == backends
    monkeypatch.setenv(DOCKER_IMAGE_ENV, NO_IMAGE)
    assert available_backends("docker") is None  # unknown: every model is tried


def test_the_full_smoke_passes_through_a_container(image, live_repository, live_embeddings):
    before = containers()
    result = smoke(live_repository, live_embeddings.reference, "docker", models=live_embeddings.models, image=image,
                   gpus=False, ready_timeout_s=60)  # fmt: skip
    assert result.passed, result.summary()
    assert {live_embeddings.named(suffix) for suffix in ("_python", "_onnx_python", "_tokenizer")} <= set(result.served)
    native = {live_embeddings.named(""), live_embeddings.named("_onnx")}
    if "onnxruntime" in image_backends(image):
        assert native <= set(result.served)
    else:
        assert set(result.not_loadable) == native
    checks = {(row.check, row.protocol) for row in result.rows}
    assert {("concurrent = one by one", "http"), ("concurrent = one by one", "grpc"), ("cpu class", "-")} <= checks
    assert containers() == before


def test_package_with_the_docker_launcher_smokes_the_staged_release_and_publishes(image, tmp_path, tiny_bert_dir,
                                                                                  capsys):
    before = containers()
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'name = "tiny"\ntask = "embeddings"\n[source]\npath = "{tiny_bert_dir}"\n'
                      "[profile]\nbatch = [1, 2, 4]\nsequence = [2, 16, 32]\n")
    code = main(["package", str(recipe), "--build-dir", str(tmp_path / "build"), "--repository",
                 str(tmp_path / "repo"), "--levels", "plain", "--trt-backend", "none", "--launcher", "docker",
                 "--image", image])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "live smoke on docker Triton" in out and "published version 1 of tiny_tokenizer" in out
    assert containers() == before


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_the_container_is_removed_when_the_command_fails_or_is_interrupted(image, tmp_path, interruption):
    before = containers()
    started = None
    with pytest.raises(interruption), serve("docker", tmp_path, image=image, gpus=False, ready_timeout_s=60):
        (container,) = containers() - before
        started = time.monotonic()
        raise interruption("body failed")
    assert container not in containers()
    assert time.monotonic() - started < 10


def test_the_container_goes_away_when_the_packager_is_killed(image, tmp_path):
    """SIGKILL leaves no chance to clean up: the container's watchdog stops it when its `docker run` client dies."""
    script = tmp_path / "starter.py"
    script.write_text(
        "import time\n"
        "from packager.triton.server import serve\n"
        f"with serve('docker', {str(tmp_path)!r}, image={image!r}, gpus=False, ready_timeout_s=60):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    before = containers()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert starter.stdout.readline() == "ready\n"
    (container,) = containers() - before
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    starter.stdout.close()
    assert wait_until_gone({container}, timeout_s=20) < 20
