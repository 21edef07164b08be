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

Example = str | tuple[str, str]  # one text, or a pair: (text, text_pair) or (question, context)

# Pairs of the texts above (each with a later one, so the long text meets short and long partners: longest_first
# truncation), and short questions on each text as a context (only_second truncation cuts the long context).
PAIR_EXAMPLES: tuple[tuple[str, str], ...] = tuple(
    (text, VALIDATION_TEXTS[(index * 5 + 3) % len(VALIDATION_TEXTS)]) for index, text in enumerate(VALIDATION_TEXTS)
)
QUESTIONS = ("Who plays?", "What jumps?", "Where?", "What serves models?", "Où ?", "何？", "")
QA_EXAMPLES: tuple[tuple[str, str], ...] = tuple(
    (QUESTIONS[index % len(QUESTIONS)], context) for index, context in enumerate(VALIDATION_TEXTS)
)
MAX_ANSWER_TOKENS = 15  # the longest span the best-span metric considers (transformers' QA pipeline default)


def validation_examples(task: "Task | None") -> tuple[Example, ...]:
    """The gate's fixed examples for a task: texts, text pairs, or (question, context) pairs."""
    if task is None or not task.pairs:
        return VALIDATION_TEXTS
    return QA_EXAMPLES if task.truncation == "only_second" else PAIR_EXAMPLES


def label(example: Example) -> str:
    """An example as one line of text, for reports."""
    return example if isinstance(example, str) else " | ".join(example)

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Runner = Callable[[Inputs], Outputs]


@dataclass(frozen=True)
class ValidationBatch:
    batch: int
    sequence: int
    texts: tuple[Example, ...]
    inputs: Inputs
    mask: np.ndarray  # (batch, sequence), 1 on real tokens
    context: np.ndarray | None = None  # (batch, sequence), 1 on the tokens of a pair's second text (pairs only)

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.sequence}"

    @classmethod
    def of(cls, texts: list[Example] | tuple[Example, ...], inputs: Inputs,
           context: np.ndarray | None = None) -> "ValidationBatch":
        """The batch of `texts` tokenized as `inputs`; without an attention mask every position is real."""
        batch, sequence = next(iter(inputs.values())).shape
        mask = inputs["attention_mask"] if "attention_mask" in inputs else np.ones((batch, sequence), np.int64)
        return cls(batch, sequence, tuple(texts), inputs, mask, context)


def encode(tokenizer: "PreTrainedTokenizerBase", examples: list[Example] | tuple[Example, ...],
           truncation: str = "longest_first", **options):
    """The Hugging Face tokenizer on texts, or on pairs with its own pair template and `truncation` strategy."""
    if examples and not isinstance(examples[0], str):
        firsts, seconds = zip(*examples)
        return tokenizer(list(firsts), list(seconds), truncation=truncation, **options)
    return tokenizer(list(examples), truncation=truncation, **options)


def tokenize(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, texts: list[Example], sequence: int,
             truncation: str = "longest_first") -> Inputs:
    """Tokenize to exactly `sequence` tokens (truncate and pad), in the IO spec's names and dtypes."""
    return _spec_inputs(spec, _padded(tokenizer, texts, truncation, sequence))


def _padded(tokenizer: "PreTrainedTokenizerBase", texts: list[Example], truncation: str, sequence: int):
    return encode(tokenizer, texts, truncation, padding="max_length", max_length=sequence, return_tensors="np")


def _spec_inputs(spec: IOSpec, encoded) -> Inputs:
    return {t.name: np.asarray(encoded[t.name]).astype(t.numpy_dtype) for t in spec.inputs}


def encode_batch(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, task: "Task | None", examples: list[Example],
                 sequence: int) -> ValidationBatch:
    """The examples tokenized to exactly `sequence` tokens as the task truncates; pairs mark their second text."""
    truncation = task.truncation if task else "longest_first"
    encoded = _padded(tokenizer, examples, truncation, sequence)
    context = None
    if task is not None and task.pairs:
        if not encoded.is_fast:
            raise PackagerError(f"the {task.name} task needs a fast tokenizer (tokenizer.json) to find the tokens of "
                                "each text of a pair")
        context = np.array([[1 if s == 1 else 0 for s in encoded.sequence_ids(row)] for row in range(len(examples))])
    return ValidationBatch.of(examples, _spec_inputs(spec, encoded), context)


