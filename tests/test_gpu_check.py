"""scripts/gpu_check.sh on this CPU host: it exits 0 saying no GPU is present; and the parts of its checks that do
not need a GPU (the prepared artifacts, CompactBert against PyTorch's answers, engine_runner on the TensorRT double
with host buffers) run here, so its first run on a GPU host is not also their first run."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trt_double import HostDevice

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="PyTorch sees a CUDA device here")
def test_on_a_cpu_host_it_exits_0_saying_no_gpu_is_present(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no GPU present: nvidia-smi missing") or "a GPU is present" in done.stdout
    result = json.loads(out.read_text())
    assert result["checks"] == [] and result["result"].startswith("no GPU present")
    assert result["host"]["device"] is None and "CPUExecutionProvider" in result["host"]["onnxruntime_providers"]


def test_the_prepared_artifacts_run_the_checks_that_need_no_gpu(gpu_check, tmp_path):
    folder = tmp_path / "artifacts"
    assert gpu_check.main(["--prepare", str(folder)]) == 0  # checks CompactBert against transformers on the way
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2 << 20  # carried to a GPU host with the checkout
    case = gpu_check.load(folder)
    assert [b.shape for b in case.batches] == [f"{b}x{s}" for b in (1, 2, 4) for s in (2, 16, 32)]
    compact = gpu_check.CompactBert(dict(gpu_check.np.load(folder / "weights.npz")), case.config,
                                    case.spec.input_names)
    fp32 = gpu_check.gate(case, "fp32 CompactBert on CPU", gpu_check.torch_runner(case, compact, contextlib.nullcontext,
                                                                                   "cpu"), case.gates["fp32"], True)
    assert fp32["passed"], fp32["reason"]
    runner = gpu_check.runner_check(case, HostDevice())
    assert runner["passed"] and runner["profiles_run"] == [0, 1], runner["reason"]
    assert runner["check"] == "engine_runner, TensorRT double, HostDevice"
