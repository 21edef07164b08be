"""The server process: started in its own process group and tied to the packager's life, stopped in two steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from packager.errors import PackagerError


def spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `command` in its own process group (Ctrl-C in the terminal does not reach it), output to the log.

    On Linux the server is killed when the packager dies, even by SIGKILL (PR_SET_PDEATHSIG): no server outlives
    the run that started it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        try:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
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
