"""Where weights and tokenizer come from (embedded package, local folder, hub id), and loading them.

A model folder is data, never code: no load trusts remote code, a folder whose config or tokenizer config names
classes outside transformers is refused before anything is loaded, and pickled weights (which run code when
unpickled) are refused unless the recipe opts in with [source] allow_pickled_weights = true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from packager import sentence_modules
from packager.errors import PackagerError, UsageError, first_line
from packager.recipe import Recipe, Source, model_positions
from packager.sentence_modules import SentenceModules
from packager.tasks import get_task

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass
class LoadedModel:
    folder: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights_sha256: str
    modules: SentenceModules | None = None  # the embeddings task: the folder's sentence-transformers modules
    allow_pickled_weights: bool = False

    @property
    def max_seq_length(self) -> int | None:
        """The truncation length sentence-transformers uses, when the folder says."""
        return self.modules.max_seq_length if self.modules else None

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels by id of the model's config (id2label): a classifier's outputs."""
        id2label = getattr(self.model.config, "id2label", None) or {}
        return tuple(id2label[index] for index in range(len(id2label)))


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
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise PackagerError(f"cannot fetch hub model '{source.hub}' (HF_HUB_OFFLINE={offline}): {exc}") from None


def weights_digest(folder: Path, extra: list[Path] = ()) -> str:
    """SHA-256 over the model's weight files, then `extra` files (e.g. Dense modules' weights), in order."""
    weights = sorted(p for name in WEIGHT_FILES for p in folder.glob(name.replace(".", "*.", 1)))
    if not weights:
        raise PackagerError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    digest = hashlib.sha256()
    for path in [*weights, *extra]:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_runs_no_code(folder: Path, allow_pickled_weights: bool = False) -> None:
    """Refuse a folder that would make transformers run its own code, or unpickle its weights (unless allowed)."""
    for name, class_key in (("config.json", "architectures"), ("tokenizer_config.json", "tokenizer_class")):
        data = _json_object(folder / name)
        if "auto_map" in data:
            raise PackagerError(f"{folder / name} has 'auto_map': the model needs its own Python code, which the "
                                "packager never runs")
        classes = data.get(class_key) or []
        for value in classes if isinstance(classes, list) else [classes]:
            if not isinstance(value, str) or not hasattr(transformers, value):
                raise PackagerError(f"{folder / name}: '{class_key}' names {value!r}, which is not a transformers "
                                    "class: the packager runs no code from a model folder")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(path.name for pattern in PICKLED_WEIGHTS for path in folder.glob(pattern))
        if pickled and not allow_pickled_weights:
            raise PackagerError(f"{folder} has only pickled weights ({', '.join(pickled)}), which can run code when "
                                "loaded: convert them to safetensors, or set [source] allow_pickled_weights = true")


def _json_object(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackagerError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise PackagerError(f"{path} is not a JSON object")
    return data


def load(recipe: Recipe) -> LoadedModel:
    """Load tokenizer and model (eval mode, eager attention so the exported graph fuses); for embeddings, the
    folder's sentence-transformers modules too (the model and tokenizer may be in their Transformer's subfolder)."""
    folder = resolve_folder(recipe.source)
    check_runs_no_code(folder, recipe.source.allow_pickled_weights)
    modules = sentence_modules.read(folder) if recipe.task == "embeddings" else None
    model_folder = modules.transformer_folder if modules else folder
    if model_folder != folder:
        check_runs_no_code(model_folder, recipe.source.allow_pickled_weights)
    if not any((model_folder / name).exists() for name in TOKENIZER_FILES):
        raise PackagerError(f"{model_folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    dense_files = sorted(p for layer in (modules.dense if modules else ()) for p in layer.folder.glob("*")
                         if p.name in ("model.safetensors", "pytorch_model.bin"))
    digest = weights_digest(model_folder, dense_files)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise PackagerError(f"cannot load the tokenizer from {model_folder}: {first_line(exc)}") from None
    if modules and modules.do_lower_case:
        lowercase_inputs(tokenizer)
    if modules and modules.from_modules_file and modules.max_seq_length is None and tokenizer.model_max_length < 1e6:
        modules = dataclasses.replace(modules, max_seq_length=int(tokenizer.model_max_length))  # sentence-transformers 6
    task = get_task(recipe.task)
    transformers.utils.logging.disable_progress_bar()  # the step's own line says what is loading
    try:
        model = task.auto_class.from_pretrained(
            model_folder, attn_implementation="eager", dtype=torch.float32, trust_remote_code=False,
            local_files_only=True, use_safetensors=None if recipe.source.allow_pickled_weights else True,
        )
    except Exception as exc:
        raise PackagerError(f"cannot load weights from {model_folder}: {first_line(exc)}") from None
    model.eval()
    positions = model_positions(model.config.to_dict())
    if positions and recipe.profile.sequence.max > positions.usable:
        raise UsageError(f"profile sequence max {recipe.profile.sequence.max} exceeds the {positions.describe()} of "
                         f"the model in {model_folder}: lower it (--sequence)")
    return LoadedModel(folder, model, tokenizer, digest, modules, recipe.source.allow_pickled_weights)


def lowercase_inputs(tokenizer: PreTrainedTokenizerBase) -> None:
    """sentence_bert_config.json's do_lower_case, as sentence-transformers applies it: a Lowercase normalizer first
    in the fast tokenizer, which the served tokenizer (saved from this one) then carries too."""
    from tokenizers.normalizers import Lowercase, Sequence

    if not tokenizer.is_fast:
        raise PackagerError("do_lower_case = true in sentence_bert_config.json needs a fast tokenizer (tokenizer.json)")
    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return
    backend.normalizer = Sequence([Lowercase()] + ([current] if current is not None else []))
