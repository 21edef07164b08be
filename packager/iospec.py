"""The IO spec: names, element types and dims of a graph's inputs and outputs, read back from the ONNX file.

Every later stage (templates, validation, tokenizer model, ensemble, client) takes tensor names from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from packager.errors import PackagerError

# ONNX element type name -> (numpy dtype, Triton config data_type, Triton wire datatype)
DTYPES: dict[str, tuple[str, str, str]] = {
    "FLOAT": ("float32", "TYPE_FP32", "FP32"),
    "FLOAT16": ("float16", "TYPE_FP16", "FP16"),
    "DOUBLE": ("float64", "TYPE_FP64", "FP64"),
    "INT64": ("int64", "TYPE_INT64", "INT64"),
    "INT32": ("int32", "TYPE_INT32", "INT32"),
    "INT8": ("int8", "TYPE_INT8", "INT8"),
    "UINT8": ("uint8", "TYPE_UINT8", "UINT8"),
    "BOOL": ("bool", "TYPE_BOOL", "BOOL"),
}

Dim = int | str  # a fixed size, or the symbolic name of a dynamic axis
BATCH, SEQUENCE = "batch", "sequence"  # the dynamic axes every exported graph names


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # ONNX element type name, e.g. "INT64"
    dims: tuple[Dim, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype][0])

    @property
    def triton_type(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def triton_datatype(self) -> str:
        return DTYPES[self.dtype][2]

    def axis(self, symbol: str) -> int | None:
        """Index of the dim named `symbol`, or None."""
        return self.dims.index(symbol) if symbol in self.dims else None

    def triton_dims(self, batch_axis: str = BATCH) -> list[int]:
        """Dims as a Triton config lists them: batch dim left out, other dynamic dims as -1."""
        return [d if isinstance(d, int) else -1 for d in self.dims if d != batch_axis]


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for tensor in self.inputs + self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "IOSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in items)

        return cls(tensors(data["inputs"]), tensors(data["outputs"]))

    @classmethod
    def read(cls, path: Path) -> "IOSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def rows(self) -> list[list[str]]:
        """Table rows: kind, name, dtype, dims."""
        return [
            [kind, t.name, t.dtype, "[" + ", ".join(str(d) for d in t.dims) + "]"]
            for kind, group in (("input", self.inputs), ("output", self.outputs))
            for t in group
        ]


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    if dtype not in DTYPES:
        raise PackagerError(f"tensor '{value.name}' has element type {dtype}, which Triton configs here do not map")
    dims: list[Dim] = []
    for index, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        elif dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            raise PackagerError(f"tensor '{value.name}' dim {index} has neither a size nor a name")
    return TensorSpec(value.name, dtype, tuple(dims))


def from_onnx(model: onnx.ModelProto | Path, expected_axes: dict[str, dict[int, str]] | None = None) -> IOSpec:
    """Read the IO spec from a graph; check that every expected dynamic axis kept its name.

    `expected_axes` maps tensor name -> {axis index: symbolic name}; a missing tensor, or an axis that came out
    fixed or under another name, is an error naming the tensor and axis.
    """
    if isinstance(model, Path):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    spec = IOSpec(
        inputs=tuple(_tensor_spec(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_tensor_spec(v) for v in model.graph.output),
    )
    for name, axes in (expected_axes or {}).items():
        try:
            tensor = spec.tensor(name)
        except KeyError:
            names = spec.input_names + spec.output_names
            raise PackagerError(f"the exported graph has no tensor '{name}'; it has {names}") from None
        for axis, symbol in axes.items():
            got = tensor.dims[axis] if axis < len(tensor.dims) else None
            if got != symbol:
                raise PackagerError(
                    f"dynamic axis {axis} of '{name}' should be named '{symbol}' but came out as {got!r} "
                    f"(dims {list(tensor.dims)}): the graph would only accept that one size"
                )
    return spec
