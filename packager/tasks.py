"""One table row per task: how to load the model, the wrapper that is exported, its outputs and parity metric.

A wrapper is a thin nn.Module that calls the Hugging Face model with keyword arguments (in the IO spec's input
order) and returns a tuple of tensors, which both exporters and the validator can run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from packager.errors import PackagerError, UsageError
from packager.iospec import BATCH, SEQUENCE
from packager.recipe import TASK_NAMES


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
    metric: str  # "cosine" or "argmax"
    metric_output: str  # the output the task metric is computed on


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
    ),
}


assert tuple(TASKS) == TASK_NAMES, "every task the recipe schema knows has a row"


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}") from None