def token_lengths(tokenizer: "PreTrainedTokenizerBase", task: "Task | None", examples: list[Example],
                  limit: int) -> list[int]:
    """Each example's token count, truncated at `limit` as the task truncates."""
    truncation = task.truncation if task else "longest_first"
    return [len(ids) for ids in encode(tokenizer, examples, truncation, max_length=limit)["input_ids"]]


def shortest_sequence(tokenizer: "PreTrainedTokenizerBase", task: "Task | None") -> tuple[int, str]:
    """The fewest tokens every validation example can be truncated to, and what needs them."""
    if task is not None and task.truncation == "only_second":  # the question is never truncated
        needs = {question: len(tokenizer(question, "")["input_ids"]) for question, _ in QA_EXAMPLES}
        longest = max(needs, key=needs.get)
        return needs[longest], f"the validation question {longest!r} with an empty context"
    empty = ("", "") if task is not None and task.pairs else ""
    return len(encode(tokenizer, [empty], truncation=False)["input_ids"][0]), "an empty text"


def make_batches(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, profile: Profile,
                 task: "Task | None" = None) -> list[ValidationBatch]:
    """One batch per (batch, sequence) pair of the profile's distinct min/opt/max sizes (`task`: its examples, its
    truncation; None: texts)."""
    shortest, what = shortest_sequence(tokenizer, task)
    if profile.sequence.min < shortest:
        raise PackagerError(
            f"profile sequence min {profile.sequence.min} is below the {shortest} tokens the tokenizer gives for "
            f"{what}: raise it (--sequence)"
        )
    examples = validation_examples(task)
    batches = []
    for index, (batch, sequence) in enumerate(
        (b, s) for b in profile.batch.values() for s in profile.sequence.values()
    ):
        chosen = [examples[(index + row) % len(examples)] for row in range(batch)]
        batches.append(encode_batch(tokenizer, spec, task, chosen, sequence))
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
                         f"shape {candidate.shape} != reference {reference.shape}", label(batch.texts[0]))
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    scale = np.abs(reference.astype(np.float64))
    sequence_axis = spec.tensor(name).axis(SEQUENCE)
    if sequence_axis == 1:  # zero out padded positions
        real = batch.mask.astype(bool).reshape(batch.mask.shape + (1,) * (diff.ndim - 2))
        diff, scale = diff * real, scale * real
    per_row = diff.reshape(len(diff), -1).max(axis=1)
    max_abs = float(per_row.max())
    max_rel = max_abs / max(float(scale.max()), 1e-12)
    worst_text = label(batch.texts[int(per_row.argmax())])
    reasons = []
    if not np.isfinite(candidate).all():
        reasons.append("non-finite values")
    if max_abs > tolerances.max_abs:
        reasons.append(f"max |Δ| {max_abs:.3g} > {tolerances.max_abs:g}")
    metric, value = "", None
    if name == task.metric_output and task.metric != "span":  # the span metric reads two outputs: compare_outputs
        metric = task.metric
        if metric == "cosine":
            cosines = _cosines(reference, candidate)
            value = float(cosines.min())
            worst_text = label(batch.texts[int(cosines.argmin())]) if value < tolerances.min_cosine else worst_text
            if value < tolerances.min_cosine:
                reasons.append(f"cosine {value:.6f} < {tolerances.min_cosine}")
        else:
            equal = reference.argmax(-1) == candidate.argmax(-1)
            if metric == "token-argmax":  # per real token
                real = batch.mask.astype(bool)
                value = float(equal[real].mean()) if real.any() else 1.0
            else:
                value = float(equal.mean())
            if value < tolerances.min_argmax_agreement:
                reasons.append(f"argmax agreement {value:.3f} < {tolerances.min_argmax_agreement}")
    return ParityRow(variant, name, batch.shape, max_abs, max_rel, metric, value, not reasons, "; ".join(reasons),
                     worst_text)


