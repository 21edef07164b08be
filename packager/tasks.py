"""One table row per task: how to load the model, the wrapper that is exported, its outputs and parity metric.

A wrapper is a thin nn.Module that calls the Hugging Face model with keyword arguments (in the IO spec's input
order) and returns a tuple of tensors, which both exporters and the validator can run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification,
    PreTrainedModel,
)

from packager.errors import PackagerError, UsageError
from packager.iospec import BATCH, SEQUENCE
from packager.recipe import PAIR_TASKS, TASK_NAMES


@dataclass(frozen=True)
class OutputSpec:
    name: str
    axes: dict[int, str]  # dynamic axes by index; other axes are fixed


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: type
    wrapper: Callable[[PreTrainedModel, list[str]], torch.nn.Module]
    outputs: tuple[OutputSpec, ...]
    metric: str  # "cosine", "argmax" (per row), "token-argmax" (per real token) or "span" (best answer span)
    metric_output: str  # the output the task metric is computed on ("span": the start logits, with the end logits)
    # The ensemble's text inputs: empty for one text (named by [serving] text_input), else the names of a pair,
    # which the tokenizer model encodes with the tokenizer's own pair template.
    text_inputs: tuple[str, ...] = ()
    truncation: str = "longest_first"  # the tokenizers truncation strategy ("only_second": a pair's second text)
    model_outputs: bool = False  # the outputs are fields of the model's own output: transformers is the reference

    @property
    def pairs(self) -> bool:
        return len(self.text_inputs) == 2


class _Wrapper(torch.nn.Module):
    def __init__(self, model: PreTrainedModel, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def call_model(self, inputs: tuple[torch.Tensor, ...]):
        return self.model(**dict(zip(self.input_names, inputs)), return_dict=True)


class SentenceEmbedding(_Wrapper):
    """Token embeddings plus masked mean pooling and L2 normalisation, as sentence-transformers computes them."""

    def __init__(self, model: PreTrainedModel, input_names: list[str]):
        super().__init__(model, input_names)
        if "attention_mask" not in self.input_names:
            raise PackagerError(
                f"the embeddings task pools with 'attention_mask', but the tokenizer gives {input_names}")
        self.mask_index = self.input_names.index("attention_mask")

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.call_model(inputs).last_hidden_state
        mask = inputs[self.mask_index].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return tokens, F.normalize(mean, p=2, dim=1)


class Logits(_Wrapper):
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.call_model(inputs).logits,)


class SpanLogits(_Wrapper):
    """Extractive question answering: a start and an end score per token."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.call_model(inputs)
        return outputs.start_logits, outputs.end_logits


TASKS: dict[str, Task] = {
    "embeddings": Task(
        name="embeddings",
        auto_class=AutoModel,
        wrapper=SentenceEmbedding,
        outputs=(
            OutputSpec("token_embeddings", {0: BATCH, 1: SEQUENCE}),
            OutputSpec("sentence_embedding", {0: BATCH}),
        ),
        metric="cosine",
        metric_output="sentence_embedding",
    ),
    "sequence-classification": Task(
        name="sequence-classification",
        auto_class=AutoModelForSequenceClassification,
        wrapper=Logits,
        outputs=(OutputSpec("logits", {0: BATCH}),),
        metric="argmax",
        metric_output="logits",
        model_outputs=True,
    ),
    "token-classification": Task(
        name="token-classification",
        auto_class=AutoModelForTokenClassification,
        wrapper=Logits,
        outputs=(OutputSpec("logits", {0: BATCH, 1: SEQUENCE}),),
        metric="token-argmax",
        metric_output="logits",
        model_outputs=True,
    ),
    "question-answering": Task(
        name="question-answering",
        auto_class=AutoModelForQuestionAnswering,
        wrapper=SpanLogits,
        outputs=(OutputSpec("start_logits", {0: BATCH, 1: SEQUENCE}), OutputSpec("end_logits", {0: BATCH, 1: SEQUENCE})),
        metric="span",
        metric_output="start_logits",
        text_inputs=("question", "context"),
        truncation="only_second",
        model_outputs=True,
    ),
    "text-pair-classification": Task(  # a cross-encoder (reranker): a sequence classifier on (text, text_pair)
        name="text-pair-classification",
        auto_class=AutoModelForSequenceClassification,
        wrapper=Logits,
        outputs=(OutputSpec("logits", {0: BATCH}),),
        metric="argmax",
        metric_output="logits",
        text_inputs=("text", "text_pair"),
        model_outputs=True,
    ),
}


assert tuple(TASKS) == TASK_NAMES, "every task the recipe schema knows has a row"
assert {task.name for task in TASKS.values() if task.pairs} == set(PAIR_TASKS)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}") from None
