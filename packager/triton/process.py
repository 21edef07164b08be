"""The server process: its flags and ports, its handle, started in its own process group and tied to the packager's
life, stopped in two steps. Shared by the launchers (server.py, docker.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from packager.errors import PackagerError

LOG_TAIL_LINES = 20

# Server flags for every launcher that starts a server. Models are loaded one by one over the API, where a failed
# load is reported per model and neither stops the server nor (without strict readiness) makes it unready.
# --exit-on-error stays true: it then only covers start-up failures (e.g. a missing repository), which would
# otherwise leave a server running that never becomes live.
SERVER_FLAGS = (
    "--model-control-mode=explicit",
    "--strict-readiness=false",
    "--exit-on-error=true",
    "--exit-timeout-secs=5",  # a stop waits at most this long for in-flight requests
    "--log-verbose=0",
)
CPU_FLAGS = (
    "--pinned-memory-pool-byte-size=0",
    "--cuda-memory-pool-byte-size=0:0",
    "--allow-gpu-metrics=false",
)


@dataclass
class TritonServer:
    """A reachable server. URLs are `host:port`, the form tritonclient takes; `grpc_url` may be unknown.

    `backends`: the backends it has; None when unknown (assume all).
    """

    http_url: str
    grpc_url: str | None
    log_path: Path | None
    process: subprocess.Popen | None = field(default=None, repr=False)
    backends: frozenset[str] | None = None

    def log_tail(self, n_lines: int = LOG_TAIL_LINES) -> str:
        """The last `n_lines` lines of the server log ("" when there is no log here)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def spawn(
    command: list[str], log_path: Path, env: dict[str, str], stdin: int = subprocess.DEVNULL
) -> subprocess.Popen:
    """Start `command` in its own process group (Ctrl-C in the terminal does not reach it), output to the log.

    On Linux the server is killed when the packager dies, even by SIGKILL (PR_SET_PDEATHSIG): no server outlives
    the run that started it. `stdin=subprocess.PIPE` keeps a pipe open to it for as long as the packager holds it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        try:
            return subprocess.Popen(
                command, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except FileNotFoundError:
            raise PackagerError(f"{command[0]} does not exist: reinstall it (for the local launcher: "
                                "pip install nvidia-pytriton, as `make` does)") from None
        except PermissionError:
            raise PackagerError(f"{command[0]} is not executable: check its permissions (chmod +x)") from None


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGKILL when the parent thread dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def stop_process(process: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGINT to the process group; SIGKILL to what is left of it after `timeout_s` or an interrupted wait."""
    if process is None:
        return
    try:
        if process.poll() is None:
            signal_group(process, signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
    finally:
        signal_group(process, signal.SIGKILL)  # also python backend stubs left by a server that crashed
        process.wait()


def signal_group(process: subprocess.Popen, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
