"""Median TensorRT build times for MiniLM (bert recipe: two profiles), fp32 and fp16; the README quotes this.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/measure_tensorrt.py
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

from packager import export, source, tensorrt
from packager.optimize.fp16 import fp16_graph
from packager.recipe import load_recipe
from packager.tasks import get_task

ROUNDS = 3


def main() -> None:
    out = Path(tempfile.mkdtemp())
    recipe = load_recipe("bert")
    model = export.export_onnx(source.load(recipe), get_task(recipe.task), out / "model.onnx", recipe.opset)
    started = time.perf_counter()
    fp16 = fp16_graph(model.path, out / "model.fp16.onnx")
    rows = {"fp16_graph_s": round(time.perf_counter() - started, 2)}
    for precision in ("fp32", "fp16"):
        precise = recipe.override({"tensorrt": {"precision": precision}})
        steps, builds = [], []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            result = tensorrt.build_engine(model.path, model.spec, precise, out, cache_dir=out / "cache",
                                           fp16_graph=lambda: fp16)
            steps.append(time.perf_counter() - started)
            builds.append(result.stats.build_seconds)
        rows[precision] = {
            "backend": f"{result.facts.package} {result.facts.version}",
            "step_median_s": round(statistics.median(steps), 2),
            "builder_median_s": round(statistics.median(builds), 2),
            "engine_mb": round(result.facts.engine_bytes / 1e6, 1),
        }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
