"""Triton python-backend model: texts in, the model's token tensors out (names and types from the config).

One text input, or two (a pair: text and text_pair, or question and context), which are encoded with the
tokenizer's own pair template and the truncation strategy encoding.json names (longest_first, or only_second: a
question is never cut).

Each request's texts are truncated at max_sequence_length and padded to the longest of them, at least to
min_sequence_length, as the Hugging Face tokenizer does, then up to the next of length_buckets when the config
lists them: requests of similar length get one shape, so a backend that batches equal shapes only can join them. encoding.json (next to this file, written by the packager
from that tokenizer) says which library encodes, the tokenizers.Encoding field behind each output, the value each
output is padded with, and the padding and truncation sides. The tokenizer files are in the version folder:
nothing is downloaded.

A request may name one of the model's sentence-transformers prompts (config parameter `prompts`, a JSON object) in
its request parameter `prompt_name`; that prompt is prepended to each of its texts. Without it, no prompt.

A fast tokenizer is run by the `tokenizers` library from tokenizer.json, the same Rust code the Hugging Face fast
tokenizer calls, without importing transformers (which imports torch: seconds at every load). Only a slow tokenizer
(no tokenizer.json) falls back to transformers.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

ENCODING_FILE = "encoding.json"
PADDED_SLICES = {  # where a row of `size` tokens goes in a padded row of `length`
    "right": lambda size, length: slice(0, size),
    "left": lambda size, length: slice(length - size, length),
}


class FastEncoder:
    """tokenizer.json run by `tokenizers`, truncated like transformers' fast tokenizer (its strategy, no stride)."""

    def __init__(self, folder, settings, names, max_length):
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # the file may carry the padding and truncation it was saved with
        self.tokenizer.enable_truncation(
            max_length, stride=0, strategy=settings["truncation_strategy"], direction=settings["truncation_side"]
        )
        self.tokenizer.encode_special_tokens = settings["split_special_tokens"]
        self.fields = {name: settings["fields"][name] for name in names}
        self.strategy, self.max_length = settings["truncation_strategy"], max_length

    def __call__(self, texts):
        """`texts`: strings, or (first, second) pairs."""
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        except Exception as exc:
            if self.strategy == "only_second":  # only the second text is cut: the first must fit
                raise ValueError(f"a question (the first text) is longer than the {self.max_length} tokens of "
                                 f"max_sequence_length leave ({exc})") from None
            raise
        return {name: [getattr(e, field) for e in encodings] for name, field in self.fields.items()}


class TransformersEncoder:
    """A slow tokenizer (no tokenizer.json) needs transformers, which imports torch: this load takes seconds."""

    def __init__(self, folder, settings, names, max_length):
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        self.names = names
        self.max_length = max_length
        self.strategy = settings["truncation_strategy"]

    def __call__(self, texts):
        pairs = [list(column) for column in zip(*texts)] if texts and isinstance(texts[0], tuple) else [texts]
        encoded = self.tokenizer(*pairs, truncation=self.strategy, max_length=self.max_length)
        return {name: encoded[name] for name in self.names}


ENCODERS = {"tokenizers": FastEncoder, "transformers": TransformersEncoder}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        version = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version / ENCODING_FILE).read_text())
        self.max_length = int(parameters["max_sequence_length"])
        self.min_length = int(parameters["min_sequence_length"])
        self.buckets = [int(size) for size in parameters.get("length_buckets", "").split(",") if size]
        self.prompts = json.loads(parameters.get("prompts", "{}"))
        self.text_inputs = [tensor["name"] for tensor in config["input"]]  # one text, or a pair
        self.outputs = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["output"]}
        self.pad_values = {name: settings["pad_values"][name] for name in self.outputs}
        self.padded_slice = PADDED_SLICES[settings["padding_side"]]
        encoder = ENCODERS[settings["library"]]
        self.encode = encoder(version / parameters["tokenizer_folder"], settings, list(self.outputs), self.max_length)

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            prompt = self._prompt(json.loads(request.parameters() or "{}").get("prompt_name"))
            columns = [[_text(v) for v in pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)]
                       for name in self.text_inputs]
            if len({len(column) for column in columns}) > 1:
                raise ValueError(f"{' and '.join(self.text_inputs)} have different numbers of rows")
            columns[0] = [prompt + text for text in columns[0]]
            encoded = self.tokenize(columns[0] if len(columns) == 1 else list(zip(*columns)))
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in encoded.items()])
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}"))

    def _prompt(self, name):
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise ValueError(f"unknown prompt_name '{name}' (this model's prompts: {known})")
        return self.prompts[name]

    def tokenize(self, texts):
        """Output name -> (texts, length) array: rows truncated, padded to the longest (at least min_length),
        rounded up to a length bucket."""
        rows = self.encode(texts)
        length = max([self.min_length, *(len(row) for row in next(iter(rows.values())))])
        length = next((bucket for bucket in self.buckets if bucket >= length), length)
        return {name: self._pad(name, rows[name], length) for name in self.outputs}

    def _pad(self, name, rows, length):
        padded = np.full((len(rows), length), self.pad_values[name], self.outputs[name])
        for index, row in enumerate(rows):
            padded[index, self.padded_slice(len(row), length)] = row
        return padded


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
