"""TensorRT's messages: a logger that keeps them, and the EngineBuildError made from them on a failure."""

from __future__ import annotations

from collections import deque
from functools import cache
from types import ModuleType

from packager.errors import PackagerError


class EngineBuildError(PackagerError):
    """TensorRT could not parse the graph or build the engine; the message carries the parser errors or log."""


@cache
def _logger_class(trt: ModuleType) -> type:
    class CapturingLogger(trt.ILogger):
        """Keeps every error, and the last INFO-and-above messages, for the error raised on a failure."""

        def __init__(self, keep: int = 60):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.tail: deque[str] = deque(maxlen=keep)

        def log(self, severity, message):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(message)
            if severity <= trt.ILogger.Severity.INFO:
                self.tail.append(f"[{severity.name}] {message}")

    return CapturingLogger


def make_logger(trt: ModuleType):
    """A logger for `trt` (tensorrt or tensorrt_rtx) that keeps its errors and last messages."""
    return _logger_class(trt)()


def build_failure(what: str, logger) -> EngineBuildError:
    """The error for a failed TensorRT call: the first logged error as headline, then the errors and the log tail."""
    errors = list(dict.fromkeys(logger.errors))  # in order, each once
    headline = errors[0] if errors else "no error was logged"
    log = "\n".join(["builder errors:", *errors, "last log messages:", *logger.tail])
    return EngineBuildError(f"{what}: {headline}\n{log}")
