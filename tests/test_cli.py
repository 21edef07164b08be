import os
import shutil
import subprocess
import sys

import pytest

from packager.cli import main
from tests.live_server import require_native_backend


def write_recipe(path, model_dir, **fp32_gate):
    """A tiny recipe file; `fp32_gate` sets keys of its [gates.fp32] table."""
    lines = [f"{k} = {v}" for k, v in fp32_gate.items()]
    path.write_text(
        f'name = "tiny"\ntask = "embeddings"\n[source]\npath = "{model_dir}"\n'
        '[profile]\nbatch = [1, 2, 4]\nsequence = [2, 16, 32]\n[gates.fp32]\n' + "\n".join(lines) + "\n"
    )
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *fragments):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


def package_args(tmp_path, *extra):
    """Fast package options: no live smoke (tests/test_smoke.py has it), a repository under tmp_path."""
    return ["--build-dir", str(tmp_path / "build"), "--repository", str(tmp_path / "repo"), "--no-smoke", *extra]


def test_package_prints_tables_builds_and_publishes(capsys, tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    code, out, _ = run_cli(capsys, "package", str(recipe), *package_args(tmp_path))
    assert code == 0
    assert "IO spec" in out and "sentence_embedding" in out and "[batch, sequence]" in out
    assert "Parity against PyTorch" in out and "pass" in out
    assert "optimization levels for cpu" in out
    assert sorted(p.name for p in (tmp_path / "build").iterdir() if not p.name.startswith(".cache")) == ["tiny"]
    build = {p.name for p in (tmp_path / "build" / "tiny").iterdir()}
    assert {"model.onnx", "model.shipped.onnx", "iospec.json", "build.json"} <= build
    assert "published version 1 of tiny_tokenizer" in out
    assert (tmp_path / "repo" / "tiny_onnx" / "1" / "model.onnx").exists()


def test_publish_adds_a_version_and_refuses_to_overwrite(capsys, tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    assert run_cli(capsys, "package", str(recipe), *package_args(tmp_path, "--levels", "plain"))[0] == 0
    publish = ["publish", str(recipe), "--build-dir", str(tmp_path / "build"), "--repository", str(tmp_path / "repo"),
               "--no-smoke"]
    code, out, _ = run_cli(capsys, *publish)
    assert code == 0 and "published version 2" in out
    code, _, err = run_cli(capsys, *publish, "--version", "1")
    assert code == 2
    assert_one_line_error(err, "version 1", "--force")
    code, out, _ = run_cli(capsys, *publish, "--version", "1", "--force")
    assert code == 0 and "published version 1" in out


def test_unknown_model_is_exit_2_with_the_known_recipes(capsys):
    code, _, err = run_cli(capsys, "package", "no-such-model")
    assert code == 2
    assert_one_line_error(err, "unknown model 'no-such-model'", "bert")


def test_failed_gate_exits_non_zero_and_leaves_nothing(capsys, tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "strict.toml", tiny_bert_dir, min_cosine=1.0, max_abs=0.0)
    build = tmp_path / "build"
    code, _, err = run_cli(capsys, "package", str(recipe), *package_args(tmp_path))
    assert code == 3
    assert_one_line_error(err, "parity gate failed for onnx", "max |Δ|")
    assert list(build.iterdir()) == []
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("damage, message", [
    ("no-tokenizer", "has no tokenizer files"),
    ("corrupt-weights", "cannot load weights from"),
])
def test_bad_model_folder_is_one_line_error(capsys, tmp_path, tiny_bert_dir, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    if damage == "no-tokenizer":
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    else:
        (folder / "model.safetensors").write_bytes(b"this is not a safetensors file")
    build = tmp_path / "build"
    code, _, err = run_cli(capsys, "package", str(folder), *package_args(tmp_path))
    assert code == 1
    assert_one_line_error(err, message, str(folder))
    assert not build.exists() or list(build.iterdir()) == []


def test_unwritable_build_folder_is_one_line_error(capsys, tmp_path, tiny_bert_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "package", str(tiny_bert_dir), "--build-dir", str(blocker / "build"), "--no-smoke")
    assert code == 1
    assert_one_line_error(err, "cannot write to the build folder")


def test_module_entry_point_lists_recipes():
    result = subprocess.run([sys.executable, "-m", "packager", "list"], capture_output=True, text=True, check=True)
    assert "bert" in result.stdout and "embeddings" in result.stdout


def test_help_explains_package_options():
    result = subprocess.run([sys.executable, "-m", "packager", "package", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--task", "--opset", "--batch", "--sequence", "--build-dir", "--levels", "--precision",
                   "--repository", "--version", "--force", "--launcher"):
        assert option in result.stdout


def test_a_recipe_name_that_could_leave_its_folder_is_refused(capsys, tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "evil.toml", tiny_bert_dir)
    recipe.write_text(recipe.read_text().replace('name = "tiny"', 'name = "../evil"'))
    code, _, err = run_cli(capsys, "package", str(recipe), *package_args(tmp_path))
    assert code == 2
    assert_one_line_error(err, "invalid recipe name '../evil'")
    assert not (tmp_path / "evil").exists()


def test_a_failed_live_smoke_publishes_nothing(capsys, tmp_path, tiny_bert_dir, without_native_backend):
    """Only the onnxruntime target, on a local server without the onnxruntime backend: no ensemble can be served."""
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    code, out, err = run_cli(capsys, "package", str(recipe), "--build-dir", str(tmp_path / "build"),
                             "--repository", str(tmp_path / "repo"), "--levels", "plain", "--trt-backend", "none",
                             "--target", "onnxruntime")
    assert code == 3
    assert "not loadable on this server: backend onnxruntime missing" in out
    assert "nothing was published" in out
    assert_one_line_error(err, "live Triton smoke failed")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_the_onnxruntime_target_alone_is_served_natively_and_published(capsys, tmp_path, tiny_bert_dir):
    """With Triton's onnxruntime backend built, the native target passes the live smoke on its own."""
    require_native_backend()
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    code, out, err = run_cli(capsys, "package", str(recipe), "--build-dir", str(tmp_path / "build"),
                             "--repository", str(tmp_path / "repo"), "--levels", "plain", "--trt-backend", "none",
                             "--target", "onnxruntime")
    assert code == 0, err
    assert "not loadable" not in out and "FAIL" not in out
    assert "text → PyTorch" in out and "tiny_onnx joined up to" in out
    assert sorted(path.name for path in (tmp_path / "repo").iterdir()) == ["tiny", "tiny_onnx", "tiny_tokenizer"]


def test_url_launcher_publishes_then_smokes_the_running_server(capsys, tmp_path, tiny_bert_dir):
    from packager.triton.server import serve

    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    repo = tmp_path / "repo"
    repo.mkdir()
    with serve("local", repo, ready_timeout_s=60) as server:
        code, out, _ = run_cli(capsys, "package", str(recipe), "--build-dir", str(tmp_path / "build"),
                               "--repository", str(repo), "--levels", "plain", "--trt-backend", "none",
                               "--target", "python", "--launcher", "url", "--url", server.http_url,
                               "--grpc-url", server.grpc_url)
    assert code == 0, out
    assert out.index("published version 1") < out.index("Live smoke checks")
    assert "text → PyTorch" in out and "FAIL" not in out


def test_an_unexpected_exception_is_one_line_with_its_traceback_in_a_log(capsys, monkeypatch):
    from packager import cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_list", broken)
    code, _, err = run_cli(capsys, "list")
    assert code == 1
    assert_one_line_error(err, "unexpected ZeroDivisionError: division by zero", "traceback in")
    log = err.split("traceback in ")[1].split(";")[0]
    assert "Traceback" in open(log).read()
    with pytest.raises(ZeroDivisionError):
        main(["list", "--debug"])


def test_a_multi_line_error_is_its_first_line_and_a_log(capsys, monkeypatch):
    from packager import cli
    from packager.errors import PackagerError

    def failing(args):
        raise PackagerError("the build failed: parser error\nbuilder errors:\nline 1\nline 2")

    monkeypatch.setattr(cli, "cmd_list", failing)
    code, _, err = run_cli(capsys, "list")
    assert code == 1
    assert_one_line_error(err, "the build failed: parser error (details in")
    assert "line 2" in open(err.split("details in ")[1].rstrip(")\n")).read()


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["package", "no-such-model"], ["package", "--batch"]])
def test_quick_paths_import_no_heavy_library(argv):
    """--help, list, an unknown model and an argument error answer without torch, transformers, ORT or TensorRT."""
    code = (f"import sys\nfrom packager.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt', 'tensorrt_rtx') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_trt_backend_choices_are_the_tensorrt_stages():
    from packager import cli, tensorrt

    assert cli.TRT_BACKENDS == tensorrt.BACKEND_CHOICES


def test_staging_left_by_a_killed_run_is_cleared_by_the_next(capsys, tmp_path, tiny_bert_dir):
    """A SIGKILLed package leaves build/.<name>.<random>; the next run removes it, unless its owner still runs."""
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    build = tmp_path / "build"
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale, live = build / ".tiny.dead1234", build / ".tiny.live5678"
    for folder, owner in ((stale, killed.pid), (live, os.getpid())):
        folder.mkdir(parents=True)
        (folder / ".owner").write_text(str(owner))
    code, _, _ = run_cli(capsys, "package", str(recipe), *package_args(tmp_path, "--levels", "plain"))
    assert code == 0
    assert not stale.exists() and live.exists()


def test_a_corrupt_manifest_is_one_line_at_smoke(capsys, tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_bert_dir)
    assert run_cli(capsys, "package", str(recipe), *package_args(tmp_path, "--levels", "plain"))[0] == 0
    manifest = tmp_path / "repo" / "tiny_python" / "1" / "manifest.json"
    manifest.write_text("{ not json")
    code, _, err = run_cli(capsys, "smoke", str(recipe), "--repository", str(tmp_path / "repo"))
    assert code == 1
    assert_one_line_error(err, str(manifest), "not valid JSON")


def test_ctrl_c_while_the_command_line_loads_is_one_line_and_exit_130():
    """KeyboardInterrupt raised while `python -m packager` imports its command line (as Ctrl-C there would)."""
    code = (
        "import builtins, runpy\n"
        "real_import = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'packager.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "runpy.run_module('packager', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True)
    assert result.returncode == 130
    assert result.stderr.strip() == "error: interrupted"
