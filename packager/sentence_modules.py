"""A sentence-transformers folder's modules, read as data: what turns token embeddings into its sentence embedding.

modules.json lists the modules in order: a Transformer (the Hugging Face model, in the folder or a subfolder), then
Pooling, Dense and Normalize modules, each configured by files in its own subfolder. The packager exports exactly
that chain (packager.tasks.SentenceEmbedding); a module it cannot export is refused with its name. A folder without
modules.json is embedded the way sentence-transformers embeds a plain Hugging Face folder: mean pooling, no Dense,
no Normalize. Nothing here runs code from the folder: activations are looked up in a table, weights are read as
safetensors (pickled weights only when the recipe allows them, and then with torch's weights-only loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from packager.errors import PackagerError, first_line

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
SENTENCE_CONFIG = "config_sentence_transformers.json"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy boolean keys of a Pooling config, in the order sentence-transformers concatenates their vectors.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by the name sentence-transformers saves (the torch class's full name).
ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.SiLU": "silu",
}
MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass(frozen=True)
class DenseLayer:
    """A Dense module: linear (+ optional residual projection), then the activation, on the sentence embedding."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a value of ACTIVATIONS
    use_residual: bool = False

    def describe(self) -> str:
        return f"dense {self.in_features}->{self.out_features} {self.activation}" + (
            " +residual" if self.use_residual else "")


@dataclass(frozen=True)
class SentenceModules:
    """The chain sentence-transformers runs after the Transformer, and the Transformer's own settings."""

    transformer_folder: Path  # where the Hugging Face config, weights and tokenizer are
    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    from_modules_file: bool = False  # False: a plain Hugging Face folder, embedded as sentence-transformers would

    def describe(self) -> str:
        parts = [f"{'+'.join(self.pooling)} pooling", *(layer.describe() for layer in self.dense)]
        parts.append("normalize" if self.normalize else "no normalize")
        where = "modules.json" if self.from_modules_file else "no modules.json: sentence-transformers' default"
        return f"{', '.join(parts)} ({where})"


def read(folder: Path) -> SentenceModules:
    """The sentence-transformers modules of `folder` (sentence-transformers' defaults when it has none)."""
    modules_path = folder / MODULES_FILE
    if not modules_path.exists():
        return _with_transformer_settings(SentenceModules(folder), folder)
    entries = _json(modules_path)
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise PackagerError(f"{modules_path} is not a list of modules")
    kinds = [_kind(entry, modules_path) for entry in entries]
    if not kinds or kinds[0] != "Transformer" or kinds.count("Transformer") != 1:
        raise PackagerError(f"{modules_path}: the first and only Transformer module must come first; found {kinds}")
    transformer_folder = folder / str(entries[0].get("path", ""))
    modules = SentenceModules(transformer_folder, pooling=(), from_modules_file=True)
    for kind, entry in zip(kinds[1:], entries[1:]):
        module_folder = folder / str(entry.get("path", ""))
        if kind == "Pooling":
            if modules.pooling or modules.dense or modules.normalize:
                raise PackagerError(f"{modules_path}: a Pooling module after pooling, Dense or Normalize")
            modules = replace(modules, pooling=_pooling(module_folder / "config.json"))
        elif kind == "Dense":
            if not modules.pooling or modules.normalize:
                raise PackagerError(f"{modules_path}: a Dense module must follow Pooling and come before Normalize")
            modules = replace(modules, dense=modules.dense + (_dense(module_folder),))
        else:
            modules = replace(modules, normalize=True)
    if not modules.pooling:
        raise PackagerError(f"{modules_path} has no Pooling module: there is no sentence embedding to export")
    modules = _with_transformer_settings(modules, transformer_folder)
    prompts = _json(folder / SENTENCE_CONFIG).get("prompts") if (folder / SENTENCE_CONFIG).exists() else None
    if prompts:
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise PackagerError(f"{folder / SENTENCE_CONFIG}: 'prompts' must map names to strings")
        modules = replace(modules, prompts={str(name): text for name, text in prompts.items()})
    return modules


def _kind(entry: dict, modules_path: Path) -> str:
    """The module kind of a modules.json entry; any module the packager cannot export is refused by name."""
    type_name = str(entry.get("type", ""))
    kind = type_name.rsplit(".", 1)[-1]
    if not type_name.startswith("sentence_transformers.") or kind not in MODULE_KINDS:
        raise PackagerError(f"{modules_path}: module {entry.get('name', '?')!r} of type {type_name!r} cannot be "
                            f"exported (the packager exports {', '.join(MODULE_KINDS)})")
    return kind


def _pooling(config_path: Path) -> tuple[str, ...]:
    config = _json(config_path)
    if config.get("include_prompt", True) is not True:
        raise PackagerError(f"{config_path}: include_prompt = false (prompt tokens left out of pooling) cannot be "
                            "exported")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(value for key, value in LEGACY_POOLING_KEYS.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise PackagerError(f"{config_path}: unknown pooling mode {unknown or modes} (known: {', '.join(POOLING_MODES)})")
    return modes


def _dense(folder: Path) -> DenseLayer:
    config_path = folder / "config.json"
    config = _json(config_path)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation is None:
        activation = "torch.nn.modules.linear.Identity"
    if activation not in ACTIVATIONS:
        raise PackagerError(f"{config_path}: activation {activation!r} cannot be exported (known: "
                            f"{', '.join(ACTIVATIONS)})")
    if not any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        raise PackagerError(f"{folder} has no Dense weights (model.safetensors)")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") != "sentence_embedding":
            raise PackagerError(f"{config_path}: {key} = {config[key]!r}; only a Dense on the sentence embedding "
                                "can be exported")
    try:
        return DenseLayer(folder, int(config["in_features"]), int(config["out_features"]), bool(config.get("bias", True)),
                          ACTIVATIONS[activation], bool(config.get("use_residual", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackagerError(f"{config_path}: in_features and out_features must be integers ({first_line(exc)})") from None


def _with_transformer_settings(modules: SentenceModules, folder: Path) -> SentenceModules:
    """max_seq_length and do_lower_case of sentence-transformers 2-5 folders (version 6 keeps them in the tokenizer's
    own files); a Transformer that is not a plain encoder's last hidden state is refused."""
    config = _json(folder / TRANSFORMER_CONFIG) if (folder / TRANSFORMER_CONFIG).exists() else {}
    task = config.get("transformer_task", "feature-extraction")
    output = config.get("modality_config", {}).get("text", {}).get("method_output_name", "last_hidden_state")
    if task != "feature-extraction" or output != "last_hidden_state":
        raise PackagerError(f"{folder / TRANSFORMER_CONFIG}: a Transformer module for {task!r} giving {output!r} "
                            "cannot be exported (the packager pools an encoder's last_hidden_state)")
    length = config.get("max_seq_length")
    return replace(modules, max_seq_length=length if isinstance(length, int) and length > 0 else None,
                    do_lower_case=config.get("do_lower_case") is True)


def dense_weights(layer: DenseLayer, allow_pickled: bool) -> dict:
    """The Dense layer's tensors by name (linear.weight, linear.bias, residual.weight)."""
    safetensors = layer.folder / "model.safetensors"
    if safetensors.exists():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    pickled = layer.folder / "pytorch_model.bin"
    if allow_pickled:
        import torch

        return torch.load(str(pickled), map_location="cpu", weights_only=True)
    raise PackagerError(f"{pickled} is pickled (it can run code when loaded): convert it to safetensors, or set "
                        "[source] allow_pickled_weights = true")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackagerError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackagerError(f"{path} is not valid JSON: {first_line(exc)}") from None
