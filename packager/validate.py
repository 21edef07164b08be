"""The gate: a candidate graph against PyTorch on real tokenized text at the profile's shapes, and against itself
when a text's batch mates and padding change.

Differences are measured over real (non-padded) positions only: padded positions carry no meaning and differ
between runtimes by ~1e-4 while real tokens agree to ~1e-5 (measured on MiniLM with ONNX Runtime 1.32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from packager.errors import GateFailed, PackagerError
from packager.iospec import SEQUENCE, IOSpec
from packager.recipe import Profile, Tolerances

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from packager.tasks import BatchReference, Task

# Short, long (needs truncation at 256 tokens), non-ASCII, emoji, empty: the gate's fixed text set.
VALIDATION_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Triton serves many models from one repository, each with its own configuration and versions.",
    "Où est la gare ? Je voudrais un café crème, s'il vous plaît.",
    "東京は日本の首都です。今日はとても暑いですね。",
    "Great job team 🎉🚀 see you tomorrow 👋",
    "Ok.",
    "Здравствуйте, как у вас дела сегодня?",
    " ".join(["This sentence is repeated to make a document far longer than the maximum sequence length."] * 40),
    "Numbers like 3.14159, 2026-11-27 and 1e-9 are tokenized into several pieces.",
    "def export(model): return torch.onnx.export(model, args, 'model.onnx')",
)

Inputs = dict[str, np.ndarray]
Runner = Callable[[Inputs], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ValidationBatch:
    batch: int
    sequence: int
    texts: tuple[str, ...]
    inputs: Inputs
    mask: np.ndarray  # (batch, sequence), 1 on real tokens

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.sequence}"

    @classmethod
    def of(cls, texts: list[str] | tuple[str, ...], inputs: Inputs) -> "ValidationBatch":
        """The batch of `texts` tokenized as `inputs`; without an attention mask every position is real."""
        batch, sequence = next(iter(inputs.values())).shape
        mask = inputs["attention_mask"] if "attention_mask" in inputs else np.ones((batch, sequence), np.int64)
        return cls(batch, sequence, tuple(texts), inputs, mask)


def tokenize(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, texts: list[str], sequence: int) -> Inputs:
    """Tokenize to exactly `sequence` tokens (truncate and pad), in the IO spec's names and dtypes."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=sequence, return_tensors="np")
    return {t.name: np.asarray(encoded[t.name]).astype(t.numpy_dtype) for t in spec.inputs}


def make_batches(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, profile: Profile) -> list[ValidationBatch]:
    """One batch per (batch, sequence) pair of the profile's distinct min/opt/max sizes."""
    shortest = len(tokenizer("", truncation=False)["input_ids"])
    if profile.sequence.min < shortest:
        raise PackagerError(
            f"profile sequence min {profile.sequence.min} is below the {shortest} tokens the tokenizer gives for an "
            "empty text"
        )
    batches = []
    for index, (batch, sequence) in enumerate(
        (b, s) for b in profile.batch.values() for s in profile.sequence.values()
    ):
        texts = tuple(VALIDATION_TEXTS[(index + row) % len(VALIDATION_TEXTS)] for row in range(batch))
        batches.append(ValidationBatch.of(texts, tokenize(tokenizer, spec, list(texts), sequence)))
    return batches


def torch_runner(wrapper: "torch.nn.Module", spec: IOSpec) -> Runner:
    import torch

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = wrapper(*(torch.from_numpy(inputs[name]) for name in spec.input_names))
        return {name: out.float().numpy() for name, out in zip(spec.output_names, outputs)}

    return run


def onnxruntime_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session with idle-thread spinning off, so it does not steal cores when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(path: Path, spec: IOSpec) -> Runner:
    session = onnxruntime_session(path)

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        outputs = session.run(spec.output_names, {name: inputs[name] for name in spec.input_names})
        return {name: np.asarray(out, dtype=np.float32) for name, out in zip(spec.output_names, outputs)}

    return run


@dataclass(frozen=True)
class ParityRow:
    variant: str
    output: str
    shape: str
    max_abs: float
    max_rel: float  # max |Δ| divided by max |reference| over the same positions
    metric: str
    metric_value: float | None
    passed: bool
    reason: str  # empty when passed
    worst_text: str


@dataclass(frozen=True)
class OutputSummary:
    """One output's worst difference and task metric over all shapes."""

    max_abs: float
    max_rel: float
    metric: str
    metric_value: float | None


