"""The GPU path without a GPU: the preflight (injected probes and a stand-in `tensorrt` module where the real host
has none), Triton's profile choice, and engine_runner's control flow on CPU through tests/trt_double.py.

The runner tests run a DOUBLE of the TensorRT 10 runtime, a part that cannot run here (no GPU; full TensorRT cannot
be installed): they check the runner's calls, profile choice, shapes, dtypes, buffers and stream handling against
TensorRT 10's signatures, and the gate on the outputs the double computes with ONNX Runtime; they say nothing about
TensorRT's numerics or kernels. scripts/gpu_check.sh runs the same double with real CUDA buffers on a GPU host.
"""

import dataclasses
import functools
import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import pytest

from packager import cli, export, pipeline, source, tensorrt, validate
from packager.errors import GateFailed, PackagerError
from packager.recipe import load_recipe
from packager.record import BuildRecord, EngineFacts, ProfileShapes
from packager.tasks import get_task
from tests import trt_double

# first-fit takes "wide" for every shape it holds; Triton takes "short" wherever both hold (its opt is closer)
WIDE_THEN_SHORT = [{"name": "wide", "sequence": [2, 30, 32]}, {"name": "short", "sequence": [2, 4, 16]}]
H200 = tensorrt.TorchCuda("2.13.0+cu126", "12.6", "NVIDIA H200", (9, 0))


def probes(cuda=H200, driver="560.35.03"):
    return tensorrt.Probes(torch=lambda: cuda, driver=lambda: driver)


def deployable(monkeypatch, trt: types.ModuleType) -> dict:
    """BACKENDS whose deployable entry imports `trt` (a stand-in for full TensorRT, which is not installed here)."""
    monkeypatch.setitem(sys.modules, "tensorrt_stand_in", trt)
    return {"tensorrt": dataclasses.replace(tensorrt.BACKENDS["tensorrt"], module="tensorrt_stand_in")}


def stand_in(version: str) -> types.ModuleType:
    module = types.ModuleType("tensorrt_stand_in")
    module.__version__ = version
    return module


@pytest.fixture(scope="module")
def tiny(tiny_recipe_embeddings, tmp_path_factory):
    recipe = tiny_recipe_embeddings.override({"tensorrt": {"profiles": WIDE_THEN_SHORT}})
    loaded = source.load(recipe)
    model = export.export_onnx(loaded, get_task(recipe.task), tmp_path_factory.mktemp("onnx") / "model.onnx",
                               recipe.opset)
    return recipe, loaded, model


def plan_profiles(recipe, spec):
    return [tensorrt.profile_shapes(spec, profile) for profile in recipe.engine_profiles]


# --- preflight ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="full TensorRT is installed here")
def test_on_this_host_the_tensorrt_backend_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    code = cli.main(["package", "bert", "--trt-backend", "tensorrt", "--build-dir", str(tmp_path / "build"),
                     "--repository", str(tmp_path / "repo"), "--no-smoke"])
    captured = capsys.readouterr()
    assert code == 1 and not (tmp_path / "build").exists()
    (line,) = captured.err.splitlines()
    assert line.startswith("error: --trt-backend tensorrt: no TensorRT package: TensorRT: No module named 'tensorrt'")
    assert "--trt-backend tensorrt-rtx for a build check" in line


def test_the_real_probes_see_no_gpu_here():
    import torch

    from packager.tensorrt.preflight import nvidia_smi_driver, torch_cuda

    if torch.cuda.is_available():
        pytest.skip("PyTorch sees a CUDA device here")
    seen = torch_cuda()
    assert seen.device is None and seen.capability is None and seen.cuda == torch.version.cuda
    if shutil.which("nvidia-smi") is None:
        assert nvidia_smi_driver() is None


def test_auto_keeps_the_build_check_and_asks_nothing_of_the_host(tiny_recipe_embeddings):
    def no_probe():
        raise AssertionError("a build check probes no GPU")

    checked = tensorrt.preflight(tiny_recipe_embeddings.tensorrt, "auto", probes=tensorrt.Probes(no_probe, no_probe))
    assert checked.loaded.backend.module == "tensorrt_rtx" and checked.host is None
    assert checked.target.matches is None
    skipped = tensorrt.preflight(tiny_recipe_embeddings.tensorrt, "none")
    assert skipped.loaded is None and "--trt-backend none" in skipped.reason


