"""Triton python-backend model: texts in, the model's token tensors out (names and types from the config).

Each request's texts are truncated at max_sequence_length and padded to the longest of them, at least to
min_sequence_length. The tokenizer files are in the version folder: nothing is downloaded.
"""

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoTokenizer  # noqa: E402  (after HF_HUB_OFFLINE)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"] / parameters["tokenizer_folder"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.max_length = int(parameters["max_sequence_length"])
        self.min_length = int(parameters["min_sequence_length"])
        self.text_input = config["input"][0]["name"]
        self.outputs = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["output"]}

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            values = pb_utils.get_input_tensor_by_name(request, self.text_input).as_numpy().reshape(-1)
            encoded = self.tokenize([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])
            tensors = [pb_utils.Tensor(name, encoded[name].astype(dtype)) for name, dtype in self.outputs.items()]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}"))

    def tokenize(self, texts):
        lengths = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_length=True)["length"]
        length = max([self.min_length, *lengths])
        return self.tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="np")
