"""The checks of a served repository over one protocol, each a row that passes or fails.

Server and model readiness; metadata and config against the IO spec; real text through every ensemble and token
tensors through every model, compared with PyTorch within the gate the model's graph passed (its manifest names it);
the tokenizer model against the Hugging Face tokenizer; concurrent requests, which the dynamic batcher joins, against
the same requests sent one by one (within the gate's max_invariance) and against PyTorch; bad requests, which must get
Triton's errors while the server stays healthy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tritonclient.utils import InferenceServerException

from packager import validate
from packager.errors import PackagerError
from packager.iospec import BATCH
from packager.recipe import Tolerances
from packager.render import ENTITIES_OUTPUT
from packager.triton.client import Client, error_text, infer_at_once
from packager.triton.discovery import Model, Role
from packager.triton.reference import Reference
from packager.triton.rows import CheckStatus, SmokeRow
from packager.validate import Example, Inputs, ValidationBatch

CONCURRENT_REQUESTS = 8  # one text each, sent from this many threads at once
JOIN_ATTEMPTS = 3  # rounds of concurrent requests before "the batcher never joined them" is a failure
UNKNOWN_PROMPT = "no-such-prompt"


def _gate(model: Model) -> Tolerances:
    """The gate a model's answers are checked with: the one its manifest names."""
    if model.gate is None:
        raise PackagerError(f"{model.name} has no manifest naming the gate its graph passed: publish it with packager")
    return model.gate


def _text_cases(examples: tuple[Example, ...], max_batch_size: int) -> dict[str, tuple[Example, ...]]:
    """Batch 1, a full batch of mixed lengths, truncation, non-ASCII: the requests every served model answers
    (`examples`: the task's texts or pairs)."""
    max_batch = max(max_batch_size, 1)
    longest = max(examples, key=lambda example: len(validate.label(example)))
    non_ascii = tuple(example for example in examples if not validate.label(example).isascii())
    return {
        "batch 1": examples[:1],
        f"batch {max_batch}, mixed lengths": tuple(examples[i % len(examples)] for i in range(max_batch)),
        "longer than max sequence": (longest,),
        "non-ASCII": non_ascii[:max_batch],
    }


Check = Callable[..., tuple[bool, str]]