@pytest.mark.parametrize("cuda, driver, message", [
    (dataclasses.replace(H200, cuda=None, device=None, capability=None), "560.35.03",
     "needs a CUDA build of PyTorch to gate its plan; PyTorch 2.13.0+cu126 is a CPU build"),
    (H200, None, "needs an NVIDIA GPU and driver: nvidia-smi is missing or reports no driver"),
    (dataclasses.replace(H200, device=None, capability=None), "560.35.03",
     "PyTorch 2.13.0+cu126 (CUDA 12.6) sees no CUDA device, with NVIDIA driver 560.35.03"),
    (H200, "550.54.15", "NVIDIA driver 550.54.15 is below Triton 24.10's 560 (data-center GPUs: 470.57+, 525.85+"),
    (H200, "535.54.03", "NVIDIA driver 535.54.03 is below Triton 24.10's 560"),
])
def test_the_preflight_refuses_a_host_that_cannot_build_and_gate_a_plan(monkeypatch, tiny_recipe_embeddings,
                                                                      cuda, driver, message):
    backends = deployable(monkeypatch, stand_in("10.5.0.18"))
    with pytest.raises(PackagerError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        tensorrt.preflight(tiny_recipe_embeddings.tensorrt, "tensorrt", backends=backends, probes=probes(cuda, driver))


def test_a_ready_host_is_recorded_and_a_data_center_driver_branch_warns(monkeypatch, tiny_recipe_embeddings, capsys):
    backends = deployable(monkeypatch, stand_in("10.5.0.18"))
    checked = tensorrt.preflight(tiny_recipe_embeddings.tensorrt, "auto", backends=backends, probes=probes())
    assert checked.host == tensorrt.GpuHost("NVIDIA H200", "9.0", "560.35.03") and checked.target.matches is True
    assert capsys.readouterr().out == ""
    tensorrt.preflight(tiny_recipe_embeddings.tensorrt, "tensorrt", backends=backends,
                       probes=probes(driver="535.104.05"))
    assert "NVIDIA driver 535.104.05 runs Triton 24.10 (driver 560) on data-center GPUs only" in capsys.readouterr().out


def test_ampere_plus_needs_compute_capability_8(monkeypatch, tiny_recipe_embeddings):
    backends = deployable(monkeypatch, stand_in("10.5.0.18"))
    settings = tiny_recipe_embeddings.override({"tensorrt": {"hardware_compatibility_level": "ampere+"}}).tensorrt
    turing = dataclasses.replace(H200, device="Tesla T4", capability=(7, 5))
    with pytest.raises(PackagerError, match="needs a GPU of compute capability 8.0 or later; Tesla T4 is 7.5"):
        tensorrt.preflight(settings, "tensorrt", backends=backends, probes=probes(turing))
    assert tensorrt.preflight(settings, "tensorrt", backends=backends, probes=probes()).host.compute_capability == "9.0"


@pytest.mark.parametrize("installed, compatible, expected", [
    ("10.5.0.18", False, True),
    ("10.5.0.17", False, False),  # the same patch release, another build: the plan does not load
    ("10.5.0", False, False),  # no build number: cannot be confirmed
    ("10.4.0.26", True, True),  # a version-compatible plan loads in a later TensorRT 10
    ("10.6.0.26", True, False),  # ... not in an earlier one
    ("9.3.0.1", True, False),  # ... nor across a major version
])
def test_the_target_release_check_is_on_the_exact_version(installed, compatible, expected):
    loaded = tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], stand_in(installed))
    assert tensorrt.check_target("24.10", loaded, compatible).matches is expected


def test_a_version_that_is_not_the_releases_warns_or_with_strict_refuses(monkeypatch, tiny_recipe_embeddings,
                                                                         capsys):
    settings = tiny_recipe_embeddings.tensorrt
    backends = deployable(monkeypatch, stand_in("10.5.0"))
    tensorrt.preflight(settings, "tensorrt", backends=backends, probes=probes())
    assert ("warning: installed TensorRT 10.5.0 reports no build number, so it cannot be confirmed as Triton 24.10's "
            "TensorRT 10.5.0.18") in capsys.readouterr().out
    backends = deployable(monkeypatch, stand_in("10.7.0.23"))
    with pytest.raises(PackagerError, match="--strict: installed TensorRT 10.7.0.23 is not Triton 24.10's TensorRT "
                                            "10.5.0.18: its plan may not load there; pip install 'tensorrt==10.5.0.*'"):
        tensorrt.preflight(settings, "tensorrt", strict=True, backends=backends, probes=probes())


