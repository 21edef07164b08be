"""What every optimization level is built from (LevelInputs) and what building one gives (LevelGraph)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from packager.export import Exported
from packager.recipe import Gates, Optimize
from packager.source import LoadedModel
from packager.tasks import Task
from packager.validate import ParityReport, Validator


@dataclass(frozen=True)
class LevelGraph:
    """A level's graph, as its builder made it."""

    path: Path
    fusions: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    report: ParityReport | None = None  # the gate's report, when the builder already ran the gate on this graph
    valid_for: tuple[str, ...] | None = None  # the CPU classes (packager.cpu) its gate holds for; None: every one


@dataclass
class LevelInputs:
    """The loaded model, its export and the validator: what each level's builder works from."""

    loaded: LoadedModel
    task: Task
    exported: Exported
    validator: Validator
    settings: Optimize
    gates: Gates
    work_dir: Path
    exported_report: ParityReport | None = None  # the export's own gate, reused by the plain level
    built: dict[str, LevelGraph] = field(default_factory=dict)

    def output(self, level: str) -> Path:
        return self.work_dir / f"model.{level}.onnx"


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the optimizer's and quantizer's info logging and warnings (their results are reported instead)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
