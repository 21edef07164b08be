"""Tiny random-initialised BERT models with a vocab written here, for fast tests."""

from __future__ import annotations

from pathlib import Path

from packager.cpu import CPU_CLASSES
from packager.iospec import IOSpec
from packager.recipe import Gates, Recipe, parse_recipe
from packager.record import BuildRecord, CpuRecord, EngineRecord, Gate, LevelRecord, OptimizeRecord, Release

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a the is on of and to in it for with man guitar playing stage quick brown fox jumps over lazy dog triton "
    "serves many models from one repository each its own configuration versions ok this sentence repeated make "
    "document far longer than maximum sequence length numbers like are tokenized into several pieces def export "
    "model return torch onnx args great job team see you tomorrow"
).split()
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:()=_") + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"
]


def write_tiny_bert(folder: Path, task: str = "embeddings", seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT (random weights) with its tokenizer into `folder`."""
    import torch  # here, not at the top: publisher processes import this module for sample_release only
    from transformers import (
        BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification, BertModel,
        BertTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(SPECIAL + WORDS + CHARACTERS)) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab.read_text().split()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2 if task == "question-answering" else 3,
    )
    torch.manual_seed(seed)
    model_class = {
        "embeddings": BertModel,
        "sequence-classification": BertForSequenceClassification,
        "text-pair-classification": BertForSequenceClassification,
        "token-classification": BertForTokenClassification,
        "question-answering": BertForQuestionAnswering,
    }[task]
    model_class(config).eval().save_pretrained(folder)
    return folder


def tiny_recipe(folder: Path, task: str = "embeddings", name: str = "tiny", **sections) -> Recipe:
    """A recipe for a tiny model folder: batch 1/2/4, sequence 2/16/32, the default gates; `sections` add more."""
    data = {"name": name, "task": task, "source": {"path": str(folder)},
            "profile": {"batch": [1, 2, 4], "sequence": [2, 16, 32]}, **sections}
    return parse_recipe(data, f"tiny recipe {name}")


def sample_release(spec: IOSpec, recipe_data: dict | None = None) -> Release:
    """What a release's manifests share, for repository tests that publish hand-made models."""
    gate = Gate("fp32", Gates().fp32)
    level = LevelRecord("plain", True, True, "", gate, file="model.onnx")
    record = BuildRecord(
        recipe="tiny", weights_sha256="0" * 64, parity=(), optimize=OptimizeRecord("cpu", "plain", "test", (level,)),
        tensorrt=EngineRecord("skipped", "not built"), graphs={}, cpu=CpuRecord("avx2", CPU_CLASSES, "fp32"),
    )
    return Release.of(recipe_data or {"name": "tiny"}, "folder tiny", spec, record)