# --- Triton's profile choice -------------------------------------------------------------------------------------


def test_triton_profile_choice_on_the_bert_profiles_agrees_with_first_fit():
    recipe = load_recipe("bert")
    ranges = [{"ids": ((p.batch.min, p.sequence.min), (p.batch.opt, p.sequence.opt), (p.batch.max, p.sequence.max))}
              for p in recipe.engine_profiles]
    for batch in (1, 8, 32):
        assert [tensorrt.triton_profile(ranges, {"ids": (batch, s)}) for s in (2, 64, 128, 129, 256)] == [0, 0, 0, 1, 1]
    assert tensorrt.triton_profile(ranges, {"ids": (33, 64)}) is None


def test_triton_profile_choice_keeps_the_lowest_index_on_a_tie_and_uses_the_sources_distance():
    same = ((1, 2), (4, 8), (8, 16))
    assert tensorrt.triton_profile([{"x": same}, {"x": same}], {"x": (4, 8)}) == 0
    # tensorrt_backend adds |opt[k] - request[k-1]| for k >= 1, the request shape holding its batch dim: opt sequence
    # 4 is nearer the batch (2) than opt 30, so profile 0 wins although profile 1's opt equals the request
    ranges = [{"x": ((1, 2), (2, 4), (4, 32))}, {"x": ((1, 2), (2, 30), (4, 32))}]
    assert tensorrt.triton_profile(ranges, {"x": (2, 30)}) == 0


# --- engine_runner on the double ---------------------------------------------------------------------------------


def runner_on_double(recipe, model, tmp_path, corrupt=0.0, compatible=False):
    device = trt_double.HostDevice()
    trt = trt_double.module(device)
    plan = trt_double.write_plan(tmp_path / "model.plan", model.path, model.spec, plan_profiles(recipe, model.spec),
                                 corrupt)
    loaded = tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], trt)
    return tensorrt.engine_runner(plan, model.spec, loaded, device, compatible), trt, device


def test_the_runner_uses_tritons_profile_choice_where_first_fit_differs(tiny, tmp_path):
    recipe, _, model = tiny
    runner, trt, device = runner_on_double(recipe, model, tmp_path)
    contexts = [call for call in trt.calls if call[0] == "profile"]
    assert [(index, stream) for _, _, index, stream in contexts] == [(0, device.stream), (1, device.stream)]
    reference = validate.onnxruntime_runner(model.path, model.spec)
    chosen = {}
    for batch in (1, 2, 4):
        for sequence in (2, 16, 32):
            inputs = {t.name: np.ones((batch, sequence), t.numpy_dtype) for t in model.spec.inputs}
            trt.calls.clear()
            outputs = runner(inputs)
            (execute,) = [call for call in trt.calls if call[0] == "execute"]
            chosen[batch, sequence] = execute[1]
            assert execute[2] == device.stream
            assert [c[1:] for c in trt.calls if c[0] == "input shape"] == [(n, (batch, sequence))
                                                                          for n in model.spec.input_names]
            expected = reference(inputs)
            assert list(outputs) == model.spec.output_names
            for name in model.spec.output_names:
                assert outputs[name].dtype == np.float32 and outputs[name].shape == expected[name].shape
                np.testing.assert_allclose(outputs[name], expected[name], rtol=0, atol=1e-6)
    first_fit = {shape: 0 for shape in chosen}  # "wide" holds every shape
    assert chosen != first_fit
    assert chosen == {(b, s): 0 if s == 32 else 1 for b, s in chosen}
    assert device.pending == [] and device.synchronized == 1 + 9  # after the profiles, then once per run


def test_the_runner_passes_the_gate_on_the_double_and_refuses_shapes_no_profile_holds(tiny, tmp_path):
    recipe, loaded, model = tiny
    task = get_task(recipe.task)
    batches = validate.make_batches(loaded.tokenizer, model.spec, recipe.profile)
    validator = validate.Validator(task, model.spec, batches, task.reference(loaded, model.spec),
                                   recipe.gates.fp32)
    runner, trt, _ = runner_on_double(recipe, model, tmp_path)
    assert validator.check("tensorrt", runner).passed
    assert {call[1] for call in trt.calls if call[0] == "execute"} == {0, 1}
    too_long = {t.name: np.ones((1, 33), t.numpy_dtype) for t in model.spec.inputs}
    with pytest.raises(PackagerError, match="no profile of model.plan accepts shapes"):
        runner(too_long)