class Checks:
    """The checks over one client; each returns (passed, detail)."""

    def __init__(self, client: Client, reference: Reference, served: list[Model]):
        self.client, self.reference, self.served = client, reference, served

    def attempt(self, check: str, model: str, function: Check, *args) -> SmokeRow:
        """Run one check; an error from Triton or the connection fails the check, not the run."""
        try:
            passed, detail = function(*args)
        except (InferenceServerException, OSError, threading.BrokenBarrierError, PackagerError) as error:
            passed, detail = False, error_text(error)
        return SmokeRow(check, self.client.wire.name, model, CheckStatus.PASS if passed else CheckStatus.FAIL, detail)

    # -- readiness and description

    def server_ready(self) -> tuple[bool, str]:
        return self.client.is_server_ready(), "live and ready"

    def describe(self, model: Model) -> list[SmokeRow]:
        return [
            self.attempt("model ready", model.name, self.model_ready, model),
            self.attempt("metadata = IO spec", model.name, self.metadata, model),
            self.attempt("config = IO spec", model.name, self.config, model),
        ]

    def model_ready(self, model: Model) -> tuple[bool, str]:
        return self.client.is_model_ready(model.name), f"version {model.version}"

    def metadata(self, model: Model) -> tuple[bool, str]:
        """The served metadata: wire data types, the batch dim as -1 in front."""
        served = self.client.metadata(model.name)
        found = {
            kind: {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in served.get(kind, [])}
            for kind in ("inputs", "outputs")
        }
        expected = {
            kind: {name: (_wire_type(dtype), [-1, *dims]) for name, (dtype, dims) in tensors.items()}
            for kind, tensors in self._expected(model).items()
        }
        return _same(expected, found)

    def config(self, model: Model) -> tuple[bool, str]:
        """The config the server runs: config data types, dims without the batch, max_batch_size = profile max."""
        served = self.client.config(model.name)
        found = {
            kind: {t["name"]: (t["data_type"], [int(d) for d in t.get("dims", [])]) for t in served.get(key, [])}
            for kind, key in (("inputs", "input"), ("outputs", "output"))
        }
        passed, detail = _same(self._expected(model), found)
        max_batch, profile_max = int(served.get("max_batch_size", 0)), self.reference.profile.batch.max
        if max_batch != profile_max:
            mismatch = f"max_batch_size {max_batch}, the profile's max batch is {profile_max}"
            return False, mismatch if passed else f"{mismatch}; {detail}"
        return passed, f"{detail}; max_batch_size {max_batch}" if passed else detail

    def _expected(self, model: Model) -> dict[str, dict[str, tuple[str, list[int]]]]:
        """Name -> (config data type, dims without batch) of the inputs and outputs the IO spec gives this role."""
        spec = {t.name: (t.triton_type, t.triton_dims(BATCH)) for t in self.reference.spec.inputs}
        outputs = {t.name: (t.triton_type, t.triton_dims(BATCH)) for t in self.reference.spec.outputs}
        if model.role is Role.MODEL:
            return {"inputs": spec, "outputs": outputs}
        text = {tensor.name: ("TYPE_STRING", list(tensor.dims)) for tensor in model.text_inputs}
        if model.role is Role.ENTITIES:  # the ensemble takes text; its python step, text and the task's logits
            logits = self.reference.task.metric_output
            step = {} if model.config.platform == "ensemble" else {logits: outputs[logits]}
            return {"inputs": {**text, **step}, "outputs": {ENTITIES_OUTPUT: ("TYPE_STRING", [1])}}
        return {"inputs": text, "outputs": spec if model.role is Role.TOKENIZER else outputs}

    # -- answers

    def answers(self, model: Model) -> list[SmokeRow]:
        cases = _text_cases(self.reference.examples, model.max_batch_size)
        if model.role is Role.TOKENIZER:
            return [self.attempt("tokens = HF tokenizer", model.name, self.tokens, model, cases)]
        if model.role is Role.ENTITIES:  # the python step is checked through its ensemble
            if model.config.platform != "ensemble":
                return []
            return [self.attempt(f"entities = transformers pipeline: {case}", model.name, self.entities, model, texts)
                    for case, texts in cases.items()]
        label = "text → PyTorch" if model.role is Role.ENSEMBLE else "tokens → PyTorch"
        rows = [
            self.attempt(f"{label}: {case}", model.name, self.answer, model, texts) for case, texts in cases.items()
        ]
        if model.role is Role.ENSEMBLE:
            rows += [self.attempt(f"text with prompt '{name}' → PyTorch", model.name, self.prompted, model, name)
                     for name in self.reference.prompts]
        return rows

    def answer(self, model: Model, texts: Sequence[Example]) -> tuple[bool, str]:
        batch = self.reference.tokenize(texts)
        served = self.client.infer(model.name, self._inputs(model, batch), model.output_names)
        return self.reference.compare(batch, self.reference.answer(texts), served, _gate(model))

    def entities(self, model: Model, texts: Sequence[str]) -> tuple[bool, str]:
        """The served entity groups against transformers' token-classification pipeline on the same texts: the same
        groups, words and character offsets, scores within the gate's max_abs (at least 1e-4)."""
        served = self.client.infer(model.name, model.text_request(texts), [ENTITIES_OUTPUT])[ENTITIES_OUTPUT]
        expected = self.reference.entities(texts)
        tolerance = max(_gate(model).max_abs, 1e-4)
        count = 0
        for text, answer, wanted in zip(texts, served.reshape(-1), expected):
            groups = json.loads(answer)
            if _spans(groups) != _spans(wanted):
                return False, f"{text[:40]!r}: served {_spans(groups)}, the pipeline {_spans(wanted)}"
            worst = max((abs(g["score"] - w["score"]) for g, w in zip(groups, wanted)), default=0.0)
            if not worst <= tolerance:
                return False, f"{text[:40]!r}: entity score |Δ| {worst:.3g} > {tolerance:g}"
            count += len(groups)
        return True, f"{len(texts)} texts, {count} entities as the pipeline groups them"

    def prompted(self, model: Model, prompt_name: str) -> tuple[bool, str]:
        """Texts sent with the request parameter prompt_name: the served tokenizer prepends that prompt."""
        texts = validate.VALIDATION_TEXTS[:2]
        batch, expected = self.reference.prompted(texts, prompt_name)
        served = self.client.infer(model.name, model.text_request(texts), model.output_names,
                                   parameters={"prompt_name": prompt_name})
        return self.reference.compare(batch, expected, served, _gate(model))

    def unknown_prompt(self, model: Model) -> tuple[bool, str]:
        """A prompt_name the model does not have is refused, naming the prompts it has."""
        return self.refused(model, model.text_request(self.reference.examples[:1]),
                            re.escape(f"unknown prompt_name '{UNKNOWN_PROMPT}'"), {"prompt_name": UNKNOWN_PROMPT})

    def tokens(self, model: Model, cases: dict[str, tuple[Example, ...]]) -> tuple[bool, str]:
        for case, texts in cases.items():
            expected = self.reference.tokenize(texts).inputs
            served = self.client.infer(model.name, model.text_request(texts), model.output_names)
            for name, values in served.items():
                if values.shape != expected[name].shape or not np.array_equal(values, expected[name]):
                    return False, f"{case}: '{name}' {values.shape} differs from the tokenizer's {expected[name].shape}"
        return True, f"{len(cases)} requests, same token tensors"

    def _inputs(self, model: Model, batch: ValidationBatch) -> Inputs:
        return model.text_request(batch.texts) if model.role is Role.ENSEMBLE else batch.inputs

    # -- concurrency

    def concurrent(self, model: Model) -> tuple[bool, str]:
        """Single-text requests sent at once give the answers they give one by one; the batcher joins them.

        A join is required where the batcher can join these requests: the model itself (its requests share one
        padded length, or it takes ragged batches), an ensemble's model step that takes ragged batches, or one
        that joins only equal shapes (Triton's onnxruntime backend) when every request has the same padded length.
        Otherwise such a step joins only the equal shapes that happen to arrive one after another: what it joined
        is reported, not required.
        """
        examples = self.reference.examples
        texts = [examples[i % len(examples)] for i in range(CONCURRENT_REQUESTS)]
        batches = self._single_batches(model, texts)
        requests = [self._inputs(model, batch) for batch in batches]
        expected = [self.reference.runner(batch) for batch in batches]  # the reference at each request's padding
        alone = [self.client.infer(model.name, request, model.output_names) for request in requests]
        batcher = self._batching_model(model)
        one_length = len({batch.sequence for batch in batches}) == 1
        must_join = batcher is not None and (model.role is Role.MODEL or batcher.ragged or one_length)
        for _ in range(JOIN_ATTEMPTS if must_join else 1):
            before = self.client.batch_counts(batcher.name) if batcher else {}
            together = infer_at_once(self.client, model.name, requests, model.output_names)
            for batch, reference, one, many in zip(batches, expected, alone, together):
                passed, detail = self.reference.invariant(batch, one, many, _gate(model).max_invariance)
                if passed:
                    passed, detail = self.reference.compare(batch, reference, many, _gate(model))
                if not passed:
                    return False, f"{validate.label(batch.texts[0])[:40]!r}: {detail}"
            if batcher is None:
                return True, f"{len(requests)} requests, same answers (no dynamic batcher here can join them)"
            after = self.client.batch_counts(batcher.name)
            largest = max((size for size, count in after.items() if count > before.get(size, 0)), default=0)
            if largest > 1:
                return True, f"{len(requests)} requests, same answers; {batcher.name} joined up to {largest}"
            if not must_join:
                return True, (f"{len(requests)} requests, same answers; {batcher.name} joined none (equal shapes "
                              "only, and the requests' padded lengths differ)")
        return False, f"same answers, but {batcher.name} never joined requests in {JOIN_ATTEMPTS} rounds"

    def _single_batches(self, model: Model, texts: list[Example]) -> list[ValidationBatch]:
        """One batch per text: at its own length when the model takes ragged batches, else all at one length."""
        if model.role is Role.ENSEMBLE or model.ragged:
            return [self.reference.tokenize([text]) for text in texts]
        joint = self.reference.tokenize(texts)
        rows = [{name: values[i : i + 1] for name, values in joint.inputs.items()} for i in range(len(texts))]
        return [
            ValidationBatch(1, joint.sequence, (text,), inputs, joint.mask[i : i + 1],
                            None if joint.context is None else joint.context[i : i + 1])
            for i, (text, inputs) in enumerate(zip(texts, rows))
        ]

    def _batching_model(self, model: Model) -> Model | None:
        """The model whose dynamic batcher sees these requests, if any: the model itself, or an ensemble's model
        step (its tokenizer's outputs have each text's own length)."""
        by_name = {m.name: m for m in self.served}
        steps = [model] if model.role is Role.MODEL else [by_name[step] for step in model.steps if step in by_name]
        return next((m for m in steps if m.role is Role.MODEL and m.batches_dynamically), None)

    # -- bad requests and health

    def bad_requests(self, model: Model) -> list[SmokeRow]:
        """Each bad request made from a valid one; Triton must refuse it with its error for that mistake."""
        valid = self._inputs(model, self.reference.tokenize(self.reference.examples[:1]))
        rows = []
        for check, bad in BAD_REQUESTS.items():
            inputs, pattern = bad.make(model, valid), bad.pattern(model, valid)
            rows.append(self.attempt(f"bad request: {check}", model.name, self.refused, model, inputs, pattern))
        if model.role is not Role.MODEL:
            rows.append(self.attempt("bad request: unknown prompt_name", model.name, self.unknown_prompt, model))
        return rows

    def unknown_model(self, models: list[Model]) -> SmokeRow:
        """A valid request for a model that does not exist."""
        check = "bad request: unknown model"
        if not models:
            return SmokeRow(check, self.client.wire.name, "-", CheckStatus.SKIP, "no model served")
        unknown = dataclasses.replace(models[0], name=f"{models[0].name}_no_such_model")
        valid = self._inputs(models[0], self.reference.tokenize(self.reference.examples[:1]))
        return self.attempt(check, unknown.name, self.refused, unknown, valid, "unknown model")

    def refused(self, model: Model, inputs: Inputs, expected: str, parameters: dict | None = None) -> tuple[bool, str]:
        """The request (with request `parameters`) gets Triton's error matching the pattern `expected`."""
        try:
            self.client.infer(model.name, inputs, model.output_names, parameters)
        except InferenceServerException as error:
            message = error_text(error)
            return re.search(expected, message) is not None, message
        return False, "Triton accepted the request"

    def healthy(self, model: Model) -> tuple[bool, str]:
        if not (self.client.is_server_ready() and self.client.is_model_ready(model.name)):
            return False, "server or model not ready after the bad requests"
        passed, detail = self.answer(model, self.reference.examples[:1])
        return passed, f"ready; answers as before ({detail})" if passed else detail


