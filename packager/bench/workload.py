"""The benchmark's inputs: real text, tokenized to exactly the batch × sequence that is measured."""

from __future__ import annotations

import itertools

from packager import validate
from packager.errors import PackagerError
from packager.iospec import IOSpec

# A request: `batch` texts, and their tokens at exactly `sequence` as the served tokenizer pads them.
Workload = validate.ValidationBatch


def make_workload(tokenizer, spec: IOSpec, batch: int, sequence: int) -> Workload:
    """Real text: one text of exactly `sequence` tokens, then validation texts no longer than that (mixed lengths)."""
    fitting = [text for text in validate.VALIDATION_TEXTS if token_count(tokenizer, text, sequence) <= sequence]
    others = itertools.cycle(fitting or [""])
    texts = (text_of_length(tokenizer, sequence), *(next(others) for _ in range(batch - 1)))
    return Workload.of(texts, validate.tokenize(tokenizer, spec, list(texts), sequence))


def token_count(tokenizer, text: str, limit: int) -> int:
    """Tokens of `text` with the special tokens, counted up to `limit` + 1."""
    return len(tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"])


def text_of_length(tokenizer, tokens: int) -> str:
    """Words of the validation texts, added while they fit, until the text is exactly `tokens` tokens long."""
    words = " ".join(validate.VALIDATION_TEXTS).split()
    text, count = "", token_count(tokenizer, "", tokens)
    for word in itertools.islice(itertools.cycle(words), 4 * tokens + len(words)):
        if count == tokens:
            break
        candidate = f"{text} {word}".strip()
        length = token_count(tokenizer, candidate, tokens)
        if length <= tokens:
            text, count = candidate, length
    if count != tokens:
        raise PackagerError(f"cannot make a text of exactly {tokens} tokens (got {count}) for the benchmark")
    return text
