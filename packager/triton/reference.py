"""The smoke's reference: the task's independent reference (sentence-transformers' encode, the transformers model)
and the Hugging Face tokenizer's tokens for the texts it sends."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from packager import source, validate
from packager.iospec import IOSpec
from packager.recipe import Profile, Recipe, Tolerances, padded_length
from packager.tasks import BatchReference, Task, get_task
from packager.triton.client import Outputs
from packager.validate import ValidationBatch


@dataclass
class Reference:
    """What served answers are compared with: the task's reference on the same texts (packager.tasks: never the
    exported wrapper), and the tokenizer whose tokens the served tokenizer must give.

    Texts are tokenized as the served tokenizer does: truncated at the profile's max sequence, padded to the
    longest text of the request, at least to the profile's min sequence, rounded up to a length bucket.
    """

    task: Task
    spec: IOSpec
    tokenizer: PreTrainedTokenizerBase
    runner: BatchReference
    profile: Profile
    buckets: tuple[int, ...]  # the served tokenizer's length buckets (empty: padded to the longest text)
    prompts: dict[str, str] = field(default_factory=dict)  # sentence-transformers prompts by name (embeddings)
    _answers: dict[tuple[str, ...], Outputs] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, recipe: Recipe, spec: IOSpec, loaded: source.LoadedModel) -> "Reference":
        task = get_task(recipe.task)
        return cls(task, spec, loaded.tokenizer, task.reference(loaded, spec), recipe.profile,
                   recipe.serving.buckets(recipe.profile), dict(loaded.modules.prompts) if loaded.modules else {})

    def tokenize(self, texts: Sequence[str]) -> ValidationBatch:
        sequence = self.profile.sequence
        lengths = self.tokenizer(list(texts), truncation=True, max_length=sequence.max)["input_ids"]
        length = padded_length(max(map(len, lengths)), sequence.min, self.buckets)
        return ValidationBatch.of(texts, validate.tokenize(self.tokenizer, self.spec, list(texts), length))

    def prompted(self, texts: Sequence[str], prompt_name: str) -> tuple[ValidationBatch, Outputs]:
        """The tokens of the prompted texts, and the reference's answer for `texts` with that prompt (its own
        prompt handling: sentence-transformers' encode(prompt_name=...))."""
        batch = self.tokenize([self.prompts[prompt_name] + text for text in texts])
        return batch, self.runner(dataclasses.replace(batch, texts=tuple(texts)), prompt_name=prompt_name)

    def answer(self, texts: Sequence[str]) -> Outputs:
        key = tuple(texts)
        if key not in self._answers:
            self._answers[key] = self.runner(self.tokenize(texts))
        return self._answers[key]

    def compare(self, batch: ValidationBatch, expected: Outputs, served: Outputs,
                tolerances: Tolerances) -> tuple[bool, str]:
        """Every output within tolerance (validate.compare_output); the detail names the worst difference."""
        rows = [
            validate.compare_output(
                "served", self.task, self.spec, name, batch, expected[name], served[name], tolerances)
            for name in self.spec.output_names
            if name in served
        ]
        failed = [f"{row.output}: {row.reason}" for row in rows if not row.passed]
        if failed:
            return False, "; ".join(failed)
        metric = next((f", {row.metric} {row.metric_value:.6f}" for row in rows if row.metric), "")
        return True, f"max |Δ| {max(row.max_abs for row in rows):.2g}{metric}"

    def invariant(self, batch: ValidationBatch, alone: Outputs, together: Outputs,
                  tolerance: float) -> tuple[bool, str]:
        """A request's answer sent alone against the same request joined with others: equal within `tolerance`."""
        differences = {name: validate.batch_difference(self.spec, name, batch, alone[name], together[name], 0)
                       for name in self.spec.output_names if name in alone}
        name, worst = max(differences.items(), key=lambda item: item[1])
        if not worst <= tolerance:
            return False, f"{name}: alone vs joined max |Δ| {worst:.3g} > {tolerance:g}"
        return True, f"alone vs joined max |Δ| {worst:.2g}"
