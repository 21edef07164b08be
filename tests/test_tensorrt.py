"""The TensorRT step: recipe settings, profiles, the real TensorRT-RTX build (tiny model and MiniLM), loud failures,
timing cache, the skip path, the target-release check, the compatibility settings, and the trtexec command (as
pipeline.build prints it, its inputs run through the build's checks). The GPU path (preflight, Triton's profile
choice, the runner) is in test_tensorrt_runtime.py."""

import dataclasses
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager import export, iospec, pipeline, source, tensorrt
from packager.errors import PackagerError, UsageError
from packager.iospec import IOSpec, TensorSpec
from packager.optimize.fp16 import fp16_graph
from packager.recipe import EngineProfile, Range, load_recipe
from packager.record import sha256, to_data
from packager.tasks import get_task

pytest.importorskip("tensorrt_rtx", reason="the build check needs tensorrt-rtx-cu12 (make test installs it)")

TWO_PROFILES = [{"name": "short", "sequence": [2, 8, 16]}, {"name": "long", "sequence": [16, 32, 32]}]


def exported(recipe, folder: Path):
    loaded = source.load(recipe)
    return export.export_onnx(loaded, get_task(recipe.task), folder / "model.onnx", recipe.opset)


def build(graph: Path, spec: IOSpec, recipe, work_dir: Path, **options):
    """build_engine as the pipeline calls it: an fp16 engine gets the fp16 graph of `graph`, made in work_dir."""
    def make_fp16() -> Path:
        work_dir.mkdir(parents=True, exist_ok=True)
        return fp16_graph(graph, work_dir / "model.fp16.onnx")

    return tensorrt.build_engine(graph, spec, recipe, work_dir, fp16_graph=make_fp16, **options)


def with_tensorrt(recipe, **settings):
    return recipe.override({"tensorrt": settings})


@pytest.fixture(scope="module")
def tiny(tiny_recipe_embeddings, tmp_path_factory):
    """The tiny BERT exported, with a recipe asking for two profiles (batch 1/2/4; sequence 2-16 and 16-32)."""
    recipe = with_tensorrt(tiny_recipe_embeddings, profiles=TWO_PROFILES)
    return recipe, exported(recipe, tmp_path_factory.mktemp("tiny-onnx"))


def tiny_expected_profiles(spec: IOSpec) -> list[tuple[str, dict]]:
    """Written out by hand from the recipe: (batch min/opt/max 1/2/4) x each profile's sequence range."""
    short = ((1, 2), (2, 8), (4, 16))
    long = ((1, 16), (2, 32), (4, 32))
    return [("short", {name: short for name in spec.input_names}), ("long", {name: long for name in spec.input_names})]


def built_profiles(result) -> list[tuple[str, dict]]:
    return [(profile.name, profile.shapes) for profile in result.profiles]


# --- settings ----------------------------------------------------------------------------------------------------


def test_settings_default_to_one_profile_equal_to_the_recipe(tiny_recipe_embeddings):
    recipe = tiny_recipe_embeddings
    assert recipe.tensorrt.precision == "fp32"
    assert recipe.engine_profiles == (EngineProfile("default", Range(1, 2, 4), Range(2, 16, 32)),)
    assert recipe.engine_max_batch_size == 4


