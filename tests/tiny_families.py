"""Tiny random-initialised models of many families, each with its own tokenizer trained offline here.

`write_tiny(family, task, folder)` writes a 2-layer, 32-wide model built from the family's transformers config
class with the task's auto class (`packager.tasks.TASKS[task].auto_class`, so new tasks work unchanged), and a
tokenizer trained with the `tokenizers` library on a small corpus (WordPiece for BERT-like families, byte-level
BPE for RoBERTa-like ones, Unigram for the SentencePiece ones), saved so `AutoTokenizer.from_pretrained(folder)`
loads it with the family's own tokenizer class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

from tests.tiny_model import WORDS

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS, LABELS = 32, 2, 2, 64, 128, 3

# Sentences over the test vocabulary, with digits, punctuation and case, so every trainer sees pieces and words.
CORPUS = [
    " ".join(WORDS[i:i + n]) + end
    for n, end in ((5, "."), (7, "!"), (11, "?"), (3, ", 42 ok."))
    for i in range(0, len(WORDS) - n, 2)
] + ["Triton serves many models from one repository.", "A man is playing a guitar on stage.",
     "The quick brown fox jumps over the lazy dog 1234567890 times.", "def export(model): return torch.onnx"]


@dataclass(frozen=True)
class Family:
    """How to build one family: its config class name, config keywords, and its tokenizer (trainer kind, class)."""

    config_class: str
    tokenizer: str  # "wordpiece", "bpe" or "unigram"
    tokenizer_class: str  # the transformers class AutoTokenizer should load
    specials: tuple[str, ...]  # special tokens, first ids of the vocab, in this order
    config: Callable[[object], dict]  # keyword arguments for the config, given the tokenizer (for special ids)


def _bert_like(tok) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, pad_token_id=tok.pad_token_id)


def _roberta_like(tok) -> dict:
    # position ids start at padding_idx + 1, so the table has pad_token_id + 1 more rows than the usable length
    return {**_bert_like(tok), "max_position_embeddings": POSITIONS + tok.pad_token_id + 1,
            "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id, "type_vocab_size": 1}


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

FAMILIES_TABLE: dict[str, Family] = {
    "bert": Family("BertConfig", "wordpiece", "BertTokenizerFast", BERT_SPECIALS, _bert_like),
    "distilbert": Family(
        "DistilBertConfig", "wordpiece", "DistilBertTokenizerFast", BERT_SPECIALS,
        lambda tok: dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
                         max_position_embeddings=POSITIONS, pad_token_id=tok.pad_token_id)),
    "roberta": Family("RobertaConfig", "bpe", "RobertaTokenizerFast", ROBERTA_SPECIALS, _roberta_like),
    "xlm-roberta": Family("XLMRobertaConfig", "unigram", "XLMRobertaTokenizerFast", ROBERTA_SPECIALS,
                          _roberta_like),
    "camembert": Family("CamembertConfig", "unigram", "CamembertTokenizerFast", ROBERTA_SPECIALS, _roberta_like),
    "electra": Family("ElectraConfig", "wordpiece", "ElectraTokenizerFast", BERT_SPECIALS,
                      lambda tok: {**_bert_like(tok), "embedding_size": 16}),
    "albert": Family("AlbertConfig", "unigram", "AlbertTokenizerFast", ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"),
                     lambda tok: {**_bert_like(tok), "embedding_size": 16}),
    "mpnet": Family("MPNetConfig", "wordpiece", "MPNetTokenizerFast",
                    ("<s>", "<pad>", "</s>", "[UNK]", "<mask>"), _roberta_like),
    "deberta-v3": Family(
        "DebertaV2Config", "unigram", "DebertaV2TokenizerFast", BERT_SPECIALS,
        lambda tok: {**_bert_like(tok), "type_vocab_size": 0, "relative_attention": True,
                     "position_biased_input": False, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1,
                     "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True}),
    "modernbert": Family(
        "ModernBertConfig", "bpe", "PreTrainedTokenizerFast", ("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"),
        lambda tok: {**_bert_like(tok), "global_attn_every_n_layers": 2, "local_attention": 16,
                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
                     "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id}),
}
FAMILIES: tuple[str, ...] = tuple(FAMILIES_TABLE)


@cache
def _trained(kind: str, specials: tuple[str, ...]) -> str:
    """The `tokenizers` JSON of a tokenizer of `kind` trained on CORPUS, specials first (cached per session)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(specials))
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        unk = next(s for s in specials if "unk" in s.lower())
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=list(specials), unk_token=unk)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def tokenizer_for(family: str):
    """The family's tokenizer (its transformers class), built from a tokenizer trained here."""
    import transformers
    from tokenizers import Tokenizer, processors

    spec = FAMILIES_TABLE[family]
    trained = json.loads(_trained(spec.tokenizer, spec.specials))
    model = trained["model"]
    if spec.tokenizer_class == "PreTrainedTokenizerFast":  # ModernBERT: a plain tokenizers pipeline
        backend = Tokenizer.from_str(json.dumps(trained))
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[(s, spec.specials.index(s)) for s in ("[CLS]", "[SEP]")])
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
            mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    cls = getattr(transformers, spec.tokenizer_class)
    if spec.tokenizer == "wordpiece":  # the class's default special tokens are the family's specials
        return cls(vocab=model["vocab"])
    if spec.tokenizer == "bpe":
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        return cls(vocab=model["vocab"], merges=merges)
    vocab = [tuple(piece) for piece in model["vocab"]]
    if family == "deberta-v3":
        return cls(vocab=vocab, unk_id=spec.specials.index("[UNK]"))
    return cls(vocab=vocab)


def write_tiny(family: str, task: str, folder: Path, seed: int = 0, **config) -> Path:
    """Write a tiny random `family` model for `task` (its auto class from packager.tasks) and its tokenizer;
    `config` overrides config keywords (e.g. max_position_embeddings=66)."""
    import torch
    import transformers

    from packager.tasks import TASKS

    spec = FAMILIES_TABLE[family]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(family)
    tokenizer.save_pretrained(folder)
    labels = 2 if task == "question-answering" else LABELS  # extractive QA: a start and an end score
    config = getattr(transformers, spec.config_class)(vocab_size=len(tokenizer), num_labels=labels,
                                                      **{**spec.config(tokenizer), **config})
    torch.manual_seed(seed)
    TASKS[task].auto_class.from_config(config).eval().save_pretrained(folder)
    return folder
