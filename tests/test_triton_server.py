"""The Triton server helpers against the real tritonserver from nvidia-pytriton (python backend, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from packager.errors import PackagerError, UsageError
from packager.triton import backends
from packager.triton.server import LocalLauncher, TritonServer, available_backends, load_models, required_backend, serve

ADD_ONE_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [{{ name: "INPUT0", data_type: TYPE_FP32, dims: [-1] }}]
output [{{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [-1] }}]
instance_group [{{ kind: KIND_CPU, count: 1 }}]
"""

ADD_ONE_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {initialize}

    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            output = pb_utils.Tensor("OUTPUT0", values + 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
"""


def write_python_model(repository: Path, name: str, initialize: str = "pass") -> Path:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(ADD_ONE_CONFIG.format(name=name))
    (repository / name / "1" / "model.py").write_text(ADD_ONE_MODEL.format(initialize=initialize))
    return repository / name


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    write_python_model(root, "add_one")
    write_python_model(root, "broken_init", initialize='raise RuntimeError("tokenizer file is missing")')
    (root / "needs_pytorch" / "1").mkdir(parents=True)  # a backend neither the wheel has nor this project builds
    (root / "needs_pytorch" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\nmax_batch_size: 8\n')
    return root


@pytest.fixture(scope="module")
def server(repository):
    with serve("local", repository, ready_timeout_s=60) as running:
        yield running


@pytest.fixture(scope="module")
def loaded(server):
    return load_models(server, ["add_one", "broken_init", "needs_pytorch", "no_such_model"])


def test_add_one_answers_over_http_and_grpc(server, loaded):
    assert loaded["add_one"].ok, loaded["add_one"].error
    batch = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]], dtype=np.float32)

    http_input = httpclient.InferInput("INPUT0", list(batch.shape), "FP32")
    http_input.set_data_from_numpy(batch)
    with httpclient.InferenceServerClient(server.http_url) as client:
        http_answer = client.infer("add_one", [http_input]).as_numpy("OUTPUT0")

    grpc_input = grpcclient.InferInput("INPUT0", list(batch.shape), "FP32")
    grpc_input.set_data_from_numpy(batch)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        grpc_answer = client.infer("add_one", [grpc_input]).as_numpy("OUTPUT0")

    np.testing.assert_array_equal(http_answer, batch + 1)
    np.testing.assert_array_equal(grpc_answer, batch + 1)


def test_failed_loads_keep_tritons_error_naming_model_and_cause(loaded):
    broken = loaded["broken_init"]
    assert not broken.ok
    assert "broken_init" in broken.error and "tokenizer file is missing" in broken.error

    missing_backend = loaded["needs_pytorch"]
    assert not missing_backend.ok
    assert "needs_pytorch" in missing_backend.error and "backend 'pytorch'" in missing_backend.error

    assert "no_such_model" in loaded["no_such_model"].error


def test_a_failed_load_leaves_the_server_ready(server, loaded):
    assert not loaded["broken_init"].ok
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_server_ready()
        assert client.is_model_ready("add_one")


def test_log_tail_shows_the_server_log(server, loaded):
    tail = server.log_tail(200)
    assert "broken_init" in tail
    assert len(server.log_tail(3).splitlines()) == 3


def test_url_launcher_uses_a_running_server_without_stopping_it(server, repository):
    with serve("url", repository, url=f"http://{server.http_url}", grpc_url=server.grpc_url) as borrowed:
        assert borrowed.http_url == server.http_url and borrowed.process is None
        assert load_models(borrowed, ["add_one"])["add_one"].ok
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_server_live()


def test_available_backends(server):
    assert available_backends("local") == {"python"} | ({"onnxruntime"} if backends.find() else set()) == server.backends
    with pytest.raises(UsageError, match="choose one of local, docker, url"):
        available_backends("podman")


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_server_process_is_gone_after_the_context_also_when_the_body_raises(tmp_path, interruption):
    log_path = tmp_path / "logs" / "triton.log"
    with pytest.raises(interruption, match="body failed"), serve("local", tmp_path, log_path=log_path) as running:
        process = running.process
        raise interruption("body failed")
    assert process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # the whole process group (server and stubs) is gone
    assert "Started HTTPService" in log_path.read_text()


def test_stop_kills_a_process_group_that_ignores_sigint():
    ignoring = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; echo started; exec sleep 60'], stdout=subprocess.PIPE, start_new_session=True
    )
    assert ignoring.stdout.readline() == b"started\n"
    started = time.monotonic()
    LocalLauncher().stop(TritonServer("127.0.0.1:1", None, None, ignoring), timeout_s=0.5)
    assert ignoring.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    ignoring.stdout.close()


def test_early_exit_is_one_line_with_the_servers_error_and_a_kept_log(tmp_path):
    with pytest.raises(PackagerError, match="exited with code") as failure, serve("local", tmp_path / "does_not_exist"):
        pass
    message = str(failure.value)
    assert "does_not_exist" in message and "\n" not in message
    log = Path(message.split("(server log: ")[1].rstrip(")"))
    assert log.exists() and "does_not_exist" in log.read_text()


@pytest.mark.parametrize("damage, message", [("missing", "does not exist"), ("not executable", "is not executable")])
def test_a_missing_or_broken_server_binary_is_one_line(tmp_path, monkeypatch, damage, message):
    fake = tmp_path / "tritonserver"
    (fake / "bin").mkdir(parents=True)
    (fake / "backends" / "python").mkdir(parents=True)
    real = backends.wheel_server_dir()
    (fake / "python_backend_stubs").symlink_to(real / "python_backend_stubs")
    if damage == "not executable":
        (fake / "bin" / "tritonserver").write_text("#!/bin/sh\n")
    monkeypatch.setattr(backends, "wheel_server_dir", lambda: fake)
    with pytest.raises(PackagerError, match=message) as failure, serve("local", tmp_path):
        pass
    assert "\n" not in str(failure.value)


def test_a_url_that_is_not_a_triton_server_is_one_line(tmp_path):
    """A TCP server that answers HTTP requests with garbage."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_garbage():
        with suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.recv(1024)
                connection.sendall(b"SSH-2.0-OpenSSH\r\n")
                connection.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    url = f"127.0.0.1:{listener.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(PackagerError, match="answers, but not as an HTTP Triton server"), serve("url", url=url):
        pass
    assert time.monotonic() - started < 10
    listener.close()


def test_the_server_dies_with_a_killed_packager(tmp_path):
    """SIGKILL of the process that started tritonserver takes the server with it (PR_SET_PDEATHSIG)."""
    script = tmp_path / "starter.py"
    script.write_text(
        "import sys, time\n"
        "from packager.triton.server import serve\n"
        f"with serve('local', {str(tmp_path)!r}, ready_timeout_s=60) as server:\n"
        "    print(server.process.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    starter = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    server_pid = int(starter.stdout.readline())
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(server_pid):
        time.sleep(0.1)
    assert not _alive(server_pid), "tritonserver outlived the packager that started it"
    starter.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_ctrl_c_stops_the_server_within_seconds(tmp_path):
    """SIGINT to a command serving a repository: one line, exit 130, server gone, within 5 s."""
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import sys, time\n"
        "from packager.triton.server import serve\n"
        "try:\n"
        f"    with serve('local', {str(tmp_path)!r}, ready_timeout_s=60) as server:\n"
        "        print(server.process.pid, flush=True)\n"
        "        time.sleep(600)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    server_pid = int(process.stdout.readline())
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert time.monotonic() - started < 5
    assert not _alive(server_pid)
    process.stdout.close()


@pytest.mark.parametrize(
    ("config", "backend"),
    [
        ('platform: "onnxruntime_onnx"', "onnxruntime"),
        ('platform: "tensorrt_plan"', "tensorrt"),
        ('platform: "pytorch_libtorch"', "pytorch"),
        ('platform: "tensorflow_savedmodel"', "tensorflow"),
        ('backend: "python"', "python"),
        ('backend: "onnxruntime"', "onnxruntime"),
        ('platform: "ensemble"', None),
    ],
)
def test_required_backend(tmp_path, config, backend):
    path = tmp_path / "config.pbtxt"
    path.write_text(f'name: "m"\n{config}\nmax_batch_size: 8\n')
    assert required_backend(path) == backend


def test_required_backend_rejects_an_unreadable_config(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nbakend: "python"\n')
    with pytest.raises(PackagerError, match="not a valid model config"):
        required_backend(path)
