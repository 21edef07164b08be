"""Triton python-backend model: texts and their token-classification logits in, entity spans out.

Each text is encoded again by `tokenizers` from the tokenizer.json in the version folder, truncated as the tokenizer
model truncates it (encoding.json), which gives each token's character offsets; its row of logits (padded on the
tokenizer's padding side) is turned into label scores with a softmax. Special tokens are skipped, adjacent tokens
of one entity are grouped (a B- label starts a new group), and groups labelled with an ignored label ("O") are
dropped: as transformers' pipeline("token-classification", aggregation_strategy="simple") does. entities.json names
the labels by id, the ignored labels and the unknown token's id. Output: one JSON list per text of
{"entity_group", "score", "word", "start", "end"}.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

ENCODING_FILE, ENTITIES_FILE = "encoding.json", "entities.json"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        version = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version / ENCODING_FILE).read_text())
        entities = json.loads((version / ENTITIES_FILE).read_text())
        self.labels, self.ignored, self.unk_id = entities["labels"], set(entities["ignore_labels"]), entities["unk_id"]
        self.tokenizer = Tokenizer.from_file(str(version / parameters["tokenizer_folder"] / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(parameters["max_sequence_length"]), stride=0,
                                         strategy=settings["truncation_strategy"], direction=settings["truncation_side"])
        self.tokenizer.encode_special_tokens = settings["split_special_tokens"]
        self.left_padded = settings["padding_side"] == "left"
        self.text_input, self.logits_input = (tensor["name"] for tensor in config["input"])
        self.output = config["output"][0]["name"]

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            texts = [_text(v) for v in pb_utils.get_input_tensor_by_name(request, self.text_input).as_numpy().reshape(-1)]
            logits = pb_utils.get_input_tensor_by_name(request, self.logits_input).as_numpy()
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
            rows = [json.dumps(self.entities(text, encoding, row)) for text, encoding, row in zip(texts, encodings, logits)]
            values = np.array([[row.encode("utf-8")] for row in rows], dtype=object)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, values)])
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"entities: {exc}"))

    def entities(self, text, encoding, logits):
        """The entity groups of one text from its padded row of logits."""
        count = len(encoding.ids)
        first = len(logits) - count if self.left_padded else 0
        rows = logits[first:first + count].astype(np.float32)
        scores = np.exp(rows - rows.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        tokens = []
        for index, (token_id, special, (start, end)) in enumerate(
                zip(encoding.ids, encoding.special_tokens_mask, encoding.offsets)):
            if special:
                continue
            label = int(scores[index].argmax())
            word = text[start:end] if token_id == self.unk_id else self.tokenizer.id_to_token(token_id)
            tokens.append({"entity": self.labels[label], "score": float(scores[index][label]), "word": word,
                           "start": start, "end": end})
        return [group for group in self.groups(tokens) if group["entity_group"] not in self.ignored]

    def groups(self, tokens):
        """Adjacent tokens of one entity in one group; a B- label, or another entity, starts the next."""
        groups, current = [], []
        for token in tokens:
            if current:
                bi, tag = _tag(token["entity"])
                if not (tag == _tag(current[-1]["entity"])[1] and bi != "B"):
                    groups.append(self.group(current))
                    current = []
            current.append(token)
        if current:
            groups.append(self.group(current))
        return groups

    def group(self, tokens):
        words = [token["word"] for token in tokens]
        decoder = self.tokenizer.decoder
        return {
            "entity_group": tokens[0]["entity"].split("-", 1)[-1],
            "score": float(np.mean([token["score"] for token in tokens])),
            "word": decoder.decode(words) if decoder is not None else " ".join(words),
            "start": tokens[0]["start"],
            "end": tokens[-1]["end"],
        }


def _tag(entity):
    """("B" or "I", the entity type) of a label; a label without a B-/I- prefix continues (I)."""
    if entity.startswith(("B-", "I-")):
        return entity[0], entity[2:]
    return "I", entity


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
