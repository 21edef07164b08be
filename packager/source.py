"""Where weights and tokenizer come from (embedded package, local folder, hub id), and loading them."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from packager.errors import PackagerError, UsageError, first_line
from packager.recipe import Recipe, Source
from packager.tasks import get_task

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedModel:
    folder: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights_sha256: str
    max_seq_length: int | None  # the truncation length sentence-transformers uses, when the folder says


def resolve_folder(source: Source) -> Path:
    if source.package:
        try:
            module = importlib.import_module(source.package)
        except ImportError as exc:
            raise PackagerError(f"model package '{source.package}' is not installed ({exc})") from None
        return Path(module.get_model_path())
    if source.path:
        folder = Path(source.path).expanduser()
        if not folder.is_dir():
            raise PackagerError(f"model folder {folder} does not exist")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.hub))
    except Exception as exc:  # offline hosts: HF_HUB_OFFLINE=1 and nothing cached
        raise PackagerError(f"cannot fetch hub model '{source.hub}' (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}") from None


def weights_digest(folder: Path) -> str:
    weights = sorted(p for name in WEIGHT_FILES for p in folder.glob(name.replace(".", "*.", 1)))
    if not weights:
        raise PackagerError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    digest = hashlib.sha256()
    for path in weights:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load(recipe: Recipe) -> LoadedModel:
    """Load tokenizer and model (eval mode, eager attention so the exported graph fuses)."""
    folder = resolve_folder(recipe.source)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise PackagerError(f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    digest = weights_digest(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise PackagerError(f"cannot load the tokenizer from {folder}: {first_line(exc)}") from None
    task = get_task(recipe.task)
    try:
        model = task.auto_class.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:
        raise PackagerError(f"cannot load weights from {folder}: {first_line(exc)}") from None
    model.eval()
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and recipe.profile.sequence.max > positions:
        raise UsageError(f"profile sequence max {recipe.profile.sequence.max} exceeds the {positions} positions of "
                         f"the model in {folder}: lower it (--sequence)")
    sbert = folder / "sentence_bert_config.json"
    max_seq_length = json.loads(sbert.read_text()).get("max_seq_length") if sbert.exists() else None
    return LoadedModel(folder, model, tokenizer, digest, max_seq_length)
