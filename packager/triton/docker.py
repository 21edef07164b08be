"""The docker launcher: a Triton container serving the repository (mounted read-only) on ports of 127.0.0.1.

Any image with `tritonserver` on its PATH: the NGC image (the default; `--gpus all` when a GPU is present) or the
local CPU image that `make triton-image` builds, whose label names its backends. Containers are named
`triton-packager-<hex>` and removed when the server stops. The server runs under a shell watchdog that stops it
when the container's stdin closes, i.e. when its `docker run -i` client ends: so a container also goes away when
the packager is killed with SIGKILL (its client dies with it, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from packager.errors import PackagerError
from packager.releases import PYTRITON_RELEASE, tritonserver_image
from packager.triton.process import CPU_FLAGS, SERVER_FLAGS, TritonServer, free_ports, spawn, stop_process

DOCKER_IMAGE_ENV = "TRITON_DOCKER_IMAGE"
DEFAULT_DOCKER_IMAGE = tritonserver_image(PYTRITON_RELEASE)  # the local launcher's server, in NVIDIA's image
CONTAINER_PREFIX = "triton-packager-"
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
LOCAL_IMAGE = "triton-packager/tritonserver:cpu"  # the latest `make triton-image` (scripts/triton_image.py)
BACKENDS_LABEL = "triton-packager.backends"  # its backends, "python,onnxruntime"
WATCHDOG_KILL_AFTER_S = 10  # after stdin closed: SIGTERM to the server, then SIGKILL this much later
# The container's main process (sh, PID 1): starts "$@" (the server), passes SIGINT/SIGTERM on to it as SIGTERM
# (a background job of sh ignores SIGINT), stops it when stdin reaches its end, and exits with its status.
WATCHDOG = f"""
exec 3<&0
"$@" </dev/null 3<&- &
server=$!
trap 'kill -TERM $server 2>/dev/null' INT TERM
{{ cat <&3 >/dev/null; kill -TERM $server; sleep {WATCHDOG_KILL_AFTER_S}; kill -KILL $server; }} 2>/dev/null &
exec 3<&-
wait $server; status=$?
while kill -0 $server 2>/dev/null; do wait $server; status=$?; done
exit $status
"""


class DockerLauncher:
    """A container of `image`, reached through ports published on 127.0.0.1."""

    def __init__(self, image: str | None = None, gpus: bool | None = None, log_path: Path | str | None = None):
        self.image = image or default_image()
        self.gpus = gpu_present() if gpus is None else gpus
        self.container = f"{CONTAINER_PREFIX}{uuid.uuid4().hex[:12]}"
        self._tempdir = tempfile.TemporaryDirectory(prefix="triton-")  # removed on stop, log included
        self._log_path = Path(log_path) if log_path else Path(self._tempdir.name) / "tritonserver.log"

    @classmethod
    def backends(cls) -> frozenset[str] | None:
        """Those of the default image, when its label names them."""
        return image_backends(default_image())

    def start(self, repository: Path) -> TritonServer:
        require_image(self.image)
        http, grpc, metrics = free_ports(3)
        ports = {"http": http, "grpc": grpc, "metrics": metrics}
        command = docker_command(repository, image=self.image, container=self.container, ports=ports, gpus=self.gpus)
        process = spawn(command, self._log_path, dict(os.environ), stdin=subprocess.PIPE)
        backends = image_backends(self.image)
        return TritonServer(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", self._log_path, process, backends)

    def stop(self, server: TritonServer, timeout_s: float) -> None:
        """Close the client's stdin (the watchdog stops the server), stop the client, then `docker rm -f`."""
        try:
            if server.process is not None and server.process.stdin is not None:
                server.process.stdin.close()
            stop_process(server.process, timeout_s)
        finally:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, check=False)
            self._tempdir.cleanup()


def docker_command(
    repository: Path | str, *, image: str, container: str, ports: dict[str, int], gpus: bool
) -> list[str]:
    """The `docker run -i` argv: repository mounted read-only at /models, ports published on 127.0.0.1 only, the
    server under the stdin watchdog. `ports` maps "http", "grpc" and "metrics" to host ports."""
    publish = [f"--publish=127.0.0.1:{ports[kind]}:{port}" for kind, port in CONTAINER_PORTS.items()]
    return [
        "docker", "run", "--rm", "--interactive", f"--name={container}",
        *(["--gpus", "all"] if gpus else []),
        "--shm-size=1g",  # the python backend passes tensors through shared memory
        *publish,
        f"--volume={Path(repository).resolve()}:/models:ro",
        image,
        "sh", "-c", WATCHDOG, "watchdog",
        "tritonserver", "--model-repository=/models",
        *SERVER_FLAGS,
        *([] if gpus else CPU_FLAGS),
    ]  # fmt: skip


def default_image() -> str:
    return os.environ.get(DOCKER_IMAGE_ENV) or DEFAULT_DOCKER_IMAGE


def image_backends(image: str) -> frozenset[str] | None:
    """The backends `image`'s label names; None when it has no such label or cannot be inspected."""
    if shutil.which("docker") is None:
        return None
    inspected = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image], capture_output=True, text=True
    )
    labels = json.loads(inspected.stdout or "null") if inspected.returncode == 0 else None
    names = (labels or {}).get(BACKENDS_LABEL, "")
    return frozenset(name for name in names.split(",") if name) or None


def require_image(image: str) -> None:
    """A daemon answers and `image` is here (a pull would outlast the server's start timeout), else one line."""
    if shutil.which("docker") is None:
        raise PackagerError("docker launcher: the `docker` command is not installed")
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["docker info failed"])[-1]
        raise PackagerError(f"docker launcher: the docker daemon is not reachable: {reason}")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        raise PackagerError(f"docker launcher: no image {image} here: build it (make triton-image, for the local CPU "
                            f"image) or pull it (docker pull {image})")


def gpu_present() -> bool:
    """True when `nvidia-smi -L` lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0