@dataclass(frozen=True)
class BadRequest:
    make: Callable[[Model, Inputs], Inputs]  # the bad inputs, from valid ones
    error: str  # the pattern Triton's error must match

    def pattern(self, model: Model, valid: Inputs) -> str:
        first = re.escape(next(iter(valid)))
        return self.error.format(model=re.escape(model.name), input=first, max_batch_size=model.max_batch_size)


def _wrong_datatype(model: Model, valid: Inputs) -> Inputs:
    name, array = next(iter(valid.items()))
    return {**valid, name: np.zeros(array.shape, np.float32 if array.dtype == np.float64 else np.float64)}


def _wrong_rank(model: Model, valid: Inputs) -> Inputs:
    name, array = next(iter(valid.items()))
    return {**valid, name: array[..., None]}


def _missing_input(model: Model, valid: Inputs) -> Inputs:
    return dict(list(valid.items())[:-1])


def _batch_too_big(model: Model, valid: Inputs) -> Inputs:
    return {name: np.repeat(array[:1], model.max_batch_size + 1, axis=0) for name, array in valid.items()}


# Triton's error patterns: {model} and {input} (the first input) are filled in, escaped.
BAD_REQUESTS: dict[str, BadRequest] = {
    "wrong datatype": BadRequest(_wrong_datatype, r"input '{input}' data-type is '\w+', but model '{model}' expects"),
    "wrong rank": BadRequest(_wrong_rank, r"unexpected shape for input '{input}' for model '{model}'"),
    "missing input": BadRequest(_missing_input, r"expected \d+ inputs but got \d+ inputs for model '{model}'"),
    "batch above max_batch_size": BadRequest(_batch_too_big, r"batch-size must be <= {max_batch_size} for '{model}'"),
}


