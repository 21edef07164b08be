"""Terminal output: step progress and plain-text tables."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    """Print a step's start, and its duration when it ends (or that it failed)."""
    say(f"==> {title}")
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        say(f"    failed after {time.perf_counter() - started:.1f} s")
        raise
    say(f"    done in {time.perf_counter() - started:.1f} s")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for index, row in enumerate(cells):
        lines.append("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.6f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def keep_log(name: str, text: str | None = None, source: Path | None = None) -> Path:
    """A log that outlives the run, in $TMPDIR/triton-packager-logs/<name>-<pid>-<time>.log: `text`, or a copy of
    `source` (a log its owner removes). Error lines name it for whoever reads them."""
    folder = Path(tempfile.gettempdir()) / "triton-packager-logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{os.getpid()}-{int(time.time())}.log"
    path.write_bytes(source.read_bytes() if source is not None else (text or "").encode())
    return path
