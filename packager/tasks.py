"""One table row per task: how to load the model, the wrapper that is exported, its outputs, parity metric and
independent reference.

A wrapper is a thin nn.Module that calls the Hugging Face model with keyword arguments (in the IO spec's input
order) and returns a tuple of tensors, which both exporters and the validator can run. A reference is what the gates
and the smoke compare with, and shares no code with the wrapper: sentence-transformers' own `encode` of the folder
for embeddings, the transformers model's own forward (its named outputs) for the other tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification,
)

from packager.errors import PackagerError, UsageError
from packager.iospec import BATCH, SEQUENCE, IOSpec
from packager.recipe import PAIR_TASKS, TASK_NAMES
from packager.sentence_modules import POOLING_MODES, DenseLayer, SentenceModules, dense_weights

if TYPE_CHECKING:
    from packager.source import LoadedModel
    from packager.validate import ValidationBatch

Outputs = dict[str, np.ndarray]
BatchReference = Callable[["ValidationBatch"], Outputs]  # texts and their tokens -> the reference's outputs


@dataclass(frozen=True)
class OutputSpec:
    name: str
    axes: dict[int, str]  # dynamic axes by index; other axes are fixed


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: type
    wrapper: Callable[[LoadedModel, list[str]], torch.nn.Module]
    reference: Callable[[LoadedModel, IOSpec], BatchReference]
    outputs: tuple[OutputSpec, ...]
    metric: str  # "cosine", "argmax" (per row), "token-argmax" (per real token) or "span" (best answer span)
    metric_output: str  # the output the task metric is computed on ("span": the start logits, with the end logits)
    # The ensemble's text inputs: empty for one text (named by [serving] text_input), else the names of a pair,
    # which the tokenizer model encodes with the tokenizer's own pair template.
    text_inputs: tuple[str, ...] = ()
    truncation: str = "longest_first"  # the tokenizers truncation strategy ("only_second": a pair's second text)

    @property
    def pairs(self) -> bool:
        return len(self.text_inputs) == 2


class _Wrapper(torch.nn.Module):
    def __init__(self, loaded: LoadedModel, input_names: list[str]):
        super().__init__()
        self.model = loaded.model
        self.input_names = list(input_names)

    def call_model(self, inputs: tuple[torch.Tensor, ...]):
        return self.model(**dict(zip(self.input_names, inputs)), return_dict=True)


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    return mask.argmax(dim=1)


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(1, mask.shape[1] + 1, dtype=mask.dtype).unsqueeze(0)
    return (mask * positions).argmax(dim=1)


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, index.view(-1, 1, 1).expand(-1, 1, tokens.shape[-1])).squeeze(1)


def _weighted_sum(tokens: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of tokens weighted per position, and the sum of the weights (at least 1e-9)."""
    weights = weights.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)


