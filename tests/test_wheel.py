"""The wheel: `pip wheel .` ships every module, template, recipe and python-backend model source, and a packager
installed from it (not the checkout, not the editable install) exports, renders and publishes a repository.

The wheel is built from a copy of what the build reads (pyproject.toml, README.md, packager/): setuptools builds in
the source tree, where it would leave build/lib (build/ is the packager's own output folder) and an egg-info, and
a stale build/lib would put files deleted from the checkout into the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "packager"
BUILD_INPUTS = ("pyproject.toml", "README.md", "packager")
GOLDEN = Path(__file__).parent / "golden" / "tiny"
TARGETS = ["onnxruntime", "python"]
MODELS = {"tiny_tokenizer", "tiny_onnx", "tiny", "tiny_onnx_python", "tiny_python"}  # the ensembles: tiny, tiny_python
PYTHON_MODELS = {"tiny_tokenizer": "tokenizer_model.py", "tiny_onnx_python": "onnxruntime_model.py"}

# Runs in a fresh interpreter outside the project, importing only the installed packager (and its dependencies).
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import packager
    from packager import export, render, repository, source
    from packager.cpu import CPU_CLASSES
    from packager.recipe import Gates, known_recipes, load_recipe, parse_recipe
    from packager.record import BuildRecord, CpuRecord, EngineRecord, Gate, LevelRecord, OptimizeRecord, Release
    from packager.tasks import get_task

    model_dir, out, targets = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    recipes = {name: load_recipe(name).name for name in known_recipes()}  # the shipped recipes parse
    data = {"name": "tiny", "task": "embeddings", "source": {"path": str(model_dir)},
            "profile": {"batch": [1, 2, 4], "sequence": [2, 16, 32]}, "serving": {"targets": targets}}
    recipe = parse_recipe(data, "wheel test recipe")
    loaded = source.load(recipe)
    exported = export.export_onnx(loaded, get_task(recipe.task), out / "model.onnx", recipe.opset)
    models = render.render_repository(recipe, exported.spec, render.Artifacts(exported.path, loaded.tokenizer))
    level = LevelRecord("plain", True, True, "", Gate("fp32", Gates().fp32), file="model.onnx")
    record = BuildRecord(
        recipe="tiny", weights_sha256="0" * 64, parity=(), optimize=OptimizeRecord("cpu", "plain", "test", (level,)),
        tensorrt=EngineRecord("skipped", "not built"), graphs={}, cpu=CpuRecord("avx2", CPU_CLASSES, "fp32"),
    )
    release = Release.of(data, "wheel test", exported.spec, record)
    result = repository.publish(out / "repository", models, release, {})
    print(json.dumps({"packager": packager.__file__, "templates": str(render.TEMPLATE_DIR), "recipes": recipes,
                      "version": result.version, "paths": {k: str(v) for k, v in result.paths.items()}}))
""")


def package_files() -> set[str]:
    """What the wheel must hold of the package: every module, and every file of templates/ and recipes/."""
    files = {p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    files |= {p for folder in ("templates", "recipes") for p in (PACKAGE / folder).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    return {p.relative_to(ROOT).as_posix() for p in files}


def pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    pip("wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q", "-w", str(scratch / "dist"), ".",
        cwd=source)
    (built,) = (scratch / "dist").glob("triton_packager-*.whl")
    return built


def test_the_wheel_holds_every_module_template_recipe_and_python_model_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = package_files()
    assert {"packager/templates/python/tokenizer_model.py", "packager/templates/ensemble.pbtxt.j2",
            "packager/recipes/bert.toml"} <= expected
    assert sorted(expected - names) == []
    assert not [n for n in names if n.startswith("templates/")], "templates/ at the top level of the wheel"


def test_a_packager_installed_from_the_wheel_renders_and_publishes_a_repository(wheel, tmp_path, tiny_bert_dir):
    site = tmp_path / "site"
    pip("install", "--no-index", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel),
        cwd=tmp_path)
    work = tmp_path / "work"  # the current folder of the run: outside the project, empty
    work.mkdir()
    script = tmp_path / "render_from_wheel.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), str(tiny_bert_dir), str(work), json.dumps(TARGETS)],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])

    installed = site / "packager"
    assert Path(run["packager"]).resolve().parent == installed.resolve(), "imported a packager not from the wheel"
    assert Path(run["templates"]).resolve() == (installed / "templates").resolve()
    assert run["recipes"] and "bert" in run["recipes"]
    repository = work / "repository"
    assert set(run["paths"]) == MODELS
    version = str(run["version"])
    for name in MODELS:
        config = (repository / name / "config.pbtxt").read_text()
        assert config == (GOLDEN / f"{name}.pbtxt").read_text(), f"{name}: the wheel renders another config"
        assert (repository / name / version / "manifest.json").is_file()
    for name, source in PYTHON_MODELS.items():
        shipped = (repository / name / version / "model.py").read_bytes()
        assert shipped == (installed / "templates" / "python" / source).read_bytes()
        assert shipped == (PACKAGE / "templates" / "python" / source).read_bytes()
    assert (repository / "tiny_onnx" / version / "model.onnx").is_file()
    assert (repository / "tiny_onnx_python" / version / "model.onnx").is_file()
