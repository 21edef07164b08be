"""Start, wait for and stop a Triton Inference Server, and load models into it.

Three launchers share one interface (`LAUNCHERS`): `local` runs the tritonserver binary shipped in the
nvidia-pytriton wheel (its python backend, plus the onnxruntime backend once `make triton-backends` has built it,
see triton.backends), `docker` runs a container (docker.py), `url` uses a server that is
already running. `serve()` always stops what it started, also on errors and Ctrl-C.
"""

from __future__ import annotations

import http.client
import os
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from packager.console import keep_log
from packager.errors import PackagerError, UsageError
from packager.storage import is_s3
from packager.triton import LAUNCHER_NAMES
from packager.triton import backends as built_backends
from packager.triton.docker import DockerLauncher
from packager.triton.process import CPU_FLAGS, SERVER_FLAGS, TritonServer, free_ports, spawn, stop_process

INTERRUPT_GRACE_S = 2.0  # after Ctrl-C: SIGINT, this long, then SIGKILL
CPU_NOISE = ("CudaDriverHelper",)  # error lines every start logs on a machine without a GPU
PLATFORM_BACKENDS: dict[str, str | None] = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": None,  # built into the server
}


@dataclass(frozen=True)
class LoadResult:
    """The outcome of loading one model: `error` is Triton's text when the load failed."""

    name: str
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class Launcher(Protocol):
    """Starts and stops one server; built by `serve()` from keyword options."""

    def start(self, repository: Path) -> TritonServer: ...

    def stop(self, server: TritonServer, timeout_s: float) -> None: ...

    @classmethod
    def backends(cls) -> frozenset[str] | None:
        """The backends the server will have; None when unknown (assume all)."""
        ...