SPAN = "best span"  # the row of the span metric, over the start and end logits


def best_spans(start: np.ndarray, end: np.ndarray, context: np.ndarray) -> np.ndarray:
    """(batch, 2): per row the (start, end) token of the best answer inside the context, as transformers' QA
    pipeline picks it: the largest start + end score with start <= end < start + MAX_ANSWER_TOKENS."""
    spans = np.zeros((len(start), 2), np.int64)
    square = np.ones((start.shape[1], start.shape[1]), bool)
    band = np.triu(square) & ~np.triu(square, MAX_ANSWER_TOKENS)  # start <= end < start + MAX_ANSWER_TOKENS
    for row in range(len(start)):
        inside = context[row].astype(bool)
        if not inside.any():
            spans[row] = (-1, -1)
            continue
        scores = start[row][:, None].astype(np.float64) + end[row][None, :]
        allowed = band & inside[:, None] & inside[None, :]
        spans[row] = np.unravel_index(np.where(allowed, scores, -np.inf).argmax(), scores.shape)
    return spans


def span_row(variant: str, task: "Task", batch: ValidationBatch, reference: Outputs, candidate: Outputs,
             tolerances: Tolerances) -> ParityRow:
    """The share of rows whose best answer span (`best_spans` over the context) is the reference's."""
    start, end = (output.name for output in task.outputs)
    if batch.context is None:
        raise PackagerError("the span metric needs the batch's context tokens (a pair task's batch)")
    expected = best_spans(reference[start], reference[end], batch.context)
    got = best_spans(candidate[start], candidate[end], batch.context)
    equal = (expected == got).all(axis=1)
    value = float(equal.mean())
    passed = value >= tolerances.min_argmax_agreement
    reason = "" if passed else f"best span agreement {value:.3f} < {tolerances.min_argmax_agreement}"
    worst = label(batch.texts[int(equal.argmin())])
    return ParityRow(variant, SPAN, batch.shape, 0.0, 0.0, "span", value, passed, reason, worst)


def compare_outputs(variant: str, task: "Task", spec: IOSpec, batch: ValidationBatch, reference: Outputs,
                    candidate: Outputs, tolerances: Tolerances) -> list[ParityRow]:
    """Every output of `candidate` at one shape (compare_output), plus the best-span row of a span task."""
    rows = [compare_output(variant, task, spec, name, batch, reference[name], candidate[name], tolerances)
            for name in spec.output_names if name in candidate]
    if task.metric == "span" and all(output.name in candidate for output in task.outputs):
        rows.append(span_row(variant, task, batch, reference, candidate, tolerances))
    return rows


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
        text = label(worst.worst_text)
        text = text if len(text) <= 40 else text[:37] + "..."
        return (f"'{worst.output}' of {text!r} alone vs {worst.layout}: max |Δ| {worst.max_abs:.3g} > "
                f"{self.tolerance:g} (answers depend on batch mates)")


@dataclass(frozen=True)
class BatchLayout:
    """Texts batched together, padded to one length: each text's rows are compared with the text run alone."""

    name: str
    batch: ValidationBatch


def invariance_layouts(tokenizer: "PreTrainedTokenizerBase", spec: IOSpec, profile: Profile,
                       task: "Task | None" = None) -> tuple[list[ValidationBatch], list[BatchLayout]]:
    """Every validation example alone (padded to its own length), and mixed-length batches of them padded longer:
    to the longest example in the batch, to the profile's max sequence, and short examples to the opt sequence."""
    texts = list(validation_examples(task))
    limit = profile.sequence.max
    lengths = {text: max(profile.sequence.min, count)
               for text, count in zip(texts, token_lengths(tokenizer, task, texts, limit))}
    alone = [encode_batch(tokenizer, spec, task, [text], lengths[text]) for text in texts]
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
                layouts.append(BatchLayout(name, encode_batch(tokenizer, spec, task, chunk, length)))
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
            rows += compare_outputs(variant, self.task, self.spec, batch, reference, candidate(batch.inputs),
                                    tolerances)
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
                        worst[name] = InvarianceRow(name, difference, label(text), layout.name)
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
