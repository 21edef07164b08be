"""Tiny random-initialised BERT models with a vocab written here, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from packager.recipe import Profile, Range, Recipe, Source, Tolerances

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a the is on of and to in it for with man guitar playing stage quick brown fox jumps over lazy dog triton "
    "serves many models from one repository each its own configuration versions ok this sentence repeated make "
    "document far longer than maximum sequence length numbers like are tokenized into several pieces def export "
    "model return torch onnx args great job team see you tomorrow"
).split()
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:()=_") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]


def write_tiny_bert(folder: Path, task: str = "embeddings", seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT (random weights) with its tokenizer into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(SPECIAL + WORDS + CHARACTERS)) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab.read_text().split()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=3,
    )
    torch.manual_seed(seed)
    model_class = BertForSequenceClassification if task == "sequence-classification" else BertModel
    model_class(config).eval().save_pretrained(folder)
    return folder


def tiny_recipe(folder: Path, task: str = "embeddings", name: str = "tiny") -> Recipe:
    return Recipe(
        name=name,
        task=task,
        source=Source(path=str(folder)),
        profile=Profile(batch=Range(1, 2, 4), sequence=Range(2, 16, 32)),
        tolerances=Tolerances(max_abs=1e-4, min_cosine=0.9999),
    )