class LocalLauncher:
    """The tritonserver binary from the nvidia-pytriton wheel, run in its own process group, with the wheel's
    backends and the onnxruntime backend built for it (when `make triton-backends` has built it)."""

    def __init__(self, log_path: Path | str | None = None, server_args: tuple[str, ...] = ()):
        self._server_args = server_args  # e.g. ("--model-control-mode=poll",): replace the defaults they name
        self._tempdir = tempfile.TemporaryDirectory(prefix="triton-")  # removed on stop, log included
        self._workdir = Path(self._tempdir.name)
        self._log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"

    @classmethod
    def backends(cls) -> frozenset[str]:
        return frozenset(_backend_folders(built_backends.wheel_server_dir()))

    def start(self, repository: Path | str) -> TritonServer:
        server_dir = built_backends.wheel_server_dir()
        http, grpc, metrics = free_ports(3)
        named = {arg.split("=", 1)[0] for arg in self._server_args}
        command = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={repository if is_s3(repository) else Path(repository).resolve()}",
            f"--backend-directory={self._backend_directory(server_dir)}",
            *_bind_flags("127.0.0.1", http, grpc, metrics),
            *[flag for flag in SERVER_FLAGS if flag.split("=", 1)[0] not in named],
            *self._server_args,
            *CPU_FLAGS,
        ]
        process = spawn(command, self._log_path, self._environment())
        return TritonServer(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", self._log_path, process, self.backends())

    def stop(self, server: TritonServer, timeout_s: float) -> None:
        try:
            stop_process(server.process, timeout_s)
        finally:
            self._tempdir.cleanup()

    def _backend_directory(self, server_dir: Path) -> Path:
        """Symlinks to each backend's files (the wheel's and the built onnxruntime backend), plus the python stub
        for the running Python. The python backend's files stay in the wheel (as symlinks), where they find the
        wheel's libraries."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise PackagerError(f"nvidia-pytriton has no python backend stub for Python {version}")
        backends = self._workdir / "backends"
        for name, folder in _backend_folders(server_dir).items():
            target = backends / name
            target.mkdir(parents=True, exist_ok=True)
            for item in folder.iterdir():
                if item.name != "__pycache__":
                    (target / item.name).symlink_to(item)
        (backends / "python" / stub.name).symlink_to(stub)
        return backends

    def _environment(self) -> dict[str, str]:
        """The stub finds the venv through `python3` on PATH and must load this Python's libpython."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR")
        soname = sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and (Path(libdir) / soname).exists():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        cache = self._workdir / "cache"  # onnxruntime writes telemetry here
        cache.mkdir(exist_ok=True)
        env["XDG_CACHE_HOME"] = env["TMPDIR"] = str(cache)
        return env


class UrlLauncher:
    """A server that is already running: nothing is started or stopped."""

    def __init__(self, url: str, grpc_url: str | None = None):
        self._url = _host_port(url)
        self._grpc_url = _host_port(grpc_url) if grpc_url else None

    @classmethod
    def backends(cls) -> None:
        return None

    def start(self, repository: Path) -> TritonServer:
        return TritonServer(self._url, self._grpc_url, log_path=None)

    def stop(self, server: TritonServer, timeout_s: float) -> None:
        """Leave it running: someone else owns it."""


LAUNCHERS: dict[str, type[Launcher]] = {"local": LocalLauncher, "docker": DockerLauncher, "url": UrlLauncher}
assert tuple(LAUNCHERS) == LAUNCHER_NAMES


@contextmanager
def serve(
    launcher_name: str = "local",
    repository: Path | str = ".",
    *,
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 20.0,
    **options,
) -> Iterator[TritonServer]:
    """Start a server on `repository`, wait until it is ready, yield it, and always stop it.

    `repository` is a folder, or s3://HOST:PORT/BUCKET/PREFIX for a local server reading a bucket.
    `options` go to the launcher: local `log_path`, `server_args`; docker `image`, `gpus`, `log_path`; url `url`,
    `grpc_url`.
    Without `log_path` the log lives in a temporary folder removed when the server stops.
    """
    launcher_class = _launcher_class(launcher_name)
    try:
        launcher = launcher_class(**options)
    except TypeError as error:
        raise UsageError(f"Triton launcher {launcher_name!r}: {error}") from None
    server = launcher.start(repository if is_s3(repository) else Path(repository))
    try:
        wait_until_ready(server, ready_timeout_s)
        yield server
    except KeyboardInterrupt:
        stop_timeout_s = INTERRUPT_GRACE_S
        raise
    finally:
        launcher.stop(server, stop_timeout_s)


def available_backends(launcher_name: str) -> frozenset[str] | None:
    """The backends a launcher's server has; None means all (or unknown)."""
    return _launcher_class(launcher_name).backends()


def required_backend(config_pbtxt_path: Path | str) -> str | None:
    """The backend a model's config.pbtxt needs; None for an ensemble (built into the server)."""
    path = Path(config_pbtxt_path)
    try:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise PackagerError(f"{path}: not a valid model config: {error}") from error
    if config.backend:
        return config.backend
    if config.platform.startswith("tensorflow_"):
        return "tensorflow"
    if config.platform in PLATFORM_BACKENDS:
        return PLATFORM_BACKENDS[config.platform]
    raise PackagerError(f"{path}: cannot tell the backend (backend={config.backend!r}, platform={config.platform!r})")


def load_models(server: TritonServer, names: Iterable[str], timeout_s: float = 300.0) -> dict[str, LoadResult]:
    """Load each model through explicit model control; a failed load keeps Triton's error text."""
    results = {}
    with _http_client(server, timeout_s) as client:
        for name in names:
            started = time.monotonic()
            try:
                client.load_model(name)
                error = None
            except InferenceServerException as failure:
                error = failure.message() or str(failure)
            results[name] = LoadResult(name, error, time.monotonic() - started)
    return results


def unload_models(server: TritonServer, names: Iterable[str], timeout_s: float = 60.0) -> None:
    """Unload each model through explicit model control (an ensemble with the models it loaded)."""
    with _http_client(server, timeout_s) as client:
        for name in names:
            client.unload_model(name, unload_dependents=True)


def wait_until_ready(server: TritonServer, timeout_s: float) -> None:
    """Wait for `/v2/health/live`, then for server readiness; raise with the log tail on failure."""
    deadline = time.monotonic() + timeout_s
    while not _is_live(server):
        _check_still_starting(server, deadline, "live")
        time.sleep(0.1)
    with _http_client(server, timeout_s) as client:
        while not _answers(client.is_server_ready):
            _check_still_starting(server, deadline, "ready")
            time.sleep(0.1)


def _launcher_class(name: str) -> type[Launcher]:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise UsageError(f"unknown Triton launcher {name!r}; choose one of {', '.join(LAUNCHERS)}") from None


def _backend_folders(server_dir: Path) -> dict[str, Path]:
    """Backend name -> folder: the wheel's, plus the onnxruntime backend built for this server, when there is one."""
    folders = {path.name: path for path in (server_dir / "backends").iterdir() if path.is_dir()}
    built = built_backends.find()
    if built is not None:
        folders.setdefault(built_backends.BACKEND, built)
    return folders


def _bind_flags(address: str, http: int, grpc: int, metrics: int) -> list[str]:
    return [
        f"--http-address={address}", f"--http-port={http}",
        f"--grpc-address={address}", f"--grpc-port={grpc}",
        f"--metrics-address={address}", f"--metrics-port={metrics}",
    ]  # fmt: skip


def _check_still_starting(server: TritonServer, deadline: float, state: str) -> None:
    if server.process is not None and server.process.poll() is not None:
        _fail(server, f"tritonserver exited with code {server.process.returncode} before it was {state}")
    if time.monotonic() > deadline:
        _fail(server, f"Triton at {server.http_url} was not {state} in time")


def _fail(server: TritonServer, reason: str) -> NoReturn:
    """One line: the reason, the server's first error line, and a copy of its log that outlives the server."""
    log = kept_log(server)
    lines = log.read_text(errors="replace").splitlines() if log else []
    errors = [line for line in lines if line.startswith(("E", "error:")) and not any(n in line for n in CPU_NOISE)]
    detail = f": {' '.join(errors[-1].split())[:200]}" if errors else ""
    raise PackagerError(f"{reason}{detail}" + (f" (server log: {log})" if log else ""))


def kept_log(server: TritonServer) -> Path | None:
    """A copy of the server's log in $TMPDIR/triton-packager-logs/ (the launcher removes its own on stop)."""
    if server.log_path is None or not server.log_path.exists():
        return None
    return keep_log("tritonserver", source=server.log_path)


def _is_live(server: TritonServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    except http.client.HTTPException:
        raise PackagerError(f"{server.http_url} answers, but not as an HTTP Triton server (/v2/health/live): check "
                            "the --url host:port") from None


def _answers(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except InferenceServerException:
        return False


@contextmanager
def _http_client(server: TritonServer, timeout_s: float) -> Iterator[InferenceServerClient]:
    """An HTTP client that is closed on exit: an open keep-alive connection delays server shutdown."""
    with closing(InferenceServerClient(server.http_url, network_timeout=timeout_s)) as client:
        yield client


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")