def test_bert_recipe_asks_for_fp16_with_two_profiles_covering_its_profile():
    recipe = load_recipe("bert")
    assert recipe.tensorrt.precision == "fp16"
    assert [(p.name, p.batch, p.sequence) for p in recipe.engine_profiles] == [
        ("short", Range(1, 8, 32), Range(2, 64, 128)),
        ("long", Range(1, 8, 32), Range(128, 256, 256)),
    ]
    assert recipe.gates.for_engine("fp16") == ("fp16", recipe.gates.fp16)
    assert recipe.gates.for_engine("fp32") == ("fp32", recipe.gates.fp32)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"precison": "fp16"}, "[tensorrt]: unknown key 'precison'; did you mean 'precision'?"),
        ({"precision": "int8"}, "[tensorrt] precision must be one of 'fp32', 'fp16'"),
        ({"triton_release": "19.01"}, "unknown Triton release '19.01'"),
        ({"workspace_mib": 0}, "workspace_mib must be a positive integer"),
        ({"profiles": [{"name": "big", "sequence": [2, 16, 64]}]}, "sequence 2..64 is outside the recipe's 2..32"),
        ({"profiles": [{"name": "a", "sequence": [2, 8, 10]}, {"name": "b", "sequence": [12, 16, 32]}]},
         "no profile accepts batch 1 x sequence 11"),
        ({"profiles": [{"name": "a"}, {"name": "a"}]}, "profile names must be unique"),
        ({"profiles": [{"sequence": [2, 16, 32]}]}, "[tensorrt.profiles[0]] name is missing (a string)"),
        ({"hardware_compatibility_level": "hopper+"}, "hardware_compatibility_level must be one of 'none', 'ampere+'"),
        ({"version_compatible": "yes"}, "[tensorrt] version_compatible must be true or false"),
    ],
)
def test_bad_tensorrt_sections_are_usage_errors_naming_the_problem(tiny_recipe_embeddings, section, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        tiny_recipe_embeddings.override({"tensorrt": section})


def test_profile_shapes_follow_the_io_spec_axes():
    spec = IOSpec(
        inputs=(TensorSpec("ids", "INT64", ("batch", "sequence")), TensorSpec("scale", "FLOAT", (3,))),
        outputs=(TensorSpec("out", "FLOAT", ("batch", 7)),),
    )
    profile = EngineProfile("p", Range(1, 4, 8), Range(5, 6, 9))
    assert tensorrt.profile_shapes(spec, profile) == {"ids": ((1, 5), (4, 6), (8, 9))}  # fixed inputs need none
    odd = IOSpec((TensorSpec("pixels", "FLOAT", ("batch", "height")),), ())
    with pytest.raises(PackagerError, match="'pixels' has dynamic axes \\['height'\\]"):
        tensorrt.profile_shapes(odd, profile)


# --- the real build (TensorRT-RTX) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_model_builds_with_two_profiles_matching_the_io_spec_and_recipe(tiny, tmp_path, precision):
    recipe, model = tiny
    result = build(model.path, model.spec, with_tensorrt(recipe, precision=precision), tmp_path)

    assert result.status == "build-check"
    assert "no deployable engine was produced" in result.message and "not published" in result.message
    assert result.network == tensorrt.engine_dims(model.spec)
    assert [t.dtype for t in result.network.inputs] == [t.dtype for t in model.spec.inputs]  # IO types kept in fp16
    assert built_profiles(result) == tiny_expected_profiles(model.spec)
    assert [p.index for p in result.profiles] == [0, 1]
    assert result.rows()[0] == ["0 short", model.spec.input_names[0], "1x2", "2x8", "4x16"]
    assert result.engine_path is None and not (tmp_path / tensorrt.ENGINE_FILE).exists()
    facts = result.facts
    assert (facts.package, facts.deployable, facts.gpu, facts.precision) == (
        "tensorrt_rtx", False, "none (build check)", precision)
    assert facts.engine_bytes > 0 and result.stats.build_seconds > 0
    assert facts.graph == ("model.fp16.onnx" if precision == "fp16" else "model.onnx")
    assert to_data(facts)["profiles"][0]["shapes"][model.spec.input_names[0]] == [[1, 2], [2, 8], [4, 16]]


def test_fp16_builds_from_an_fp16_graph_with_io_types_kept(tiny, tmp_path):
    recipe, model = tiny
    made = build(model.path, model.spec, with_tensorrt(recipe, precision="fp16"), tmp_path)
    graph = onnx.load(str(tmp_path / made.facts.graph))
    assert TensorProto.FLOAT16 in {init.data_type for init in graph.graph.initializer if len(init.dims) == 2}
    assert iospec.from_onnx(graph) == model.spec
    with pytest.raises(PackagerError, match="needs its fp16 graph"):
        tensorrt.build_engine(model.path, model.spec, with_tensorrt(recipe, precision="fp16"), tmp_path)


def test_timing_cache_is_written_then_reused(tiny, tmp_path):
    recipe, model = tiny
    first = build(model.path, model.spec, recipe, tmp_path, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    assert cache_file.name == f"tensorrt_rtx-{first.facts.version}.timing-cache"
    assert first.stats.timing_cache_loaded_bytes == 0
    assert first.stats.timing_cache_saved_bytes == cache_file.stat().st_size > 0

    second = build(model.path, model.spec, recipe, tmp_path, cache_dir=tmp_path / "cache")
    assert second.stats.timing_cache_loaded_bytes == cache_file.stat().st_size
    assert second.stats.timing_cache_path == str(cache_file)


def test_a_network_that_differs_from_the_io_spec_is_refused(tiny, tmp_path):
    recipe, model = tiny
    first = model.spec.inputs[0]
    wrong = IOSpec((TensorSpec(first.name, "INT32", first.dims), *model.spec.inputs[1:]), model.spec.outputs)
    expected = f"differs from the IO spec: input 0: TensorRT has .*'{first.name}', dtype='INT64'"
    with pytest.raises(tensorrt.EngineBuildError, match=expected):
        build(model.path, wrong, recipe, tmp_path)


def write_custom_op_graph(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu_ok"),
        helper.make_node("FancyOp", ["h"], ["y"], name="fancy_node", domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "custom", [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_an_unsupported_op_fails_with_the_parser_error_naming_the_node(tiny_recipe_embeddings, tmp_path, capsys):
    graph = write_custom_op_graph(tmp_path / "custom.onnx")
    with pytest.raises(tensorrt.EngineBuildError) as failure:
        build(graph, iospec.from_onnx(graph), tiny_recipe_embeddings, tmp_path)
    message = str(failure.value)
    assert "cannot parse custom.onnx: node 1 'fancy_node' (FancyOp): " in message
    assert "Plugin not found" in message
    assert "parser error: node 1 'fancy_node' (FancyOp)" in capsys.readouterr().out


def write_fixed_reshape_graph(path: Path) -> Path:
    """Parses fine, but reshaping batch x sequence to a fixed 2x8 cannot hold for the profile's shapes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    shape = numpy_helper.from_array(np.array([2, 8], np.int64), "shape")
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_to_2x8")
    graph = helper.make_graph([node], "reshape", [x], [y], initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_build_that_returns_no_engine_raises_with_the_builder_log(tiny_recipe_embeddings, tmp_path):
    graph = write_fixed_reshape_graph(tmp_path / "reshape.onnx")
    with pytest.raises(tensorrt.EngineBuildError) as failure:
        build(graph, iospec.from_onnx(graph), tiny_recipe_embeddings, tmp_path)
    headline, *log = str(failure.value).splitlines()
    assert "built no engine from reshape.onnx" in headline and "reshape_to_2x8" in headline
    assert "builder errors:" in log and "last log messages:" in log


def test_importing_the_package_loads_no_tensorrt_nor_torch_nor_the_modules_above_it():
    """TensorRT and torch are imported by the build and the runner; the fp16 graph comes in as a callable."""
    heavy = ["tensorrt", "tensorrt_rtx", "torch", "packager.optimize", "packager.pipeline", "packager.bench"]
    code = f"import sys, packager.tensorrt; print(sorted(set({heavy}) & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent.parent).stdout
    assert imported.split() == ["[]"], f"packager.tensorrt imports {imported.strip()}"


# --- backends, skip, target release ------------------------------------------------------------------------------


def test_without_any_tensorrt_the_step_is_skipped_with_the_reason(tiny, tmp_path):
    recipe, model = tiny
    absent = {"tensorrt": dataclasses.replace(tensorrt.BACKENDS["tensorrt"], module="tensorrt_absent_in_this_test")}
    result = build(model.path, model.spec, recipe, tmp_path, backends=absent)
    assert result.status == "skipped"
    assert "No module named 'tensorrt_absent_in_this_test'" in result.message
    assert "pip install tensorrt" in result.message
    assert result.facts is None and result.profiles == () and list(tmp_path.iterdir()) == []


def test_backend_choice(tiny, tmp_path):
    recipe, model = tiny
    off = build(model.path, model.spec, recipe, tmp_path, backend="none")
    assert off.status == "skipped" and "--trt-backend none" in off.message
    assert tensorrt.select_backend("tensorrt-rtx").backend.module == "tensorrt_rtx"
    with pytest.raises(UsageError, match="unknown TensorRT backend 'trt'"):
        tensorrt.select_backend("trt")


def test_tensorrt_rtx_has_no_fp16_flag(tiny_recipe_embeddings):
    settings = with_tensorrt(tiny_recipe_embeddings, precision="fp16", fp16_method="flag").tensorrt
    with pytest.raises(UsageError, match="strongly typed networks only"):
        tensorrt.build_mode(settings, tensorrt.BACKENDS["tensorrt-rtx"])
    assert tensorrt.build_mode(settings, tensorrt.BACKENDS["tensorrt"]).builder_flags == ("FP16",)


def test_target_release_check_names_the_release_version_and_container():
    full = tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], types.SimpleNamespace(__version__="10.7.0.23"))
    mismatch = tensorrt.check_target("24.10", full)
    assert (mismatch.matches, mismatch.tensorrt) == (False, "10.5.0.18")
    assert "TensorRT 10.7.0.23 is not Triton 24.10's TensorRT 10.5.0.18" in mismatch.message
    assert "nvcr.io/nvidia/tensorrt:24.10-py3" in mismatch.message
    rtx = tensorrt.check_target("24.10", tensorrt.select_backend("tensorrt-rtx"))
    assert rtx.matches is None and "not served by Triton" in rtx.message


def test_compatibility_settings_go_through_the_builder_config_api(tiny_recipe_embeddings):
    """With full TensorRT's backend entry, _config sets BuilderFlag.VERSION_COMPATIBLE and the config's
    hardware_compatibility_level; the enums are TensorRT-RTX's (the same TensorRT 10 API names), the flag is read
    back from a real builder config, the level from a recording one (TensorRT-RTX ignores levels)."""
    import tensorrt_rtx as trt

    from packager.tensorrt.build import _config

    settings = with_tensorrt(tiny_recipe_embeddings, version_compatible=True,
                             hardware_compatibility_level="ampere+").tensorrt
    full = tensorrt.LoadedBackend(tensorrt.BACKENDS["tensorrt"], trt)
    mode = tensorrt.build_mode(settings, full.backend)
    config = _config(trt.Builder(trt.Logger()), full, settings, mode)
    assert config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE) and not config.get_flag(trt.BuilderFlag.TF32)

    class Recording:
        def __init__(self):
            self.flags, self.hardware_compatibility_level = [], None

        def set_memory_pool_limit(self, pool, size):
            pass

        def clear_flag(self, flag):
            pass

        def set_flag(self, flag):
            self.flags.append(flag)

    recorded = _config(types.SimpleNamespace(create_builder_config=Recording), full, settings, mode)
    assert recorded.flags == [trt.BuilderFlag.VERSION_COMPATIBLE]
    assert recorded.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    plain = _config(types.SimpleNamespace(create_builder_config=Recording), full, tiny_recipe_embeddings.tensorrt, mode)
    assert plain.flags == [] and plain.hardware_compatibility_level == trt.HardwareCompatibilityLevel.NONE


def test_the_build_check_applies_and_records_no_compatibility_settings(tiny, tmp_path):
    """TensorRT-RTX has no hardware levels and cannot build VERSION_COMPATIBLE (no lean runtime): not applied, and
    recorded as not applied."""
    recipe, model = tiny
    asked = with_tensorrt(recipe, version_compatible=True, hardware_compatibility_level="ampere+")
    result = build(model.path, model.spec, asked, tmp_path)
    assert result.status == "build-check" and "applies no version_compatible" in result.message
    assert (result.facts.version_compatible, result.facts.hardware_compatibility_level) == (False, "none")
    assert result.facts.driver is None and result.facts.triton_tensorrt == "10.5.0.18"


def test_trtexec_command_builds_the_same_profiles_in_the_release_container(tiny, tmp_path):
    recipe, model = tiny
    fp16 = with_tensorrt(recipe, precision="fp16", triton_release="25.01")
    onnx_path, engine = tmp_path / "a" / "model.fp16.onnx", tmp_path / "b" / "model.plan"
    cache = tmp_path / "c" / "t.cache"
    argv = tensorrt.trtexec_command(onnx_path, engine, model.spec, fp16, cache)
    names = model.spec.input_names
    shapes = lambda shape: ",".join(f"{name}:{shape}" for name in names)  # noqa: E731
    assert argv == [
        "docker", "run", "--rm", "--gpus", "all",
        "-v", f"{tmp_path}/a:/work/onnx:ro", "-v", f"{tmp_path}/b:/work/engine", "-v", f"{tmp_path}/c:/work/cache",
        "nvcr.io/nvidia/tensorrt:25.01-py3", "trtexec",
        "--onnx=/work/onnx/model.fp16.onnx", "--saveEngine=/work/engine/model.plan",
        "--profile=0", f"--minShapes={shapes('1x2')}", f"--optShapes={shapes('2x8')}", f"--maxShapes={shapes('4x16')}",
        "--profile=1",
        f"--minShapes={shapes('1x16')}", f"--optShapes={shapes('2x32')}", f"--maxShapes={shapes('4x32')}",
        "--memPoolSize=workspace:1024M", "--noTF32", "--stronglyTyped",
        "--timingCacheFile=/work/cache/t.cache", "--skipInference",
    ]
    flag = with_tensorrt(fp16, fp16_method="flag")
    flagged = tensorrt.trtexec_command(onnx_path, engine, model.spec, flag, cache)
    assert "--fp16" in flagged and "--stronglyTyped" not in flagged
    portable = with_tensorrt(fp16, version_compatible=True, hardware_compatibility_level="ampere+")
    assert tensorrt.trtexec_command(onnx_path, engine, model.spec, portable, cache)[-4:-2] == [
        "--versionCompatible", "--hardwareCompatibilityLevel=ampere+"]


# --- the trtexec command the pipeline prints ----------------------------------------------------------------------


def printed_trtexec(out: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if "docker run" in line]
    return shlex.split(line[line.index("docker run"):])


def host_path(argv: list[str], container_path: str) -> Path:
    """A path inside the container, through the command's `-v host:/work/x[:ro]` mounts."""
    mounts = dict(reversed(argv[i + 1].split(":")[:2]) for i, arg in enumerate(argv) if arg == "-v")
    folder, name = container_path.rsplit("/", 1)
    return Path(mounts[folder]) / name


def trtexec_profiles(argv: list[str]) -> dict[int, dict[str, tuple]]:
    """--profile=N then its --minShapes/--optShapes/--maxShapes, as {index: {input: (min, opt, max)}}."""
    profiles, ends = {}, ("--minShapes=", "--optShapes=", "--maxShapes=")
    for arg in argv:
        if arg.startswith("--profile="):
            index = int(arg.split("=")[1])
            profiles[index] = {}
        elif arg.startswith(ends):
            position = ends.index(arg[:arg.index("=") + 1])
            for item in arg.split("=", 1)[1].split(","):
                name, shape = item.split(":")
                profiles[index].setdefault(name, [None] * 3)[position] = tuple(map(int, shape.split("x")))
    return {index: {name: tuple(r) for name, r in shapes.items()} for index, shapes in profiles.items()}


def option(argv: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
    return value


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_printed_trtexec_command_builds_the_final_folders_graph_of_its_precision(
        tiny_recipe_embeddings, tmp_path, monkeypatch, capsys, precision):
    """pipeline.build prints the command when no plan was built and Docker answers; its inputs pass the build's
    checks: the graph of the precision in the final build folder, the IO spec, and the profiles TensorRT accepts."""
    recipe = tiny_recipe_embeddings.override(
        {"optimize": {"cpu": ["plain"]}, "tensorrt": {"precision": precision, "profiles": TWO_PROFILES}})
    monkeypatch.setattr(tensorrt, "docker_available", lambda: True)
    built = pipeline.build(recipe, pipeline.BuildOptions(build_root=tmp_path / "build", trt_backend="tensorrt-rtx"))
    argv = printed_trtexec(capsys.readouterr().out)
    final = (tmp_path / "build" / recipe.name).resolve()
    assert built.folder.resolve() == final and not list((tmp_path / "build").glob(".tiny.*"))  # staging renamed away

    graph = host_path(argv, option(argv, "onnx"))
    assert graph.exists() and graph.parent in (final, final / "tensorrt")
    assert graph == final / ("tensorrt/model.fp16.onnx" if precision == "fp16" else "model.onnx")
    assert built.record.graphs[str(graph.relative_to(final))] == sha256(graph)  # the file the build recorded
    weights = {init.data_type for init in onnx.load(str(graph)).graph.initializer if len(init.dims) == 2}
    assert weights == ({TensorProto.FLOAT16} if precision == "fp16" else {TensorProto.FLOAT})
    assert iospec.from_onnx(graph) == IOSpec.read(final / "iospec.json") == built.spec
    assert host_path(argv, option(argv, "saveEngine")) == final / "model.plan"
    assert host_path(argv, option(argv, "timingCacheFile")).parent == (tmp_path / "build" / ".cache").resolve()
    assert "--stronglyTyped" in argv and "--fp16" not in argv  # the precision is the graph's own
    assert option(argv, "memPoolSize") == f"workspace:{recipe.tensorrt.workspace_mib}M"

    # the real builder, on that exact file, with the build's checks (network IO = IO spec, profiles = recipe)
    check = tensorrt.build_engine(graph, built.spec, recipe, tmp_path / "check", backend="tensorrt-rtx",
                                  fp16_graph=lambda: graph)
    assert check.status == "build-check" and check.facts.graph == graph.name
    assert trtexec_profiles(argv) == {p.index: p.shapes for p in check.profiles}
    assert check.profiles == built.record.tensorrt.facts.profiles


# --- MiniLM ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    recipe = load_recipe("bert")
    return recipe, exported(recipe, tmp_path_factory.mktemp("minilm-onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_minilm_builds_with_the_recipe_profiles(minilm, tmp_path, precision):
    recipe, model = minilm
    result = build(model.path, model.spec, with_tensorrt(recipe, precision=precision), tmp_path)
    assert result.status == "build-check"
    assert result.network == tensorrt.engine_dims(model.spec)
    assert result.network.tensor("sentence_embedding").dims == (-1, 384)
    short = ((1, 2), (8, 64), (32, 128))
    long = ((1, 128), (8, 256), (32, 256))
    assert built_profiles(result) == [
        ("short", {name: short for name in model.spec.input_names}),
        ("long", {name: long for name in model.spec.input_names}),
    ]
    assert result.facts.precision == precision and result.facts.workspace_mib == 2048
