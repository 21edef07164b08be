"""The packaging flow, readable in one place:

recipe -> load -> export (ONNX, named axes) -> IO spec -> validate (gate) -> build folder
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packager import export, source, validate
from packager.console import say, step
from packager.errors import PackagerError
from packager.iospec import IOSpec
from packager.recipe import Recipe
from packager.tasks import get_task
from packager.validate import ParityReport

MODEL_FILE, SPEC_FILE, PARITY_FILE = "model.onnx", "iospec.json", "parity.json"


@dataclass(frozen=True)
class PackageResult:
    recipe: Recipe
    build_dir: Path
    spec: IOSpec
    parity: tuple[ParityReport, ...]

    @property
    def model_path(self) -> Path:
        return self.build_dir / MODEL_FILE


def package(recipe: Recipe, build_root: Path) -> PackageResult:
    """Run every stage for `recipe`; artifacts appear in build_root/<name> only when all stages pass."""
    task = get_task(recipe.task)
    staging = _staging_dir(build_root, recipe.name)
    try:
        with step(f"load {recipe.name} ({recipe.source.describe()})"):
            loaded = source.load(recipe)
            if loaded.max_seq_length and loaded.max_seq_length != recipe.profile.sequence.max:
                say(f"    warning: sentence-transformers truncates at {loaded.max_seq_length} tokens, the profile at "
                    f"{recipe.profile.sequence.max}: long texts will embed differently")
        with step(f"export ONNX (opset {recipe.opset}, dynamic axes batch, sequence)"):
            exported = export.export_onnx(loaded, task, staging / MODEL_FILE, recipe.opset)
            exported.spec.write(staging / SPEC_FILE)
        with step("validate ONNX Runtime against PyTorch on real text"):
            batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
            validator = validate.Validator(
                task, exported.spec, batches, validate.torch_runner(exported.wrapper, exported.spec), recipe.tolerances
            )
            report = validator.check("onnx", validate.onnxruntime_runner(exported.path, exported.spec))
            _write_json(staging / PARITY_FILE, [report.to_dict()])
            validate.require(report)
        build_dir = _commit(staging, build_root / recipe.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackageResult(recipe, build_dir, exported.spec, (report,))


def _staging_dir(build_root: Path, name: str) -> Path:
    try:
        build_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=build_root))
    except OSError as exc:
        raise PackagerError(f"cannot write to the build folder {build_root}: {exc.strerror}") from None


def _commit(staging: Path, final: Path) -> Path:
    """Replace `final` by `staging` (two renames on one filesystem)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