def test_a_version_compatible_plan_is_deserialized_with_host_code_allowed(tiny, tmp_path):
    recipe, _, model = tiny
    _, trt, _ = runner_on_double(recipe, model, tmp_path, compatible=True)
    assert ("deserialize", True) in trt.calls
    (tmp_path / "model.plan").write_text("not a plan")
    with pytest.raises(tensorrt.EngineBuildError, match="could not deserialize the plan: the double reads only"):
        tensorrt.engine_runner(tmp_path / "model.plan", model.spec,
                               tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], trt), trt_double.HostDevice())


# --- the pipeline's runtime gate -----------------------------------------------------------------------------------


def gate_on_double(monkeypatch, recipe, model, tmp_path, corrupt):
    """pipeline.build with full TensorRT's place taken: the preflight answers for an H200, the plan is the double's,
    and the runtime gate runs engine_runner on it (host buffers)."""
    device = trt_double.HostDevice()
    loaded = tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], trt_double.module(device))
    target = tensorrt.check_target(recipe.tensorrt.triton_release, loaded)
    checked = tensorrt.Preflight(loaded, host=tensorrt.GpuHost("NVIDIA H200", "9.0", "560.35.03"), target=target)

    def build_engine(onnx_path, spec, recipe, work_dir, **options):
        work_dir.mkdir(parents=True)
        plan = trt_double.write_plan(work_dir / "model.plan", onnx_path, spec, plan_profiles(recipe, spec), corrupt)
        profiles = tuple(ProfileShapes(p.name, i, shapes) for i, (p, shapes)
                         in enumerate(zip(recipe.engine_profiles, plan_profiles(recipe, spec))))
        facts = EngineFacts(
            package="tensorrt", version=loaded.version, deployable=True, gpu="NVIDIA H200", compute_capability="9.0",
            precision="fp32", fp16_method=None, graph=onnx_path.name, workspace_mib=1024, profiles=profiles,
            engine_bytes=plan.stat().st_size, timing_cache="reused", triton_release="24.10",
            triton_tensorrt=target.tensorrt, tensorrt_matches_triton=True, driver="560.35.03")
        return tensorrt.EngineResult("deployable", "the double's plan", plan, spec, profiles, facts)

    monkeypatch.setattr(tensorrt, "preflight", lambda *args: checked)
    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    monkeypatch.setattr(tensorrt, "engine_runner", functools.partial(tensorrt.engine_runner, device=device))
    options = pipeline.BuildOptions(build_root=tmp_path / "build", trt_backend="tensorrt")
    return pipeline.build(recipe.override({"optimize": {"cpu": ["plain"]}}), options)


def test_a_plan_that_passes_the_runtime_gate_is_shipped_with_its_facts(monkeypatch, tiny, tmp_path):
    recipe, _, model = tiny
    (tmp_path / "build" / "tiny.failed-plan").mkdir(parents=True)  # an earlier failure, superseded
    built = gate_on_double(monkeypatch, recipe, model, tmp_path, corrupt=0.0)
    record = BuildRecord.read(built.folder)
    assert record.tensorrt.status == "deployable" and (built.folder / "model.plan").exists()
    facts = record.tensorrt.facts
    assert (facts.gpu, facts.compute_capability, facts.driver) == ("NVIDIA H200", "9.0", "560.35.03")
    assert (facts.version_compatible, facts.hardware_compatibility_level) == (False, "none")
    assert record.tensorrt.gate.name == "fp32" and not (tmp_path / "build" / "tiny.failed-plan").exists()


def test_a_plan_that_fails_the_runtime_gate_is_kept_for_inspection(monkeypatch, tiny, tmp_path, capsys):
    recipe, _, model = tiny
    with pytest.raises(GateFailed, match="tensorrt"):
        gate_on_double(monkeypatch, recipe, model, tmp_path, corrupt=0.5)
    kept = tmp_path / "build" / "tiny.failed-plan"
    assert json.loads((kept / "model.plan").read_text())["corrupt"] == 0.5
    failure = json.loads((kept / "failure.json").read_text())
    assert failure["error"].startswith("GateFailed: ") and failure["facts"]["gpu"] == "NVIDIA H200"
    assert f"the plan that failed its runtime gate is kept in {kept}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["tiny.failed-plan"]  # no build, no staging
