"""The optimize stage: each optimization level the recipe lists for the device is built and gated, and the fastest
that passes ships.

Levels (LEVELS): `plain` (the export itself), `fused` (ONNX Runtime's transformer optimizer), `int8` (the fused
graph quantized, CPU) and `fp16` (the fused graph in fp16, GPU). A level passes when it is within its gate of
PyTorch (recipe [gates], one per level) on the validation text at every profile shape, AND each validation text
gives the same answer alone as inside mixed-length batches (the gate's max_invariance): a served request's answer
must not depend on its batch mates or its padding. The shipped level is the first that passes in the device's
known speed order (SPEED_ORDER, measured by `make bench`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from packager import iospec
from packager.console import table
from packager.errors import GateFailed, PackagerError, UsageError, first_line
from packager.export import Exported
from packager.optimize.base import LevelGraph, LevelInputs
from packager.optimize.fp16 import build_fp16
from packager.optimize.fused import build_fused, build_plain
from packager.optimize.int8 import build_int8
from packager.record import Gate, LevelRecord, OptimizeRecord
from packager.recipe import LEVEL_DEVICES, Recipe, check_levels
from packager.source import LoadedModel
from packager.tasks import Task
from packager.validate import SPAN, InvarianceReport, ParityReport, Validator, onnxruntime_runner

# Known speed order per device, fastest first (CPU: see the README's optimization table, measured by make bench).
SPEED_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("int8", "fused", "plain"), "gpu": ("fp16", "fused", "plain")}


@dataclass(frozen=True)
class Level:
    base: str | None  # the level whose graph this one transforms (built first)
    build: Callable[[LevelInputs], LevelGraph]


LEVELS: dict[str, Level] = {
    "plain": Level(None, build_plain),
    "fused": Level("plain", build_fused),
    "int8": Level("fused", build_int8),
    "fp16": Level("fused", build_fp16),
}
assert set(LEVELS) == set(LEVEL_DEVICES), "every level the recipe schema knows has a builder"


@dataclass(frozen=True)
class LevelResult:
    name: str
    path: Path | None  # None only when the build itself failed (reason says why)
    gate: Gate
    parity: ParityReport | None
    invariance: InvarianceReport | None
    fusions: dict[str, int]
    passed: bool
    reason: str  # why it failed; empty when passed
    shipped: bool = False
    notes: tuple[str, ...] = ()
    valid_for: tuple[str, ...] | None = None  # the CPU classes its gate holds for; None: every one

    def to_record(self, folder: Path) -> LevelRecord:
        """The record, its graph named relative to the build folder `folder`."""
        return LevelRecord(
            self.name, self.passed, self.shipped, self.reason, self.gate, self.fusions, self.notes,
            str(self.path.relative_to(folder)) if self.path else None,
            self.parity.outputs() if self.parity else None, self.invariance,
        )


@dataclass(frozen=True)
class OptimizeResult:
    device: str
    levels: tuple[LevelResult, ...]
    chosen: LevelResult
    why: str

    def level(self, name: str) -> LevelResult:
        return next(result for result in self.levels if result.name == name)

    def to_record(self, folder: Path) -> OptimizeRecord:
        return OptimizeRecord(self.device, self.chosen.name, self.why,
                              tuple(level.to_record(folder) for level in self.levels))

    def table(self) -> str:
        """Every level side by side: gate, worst differences per output, the task metric, invariance, fusions."""
        outputs = list(dict.fromkeys(row.output for r in self.levels if r.parity for row in r.parity.rows
                                     if row.output != SPAN))  # the span row is a metric, no difference
        rows = []
        for result in self.levels:
            summary = result.parity.outputs() if result.parity else {}
            rows.append([
                result.name, result.gate.name, "yes" if result.passed else "no", "<-" if result.shipped else "",
                *(summary[name].max_abs if name in summary else None for name in outputs),
                result.parity.metric_value() if result.parity else None,
                result.invariance.max_abs if result.invariance else None,
                ", ".join(f"{op} {count}" for op, count in result.fusions.items() if count),
                result.reason,
            ])
        headers = ["level", "gate", "passed", "shipped", *(f"max|Δ| {name}" for name in outputs), "metric (worst)",
                   "alone vs batched", "fusions", "reason"]
        return table(headers, rows, title=f"optimization levels for {self.device}")


def optimize(
    loaded: LoadedModel, task: Task, exported: Exported, validator: Validator, recipe: Recipe, device: str,
    work_dir: Path, exported_report: ParityReport | None = None,
) -> OptimizeResult:
    """Build and gate the recipe's levels for `device`; choose the fastest that passed. GateFailed when none did.

    `exported_report` is the export's gate, when it ran already: the plain level reuses it.
    """
    names = recipe.optimize.levels(device)
    try:
        check_levels(device, names)
    except ValueError as exc:
        raise UsageError(f"levels {exc}") from None
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs = LevelInputs(loaded, task, exported, validator, recipe.optimize, recipe.gates, work_dir, exported_report)
    results = [_build_and_gate(inputs, name) for name in names]
    passing = [result for result in results if result.passed]
    if not passing:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in results)
        raise GateFailed(f"no optimization level passed its gate: {reasons}")
    order = SPEED_ORDER[device]
    chosen = min(passing, key=lambda result: order.index(result.name))
    failed_faster = [r for r in results if not r.passed and order.index(r.name) < order.index(chosen.name)]
    why = f"fastest level that passed its gate for {device} (known order {' > '.join(order)})"
    if failed_faster:
        why += "; " + "; ".join(f"{r.name} failed: {r.reason}" for r in failed_faster)
    results = [dataclasses.replace(r, shipped=r is chosen) for r in results]
    return OptimizeResult(device, tuple(results), next(r for r in results if r.shipped), why)


def _build_and_gate(inputs: LevelInputs, name: str) -> LevelResult:
    gate = Gate(*inputs.gates.for_level(name))
    try:
        built = _build(inputs, name)
    except PackagerError as exc:
        return LevelResult(name, None, gate, None, None, {}, False, f"build failed: {first_line(exc)}")
    spec = iospec.from_onnx(built.path)
    if spec != inputs.exported.spec:
        return LevelResult(name, built.path, gate, None, None, built.fusions, False,
                           "its inputs/outputs differ from the export's IO spec", notes=built.notes)
    runner = onnxruntime_runner(built.path, spec)
    report = built.report or inputs.validator.check(name, runner, gate.tolerances)
    invariance = inputs.validator.check_invariance(name, runner, gate.tolerances)
    reason = "; ".join(filter(None, (report.reason, invariance.reason)))
    return LevelResult(name, built.path, gate, report, invariance, built.fusions, not reason, reason, notes=built.notes,
                       valid_for=built.valid_for)


def _build(inputs: LevelInputs, name: str) -> LevelGraph:
    """Build `name`, and first the level it is built from (built, not gated, when it was not asked for)."""
    if name not in inputs.built:
        base = LEVELS[name].base
        if base:
            _build(inputs, base)
        inputs.built[name] = LEVELS[name].build(inputs)
    return inputs.built[name]