@dataclass(frozen=True)
class ParityReport:
    variant: str
    rows: tuple[ParityRow, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def worst(self) -> ParityRow:
        failing = [row for row in self.rows if not row.passed]
        return max(failing or self.rows, key=lambda row: row.max_rel)

    @property
    def reason(self) -> str:
        """Why it failed: the worst case's output, shape and reason (empty when passed)."""
        if self.passed:
            return ""
        worst = self.worst()
        return f"'{worst.output}' at {worst.shape}: {worst.reason}"

    def outputs(self) -> dict[str, OutputSummary]:
        """Per output: the worst difference and metric over all shapes."""
        result: dict[str, OutputSummary] = {}
        for row in self.rows:
            old = result.get(row.output)
            if old is None:
                result[row.output] = OutputSummary(row.max_abs, row.max_rel, row.metric, row.metric_value)
                continue
            values = [v for v in (old.metric_value, row.metric_value) if v is not None]
            result[row.output] = OutputSummary(max(old.max_abs, row.max_abs), max(old.max_rel, row.max_rel),
                                               old.metric or row.metric, min(values) if values else None)
        return result

    def metric_value(self) -> float | None:
        """The worst task metric (cosine or argmax agreement) over all shapes."""
        return next((s.metric_value for s in self.outputs().values() if s.metric_value is not None), None)


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return (ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)


def compare_output(
    variant: str, task: "Task", spec: IOSpec, name: str, batch: ValidationBatch,
    reference: np.ndarray, candidate: np.ndarray, tolerances: Tolerances,
) -> ParityRow:
    """One output at one shape: differences over real positions, plus the task metric on the metric output."""
    if candidate.shape != reference.shape:
        return ParityRow(variant, name, batch.shape, float("inf"), float("inf"), "", None, False,
                         f"shape {candidate.shape} != reference {reference.shape}", batch.texts[0])
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    scale = np.abs(reference.astype(np.float64))
    sequence_axis = spec.tensor(name).axis(SEQUENCE)
    if sequence_axis == 1:  # zero out padded positions
        real = batch.mask.astype(bool).reshape(batch.mask.shape + (1,) * (diff.ndim - 2))
        diff, scale = diff * real, scale * real
    per_row = diff.reshape(len(diff), -1).max(axis=1)
    max_abs = float(per_row.max())
    max_rel = max_abs / max(float(scale.max()), 1e-12)
    worst_text = batch.texts[int(per_row.argmax())]
    reasons = []
    if not np.isfinite(candidate).all():
        reasons.append("non-finite values")
    if max_abs > tolerances.max_abs:
        reasons.append(f"max |Δ| {max_abs:.3g} > {tolerances.max_abs:g}")
    metric, value = "", None
    if name == task.metric_output:
        metric = task.metric
        if metric == "cosine":
            cosines = _cosines(reference, candidate)
            value = float(cosines.min())
            worst_text = batch.texts[int(cosines.argmin())] if value < tolerances.min_cosine else worst_text
            if value < tolerances.min_cosine:
                reasons.append(f"cosine {value:.6f} < {tolerances.min_cosine}")
        else:
            value = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
            if value < tolerances.min_argmax_agreement:
                reasons.append(f"argmax agreement {value:.3f} < {tolerances.min_argmax_agreement}")
    return ParityRow(variant, name, batch.shape, max_abs, max_rel, metric, value, not reasons, "; ".join(reasons),
                     worst_text)


@dataclass(frozen=True)
class InvarianceRow:
    """One output: the largest |alone - batched| of any text at its real positions, over every batch layout."""

    output: str
    max_abs: float
    worst_text: str
    layout: str  # the batch the worst text was in


@dataclass(frozen=True)
class InvarianceReport:
    variant: str
    rows: tuple[InvarianceRow, ...]
    tolerance: float

    @property
    def max_abs(self) -> float:
        return max((row.max_abs for row in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance

    @property
    def reason(self) -> str:
        if self.passed:
            return ""
        worst = max(self.rows, key=lambda row: row.max_abs)
        text = worst.worst_text if len(worst.worst_text) <= 40 else worst.worst_text[:37] + "..."
        return (f"'{worst.output}' of {text!r} alone vs {worst.layout}: max |Δ| {worst.max_abs:.3g} > "
                f"{self.tolerance:g} (answers depend on batch mates)")


@dataclass(frozen=True)
class BatchLayout:
    """Texts batched together, padded to one length: each text's rows are compared with the text run alone."""

    name: str
    batch: ValidationBatch


def invariance_layouts(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, profile: Profile) -> tuple[
        list[ValidationBatch], list[BatchLayout]]:
    """Every validation text alone (padded to its own length), and mixed-length batches of them padded longer:
    to the longest text in the batch, to the profile's max sequence, and short texts to the opt sequence."""
    texts = list(VALIDATION_TEXTS)
    limit = profile.sequence.max
    lengths = {text: max(profile.sequence.min, len(tokenizer(text, truncation=True, max_length=limit)["input_ids"]))
               for text in texts}
    alone = [ValidationBatch.of([text], tokenize(tokenizer, spec, [text], lengths[text])) for text in texts]
    short = [text for text in texts if lengths[text] <= profile.sequence.opt]
    plans = [
        ("a batch padded to its longest text", texts, max(lengths.values())),
        ("a reversed batch padded to the max sequence", texts[::-1], limit),
        ("short texts padded to the opt sequence", short[1::2] + short[::2], profile.sequence.opt),
    ]
    layouts = []
    for name, members, length in plans:
        for start in range(0, len(members), profile.batch.max):  # batches the profile accepts
            chunk = members[start:start + profile.batch.max]
            if chunk and length >= max(lengths[text] for text in chunk):
                layouts.append(BatchLayout(name, ValidationBatch.of(chunk, tokenize(tokenizer, spec, chunk, length))))
    return alone, layouts


class Validator:
    """Holds the validation batches and the reference's answers (the task's independent reference: see
    packager.tasks), computed once, to check any number of candidates."""

    def __init__(self, task: "Task", spec: IOSpec, batches: list[ValidationBatch], reference: "BatchReference",
                 tolerances: Tolerances, invariance: tuple[list[ValidationBatch], list[BatchLayout]] | None = None):
        self.task, self.spec, self.batches, self.tolerances = task, spec, batches, tolerances
        self.references = [reference(batch) for batch in batches]
        self.alone, self.layouts = invariance or ([], [])

    def check(self, variant: str, candidate: Runner, tolerances: Tolerances | None = None) -> ParityReport:
        tolerances = tolerances or self.tolerances
        rows = []
        for batch, reference in zip(self.batches, self.references):
            outputs = candidate(batch.inputs)
            rows += [
                compare_output(variant, self.task, self.spec, name, batch, reference[name], outputs[name], tolerances)
                for name in self.spec.output_names
            ]
        return ParityReport(variant, tuple(rows))

    def check_invariance(self, variant: str, candidate: Runner, tolerances: Tolerances) -> InvarianceReport:
        """Each text's outputs alone against its rows inside every batch layout, at its real positions."""
        alone = {batch.texts[0]: (batch, candidate(batch.inputs)) for batch in self.alone}
        worst = {name: InvarianceRow(name, 0.0, "", "") for name in self.spec.output_names}
        for layout in self.layouts:
            together = candidate(layout.batch.inputs)
            for row, text in enumerate(layout.batch.texts):
                single, answer = alone[text]
                for name in self.spec.output_names:
                    difference = batch_difference(self.spec, name, single, answer[name], together[name], row)
                    if not difference <= worst[name].max_abs:
                        worst[name] = InvarianceRow(name, difference, text, layout.name)
        return InvarianceReport(variant, tuple(worst.values()), tolerances.max_invariance)


def batch_difference(spec: IOSpec, name: str, alone: ValidationBatch, answer: np.ndarray, batched: np.ndarray,
                     row: int) -> float:
    """max |Δ| between a text's output alone (batch of one) and its `row` in a batch, at its real positions."""
    tensor = spec.tensor(name)
    mine = batched[row:row + 1]
    sequence_axis = tensor.axis(SEQUENCE)
    if sequence_axis is not None:
        length = alone.sequence
        index = [slice(None)] * mine.ndim
        index[sequence_axis] = slice(0, length)
        mine, answer = mine[tuple(index)], answer[tuple(index)]
        real = alone.mask.astype(bool).reshape(alone.mask.shape + (1,) * (answer.ndim - 2))
        return float(np.abs((mine.astype(np.float64) - answer) * real).max(initial=0.0))
    return float(np.abs(mine.astype(np.float64) - answer).max(initial=0.0))


def require_parity(report: ParityReport) -> ParityReport:
    """The gate: return the report when it passed, else raise naming the worst case."""
    if report.passed:
        return report
    worst = report.worst()
    text = worst.worst_text if len(worst.worst_text) <= 60 else worst.worst_text[:57] + "..."
    raise GateFailed(
        f"parity gate failed for {report.variant}: output '{worst.output}' at batch x sequence {worst.shape}: "
        f"{worst.reason} (worst input: {text!r})"
    )


def require_invariant(report: InvarianceReport) -> InvarianceReport:
    if report.passed:
        return report
    raise GateFailed(f"batch-invariance gate failed for {report.variant}: {report.reason}")
