"""The smoke's reference: the task's independent reference (sentence-transformers' encode, the transformers model)
and the Hugging Face tokenizer's tokens for the texts it sends."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from packager import source, validate
from packager.errors import PackagerError
from packager.iospec import IOSpec
from packager.recipe import Profile, Recipe, Tolerances, padded_length
from packager.tasks import BatchReference, Task, get_task
from packager.triton.client import Outputs
from packager.validate import Example, ValidationBatch


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
    # [serving] entities: transformers' pipeline("token-classification", aggregation_strategy="simple"), truncating
    # at the profile's max sequence as the served tokenizer does
    entity_pipeline: Callable[[list[str]], list[list[dict]]] | None = None
    _answers: dict[tuple[str, ...], Outputs] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, recipe: Recipe, spec: IOSpec, loaded: source.LoadedModel) -> "Reference":
        task = get_task(recipe.task)
        pipeline = _entity_pipeline(loaded, recipe.profile.sequence.max) if recipe.serving.entities else None
        return cls(task, spec, loaded.tokenizer, task.reference(loaded, spec), recipe.profile,
                   recipe.serving.buckets(recipe.profile), dict(loaded.modules.prompts) if loaded.modules else {},
                   pipeline)

    @property
    def examples(self) -> tuple[Example, ...]:
        """The task's validation examples: texts, or pairs."""
        return validate.validation_examples(self.task)

    def tokenize(self, texts: Sequence[Example]) -> ValidationBatch:
        sequence = self.profile.sequence
        lengths = validate.token_lengths(self.tokenizer, self.task, list(texts), sequence.max)
        length = padded_length(max(lengths), sequence.min, self.buckets)
        return validate.encode_batch(self.tokenizer, self.spec, self.task, list(texts), length)

    def entities(self, texts: Sequence[str]) -> list[list[dict]]:
        """The pipeline's entity groups of each text."""
        if self.entity_pipeline is None:
            raise PackagerError("the recipe serves no entities ([serving] entities = false)")
        return self.entity_pipeline(list(texts))

    def prompted(self, texts: Sequence[str], prompt_name: str) -> tuple[ValidationBatch, Outputs]:
        """The tokens of the prompted texts, and the reference's answer for `texts` with that prompt (its own
        prompt handling: sentence-transformers' encode(prompt_name=...))."""
        batch = self.tokenize([self.prompts[prompt_name] + text for text in texts])
        return batch, self.runner(dataclasses.replace(batch, texts=tuple(texts)), prompt_name=prompt_name)

    def answer(self, texts: Sequence[Example]) -> Outputs:
        key = tuple(texts)
        if key not in self._answers:
            self._answers[key] = self.runner(self.tokenize(texts))
        return self._answers[key]

    def compare(self, batch: ValidationBatch, expected: Outputs, served: Outputs,
                tolerances: Tolerances) -> tuple[bool, str]:
        """Every output within tolerance (validate.compare_output); the detail names the worst difference."""
        rows = validate.compare_outputs("served", self.task, self.spec, batch, expected, served, tolerances)
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


def _entity_pipeline(loaded: source.LoadedModel, max_length: int) -> Callable[[list[str]], list[list[dict]]]:
    from transformers import pipeline

    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.model_max_length = max_length  # the pipeline truncates there, as the served tokenizer does
    run = pipeline("token-classification", model=loaded.model, tokenizer=tokenizer, aggregation_strategy="simple",
                   device="cpu")

    def entities(texts: list[str]) -> list[list[dict]]:
        answers = run(texts)
        return [[{**group, "score": float(group["score"])} for group in groups] for groups in answers]

    return entities
