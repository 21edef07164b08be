#!/usr/bin/env bash
# The prepared GPU check (issue 16): the fp16 and fp32 gates on CUDA, and engine_runner with real CUDA buffers
# (through the TensorRT runtime double of tests/trt_double.py), written to one JSON. See scripts/gpu_check.py.
#
#   scripts/gpu_check.sh --prepare build/gpu-check        here (transformers installed): the tiny model, ~1 MiB
#   scripts/gpu_check.sh --artifacts build/gpu-check      on the GPU host (no network; the checkout and that folder
#                                                         travel, well under 64 MiB); --out FILE
#                                                         (build/gpu_check.json)
#
# Python: $PYTHON, else .venv/bin/python when there, else python3 (a CUDA PyTorch, onnx, onnxruntime, numpy).
# Exit: 0 it ran, or no GPU is present (it says so); 1 a check that must pass failed; 3 a GPU is present but
# PyTorch cannot use it; 124 it ran past its 9.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 570 "$PYTHON" scripts/gpu_check.py "$@"
