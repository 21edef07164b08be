"""Triton python-backend model: the ONNX graph run by ONNX Runtime on CPU, servable by any Triton build.

The dynamic batcher may join requests whose sequence lengths differ (the config allows ragged batches): they are
padded to the longest with the tokenizer's pad values from padding.json, run in one session call, and each request
gets its own rows back, cut to its own sequence length. Tensor names and types come from the model config.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# optimization.graph.level as Triton's onnxruntime backend reads it (0 or absent: all optimizations)
GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
EXECUTION_MODES = {0: ort.ExecutionMode.ORT_SEQUENTIAL, 1: ort.ExecutionMode.ORT_PARALLEL}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        padding = json.loads((folder / "padding.json").read_text())
        self.sequence_axes = padding["sequence_axes"]
        self.pad_values = padding["pad_values"]
        self.inputs = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["input"]}
        self.outputs = [t["name"] for t in config["output"]]
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), session_options(config), providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        try:
            batches = [self._read(request) for request in requests]
            results = self.session.run(self.outputs, self._join(batches))
            return [self._respond(part) for part in self._split(dict(zip(self.outputs, results)), batches)]
        except Exception as exc:  # one bad request fails the joined batch: every request gets the message
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in requests]

    def _read(self, request):
        return {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
            for name, dtype in self.inputs.items()
        }

    def _length(self, batch):
        """The request's sequence length (0 when no input has a sequence axis)."""
        lengths = {value.shape[self.sequence_axes[name]] for name, value in batch.items() if name in self.sequence_axes}
        if len(lengths) > 1:
            raise ValueError(f"inputs of one request differ in sequence length: {sorted(lengths)}")
        return lengths.pop() if lengths else 0

    def _join(self, batches):
        """Pad every request to the longest sequence and stack them along the batch axis."""
        length = max(self._length(batch) for batch in batches)
        return {
            name: np.concatenate([self._pad(name, batch[name], length) for batch in batches]) for name in self.inputs
        }

    def _pad(self, name, value, length):
        axis = self.sequence_axes.get(name)
        if axis is None or value.shape[axis] == length:
            return value
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, length - value.shape[axis])
        return np.pad(value, widths, constant_values=self.pad_values[name])

    def _split(self, results, batches):
        """Each request's rows of every output, cut back to the request's own sequence length."""
        start = 0
        for batch in batches:
            rows, length = len(next(iter(batch.values()))), self._length(batch)
            part = {}
            for name, value in results.items():
                index = [slice(start, start + rows)] + [slice(None)] * (value.ndim - 1)
                if name in self.sequence_axes:
                    index[self.sequence_axes[name]] = slice(0, length)
                part[name] = np.ascontiguousarray(value[tuple(index)])
            start += rows
            yield part

    @staticmethod
    def _respond(outputs):
        tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def session_options(config):
    """SessionOptions from the parameters and graph level of the config, with idle-thread spinning off."""
    parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    level = int(config.get("optimization", {}).get("graph", {}).get("level", 0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", 0))
    options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", 0))
    options.execution_mode = EXECUTION_MODES[int(parameters.get("execution_mode", 0))]
    options.graph_optimization_level = GRAPH_LEVELS[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
