"""Time the legacy (TorchScript) and dynamo ONNX exporters on the embedded MiniLM; the README quotes this.

    .venv/bin/python scripts/compare_exporters.py
"""

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from packager import export, source
from packager.recipe import load_recipe
from packager.tasks import get_task

ROUNDS = 3


def main() -> None:
    warnings.simplefilter("ignore")
    recipe = load_recipe("bert")
    loaded = source.load(recipe)
    task = get_task(recipe.task)
    names = list(loaded.tokenizer.model_input_names)
    wrapper = task.wrapper(loaded, names).eval()
    example = loaded.tokenizer(export.EXAMPLE_TEXTS, padding=True, return_tensors="pt")
    args = tuple(example[name] for name in names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out = Path(tempfile.mkdtemp())
    seconds: dict[str, list[float]] = {"legacy": [], "dynamo": []}
    for _ in range(ROUNDS):
        started = time.perf_counter()
        export.export_onnx(loaded, task, out / "legacy.onnx", recipe.opset)
        seconds["legacy"].append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=recipe.opset, input_names=names,
                output_names=[o.name for o in task.outputs],
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),
            )
        program.save(str(out / "dynamo.onnx"), external_data=False)
        seconds["dynamo"].append(time.perf_counter() - started)
    for name, values in seconds.items():
        opset = onnx.load(str(out / f"{name}.onnx"), load_external_data=False).opset_import[0].version
        print(f"{name}: median {statistics.median(values):.2f} s over {ROUNDS} exports, opset {opset}")


if __name__ == "__main__":
    main()
