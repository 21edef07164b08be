"""One table row per task: how to load the model, the wrapper that is exported, its outputs and parity metric.

A wrapper is a thin nn.Module that calls the Hugging Face model with keyword arguments (in the IO spec's input
order) and returns a tuple of tensors, which both exporters and the validator can run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from packager.errors import PackagerError, UsageError

BATCH, SEQUENCE = "batch", "sequence"


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
            raise PackagerError(f"the embeddings task pools with 'attention_mask', but the tokenizer gives {input_names}")
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


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}") from None


def infer_task(folder: Path) -> str:
    """The task of a local model folder: embeddings for sentence-transformers folders, else from the config."""
    if (folder / "modules.json").exists() or (folder / "sentence_bert_config.json").exists():
        return "embeddings"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    if any(a.endswith("Model") for a in architectures):
        return "embeddings"
    raise UsageError(f"cannot infer the task of {folder} (architectures {architectures}); pass TASK= / --task")