def _cls(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _gather(tokens, _first_real(mask))


def _max(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tokens.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(tokens.dtype).min).amax(dim=1)


def _mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _weighted_sum(tokens, mask)
    return total / count


def _mean_sqrt_len(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _weighted_sum(tokens, mask)
    return total / count.sqrt()


def _weighted_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions weighted 1, 2, 3, ... from the first real token."""
    positions = torch.arange(1, mask.shape[1] + 1, dtype=mask.dtype).unsqueeze(0)
    total, weight = _weighted_sum(tokens, mask * (positions - _first_real(mask).unsqueeze(1)))
    return total / weight


def _last_token(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _gather(tokens, _last_real(mask))


# Pooling modes as sentence-transformers defines them (its Pooling module), over real (mask = 1) tokens only.
POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls, "max": _max, "mean": _mean, "mean_sqrt_len_tokens": _mean_sqrt_len,
    "weightedmean": _weighted_mean, "lasttoken": _last_token,
}
assert tuple(POOLERS) == POOLING_MODES, "every pooling mode a folder may name has a pooler"
ACTIVATION_MODULES = {
    "tanh": torch.nn.Tanh, "identity": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU,
    "sigmoid": torch.nn.Sigmoid, "silu": torch.nn.SiLU,
}


class Dense(torch.nn.Module):
    """A sentence-transformers Dense module rebuilt from its config and weights."""

    def __init__(self, layer: DenseLayer, allow_pickled: bool):
        super().__init__()
        self.linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        self.residual = (torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
                         if layer.use_residual and layer.in_features != layer.out_features else None)
        self.use_residual = layer.use_residual
        self.activation = ACTIVATION_MODULES[layer.activation]()
        try:
            self.load_state_dict(dense_weights(layer, allow_pickled), strict=True)
        except RuntimeError as exc:
            raise PackagerError(f"the Dense weights in {layer.folder} do not match its config: "
                                f"{str(exc).splitlines()[0]}") from None

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(vector))
        if self.use_residual:
            out = out + (self.residual(vector) if self.residual is not None else vector)
        return out


class SentenceEmbedding(_Wrapper):
    """Token embeddings, and the sentence embedding the folder's sentence-transformers modules make of them:
    its pooling modes (concatenated in order), Dense layers, and Normalize only when the folder has it."""

    def __init__(self, loaded: LoadedModel, input_names: list[str]):
        super().__init__(loaded, input_names)
        if "attention_mask" not in self.input_names:
            raise PackagerError(
                f"the embeddings task pools with 'attention_mask', but the tokenizer gives {input_names}")
        modules: SentenceModules = loaded.modules
        self.mask_index = self.input_names.index("attention_mask")
        self.pooling = list(modules.pooling)
        self.dense = torch.nn.ModuleList(Dense(layer, loaded.allow_pickled_weights) for layer in modules.dense)
        self.normalize = modules.normalize

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.call_model(inputs).last_hidden_state
        mask = inputs[self.mask_index]
        sentence = torch.cat([POOLERS[mode](tokens, mask) for mode in self.pooling], dim=-1)
        for layer in self.dense:
            sentence = layer(sentence)
        if self.normalize:
            sentence = F.normalize(sentence, p=2, dim=1)
        return tokens, sentence


class Logits(_Wrapper):
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.call_model(inputs).logits,)


class SpanLogits(_Wrapper):
    """Extractive question answering: a start and an end score per token."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.call_model(inputs)
        return outputs.start_logits, outputs.end_logits


def sentence_transformers_reference(loaded: LoadedModel, spec: IOSpec) -> BatchReference:
    """sentence-transformers' own `encode` of the folder, truncating where the batch was truncated; token
    embeddings are placed at the batch's real positions (padded positions stay zero: no gate reads them)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(loaded.folder), device="cpu", local_files_only=True, trust_remote_code=False)

    def run(batch: ValidationBatch, prompt_name: str | None = None) -> Outputs:
        model.max_seq_length = batch.sequence
        encoded = model.encode(list(batch.texts), output_value=None, batch_size=len(batch.texts),
                               prompt_name=prompt_name, prompt=None if prompt_name else "")
        outputs = {"sentence_embedding": np.stack([row["sentence_embedding"].float().numpy() for row in encoded])}
        if "token_embeddings" in spec.output_names:
            hidden = encoded[0]["token_embeddings"].shape[-1]
            tokens = np.zeros((batch.batch, batch.sequence, hidden), np.float32)
            for index, row in enumerate(encoded):
                real = row["attention_mask"].numpy().astype(bool)
                tokens[index, batch.mask[index].astype(bool)] = row["token_embeddings"].float().numpy()[real]
            outputs["token_embeddings"] = tokens
        return {name: outputs[name] for name in spec.output_names}

    return run


def transformers_reference(loaded: LoadedModel, spec: IOSpec) -> BatchReference:
    """The transformers model's own forward on the batch's tokens; outputs by their names on its ModelOutput."""

    def run(batch: ValidationBatch) -> Outputs:
        with torch.no_grad():
            output = loaded.model(**{name: torch.from_numpy(batch.inputs[name]) for name in spec.input_names},
                                  return_dict=True)
        return {name: getattr(output, name).float().numpy() for name in spec.output_names}

    return run


TASKS: dict[str, Task] = {
    "embeddings": Task(
        name="embeddings",
        auto_class=AutoModel,
        wrapper=SentenceEmbedding,
        reference=sentence_transformers_reference,
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
        reference=transformers_reference,
        outputs=(OutputSpec("logits", {0: BATCH}),),
        metric="argmax",
        metric_output="logits",
    ),
    "token-classification": Task(
        name="token-classification",
        auto_class=AutoModelForTokenClassification,
        wrapper=Logits,
        reference=transformers_reference,
        outputs=(OutputSpec("logits", {0: BATCH, 1: SEQUENCE}),),
        metric="token-argmax",
        metric_output="logits",
    ),
    "question-answering": Task(
        name="question-answering",
        auto_class=AutoModelForQuestionAnswering,
        wrapper=SpanLogits,
        reference=transformers_reference,
        outputs=(OutputSpec("start_logits", {0: BATCH, 1: SEQUENCE}), OutputSpec("end_logits", {0: BATCH, 1: SEQUENCE})),
        metric="span",
        metric_output="start_logits",
        text_inputs=("question", "context"),
        truncation="only_second",
    ),
    "text-pair-classification": Task(  # a cross-encoder (reranker): a sequence classifier on (text, text_pair)
        name="text-pair-classification",
        auto_class=AutoModelForSequenceClassification,
        wrapper=Logits,
        reference=transformers_reference,
        outputs=(OutputSpec("logits", {0: BATCH}),),
        metric="argmax",
        metric_output="logits",
        text_inputs=("text", "text_pair"),
    ),
}


assert tuple(TASKS) == TASK_NAMES, "every task the recipe schema knows has a row"
assert {task.name for task in TASKS.values() if task.pairs} == set(PAIR_TASKS)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}") from None