# ---- comparing tables and error messages ------------------------------------------------------------------


def _same(expected: dict, found: dict) -> tuple[bool, str]:
    """Compare name -> (data type, dims) tables of inputs and outputs; the detail names every difference."""
    differences = []
    for kind in ("inputs", "outputs"):
        want, got = expected[kind], found.get(kind, {})
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                served, wanted = _describe(got.get(name)), _describe(want.get(name))
                differences.append(f"{kind[:-1]} '{name}': served {served}, expected {wanted}")
    if differences:
        return False, "; ".join(differences)
    return True, ", ".join(f"{len(expected[kind])} {kind}" for kind in ("inputs", "outputs")) + " as the IO spec says"


def _spans(groups: list[dict]) -> list[tuple]:
    """Entity groups without their scores: (entity_group, word, start, end)."""
    return [(group["entity_group"], group["word"], group["start"], group["end"]) for group in groups]


def _describe(tensor: tuple[str, list[int]] | None) -> str:
    return "nothing" if tensor is None else f"{tensor[0]} {tensor[1]}"


def _wire_type(config_type: str) -> str:
    """A config data type (TYPE_INT64) as metadata names it (INT64; TYPE_STRING is BYTES)."""
    return "BYTES" if config_type == "TYPE_STRING" else config_type.removeprefix("TYPE_")
