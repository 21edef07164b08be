"""The packaging flow, readable in one place:

recipe -> load -> export (ONNX, named axes) -> IO spec -> validate (gate) -> optimize (each level gated)
       -> TensorRT engine -> build folder                                                        [build]
build folder -> render (Jinja -> config.pbtxt, Triton's schema) -> live smoke on a staged copy
       -> publish (new version, atomic, manifest)                                                [release]

`package` is `build` then `release`; `packager publish` is `release` of an existing build folder.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from packager import export, optimize, render, repository, source, tensorrt, validate
from packager.console import say, step, table
from packager.errors import PackagerError, UsageError
from packager.iospec import IOSpec
from packager.recipe import Recipe, Tolerances
from packager.tasks import get_task
from packager.triton import smoke

EXPORTED_FILE, SPEC_FILE, PARITY_FILE, BUILD_FILE = "model.onnx", "iospec.json", "parity.json", "build.json"
SHIPPED_FILE, PLAN_FILE = "model.shipped.onnx", "model.plan"


@dataclass(frozen=True)
class BuildOptions:
    build_root: Path = Path("build")
    device: str | None = None  # cpu | gpu; default: the recipe's [serving] device
    levels: tuple[str, ...] | None = None  # optimization levels to try; default: the recipe's for the device
    tensorrt: dict = field(default_factory=dict)  # read_settings overrides: precision, triton_release, workspace_mib
    trt_backend: str = "auto"  # auto | tensorrt | tensorrt-rtx | none


@dataclass(frozen=True)
class ReleaseOptions:
    repository: Path = Path("model_repository")
    version: int | None = None
    force: bool = False
    targets: tuple[str, ...] | None = None  # default: the recipe's [serving] targets
    launcher: str | None = "local"  # the smoke's server; None skips the smoke
    launcher_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Build:
    """A build folder: the gated graphs, the IO spec, and the record the manifest is made from."""

    recipe: Recipe
    folder: Path
    spec: IOSpec
    record: dict  # build.json: weights hash, parity, optimize and tensorrt records, shipped level

    @property
    def exported_path(self) -> Path:
        return self.folder / EXPORTED_FILE

    @property
    def shipped_path(self) -> Path:
        return self.folder / SHIPPED_FILE

    def level_path(self, level: str) -> Path | None:
        """The graph of an optimization level, when it was built."""
        entry = next((e for e in self.record["optimize"]["levels"] if e["level"] == level), None)
        return self.folder / entry["file"] if entry and entry.get("file") else None

    @property
    def shipped_tolerances(self) -> Tolerances:
        return Tolerances(**self.record["shipped_tolerances"])

    @classmethod
    def read(cls, recipe: Recipe, build_root: Path) -> "Build":
        folder = build_root / recipe.name
        if not (folder / BUILD_FILE).exists():
            raise UsageError(f"no build of '{recipe.name}' in {build_root}: run `packager package {recipe.name}` first")
        return cls(recipe, folder, IOSpec.read(folder / SPEC_FILE), json.loads((folder / BUILD_FILE).read_text()))


@dataclass(frozen=True)
class Release:
    version: int
    models: tuple[str, ...]
    repository: Path
    smoke: smoke.SmokeResult | None


def package(recipe: Recipe, build_options: BuildOptions, release_options: ReleaseOptions) -> tuple[Build, Release]:
    serving_config(recipe, release_options.targets)  # bad release options fail before the build, not after
    built = build(recipe, build_options)
    return built, release(built, release_options)


def build(recipe: Recipe, options: BuildOptions) -> Build:
    """Every stage up to the build folder; it appears in build_root/<name> only when all gates passed."""
    repository.check_name(recipe.name, "recipe name")  # it names the build folder and every model
    task = get_task(recipe.task)
    serving = render.ServingConfig.from_recipe(recipe)
    device = options.device or serving.device
    optimize_config = optimize.parse_config(recipe)
    if options.levels:
        optimize_config = optimize_config.with_levels(device, options.levels)
    trt_settings = tensorrt.read_settings(recipe, **options.tensorrt)
    staging = _staging_dir(options.build_root, recipe.name)
    try:
        with step(f"load {recipe.name} ({recipe.source.describe()})"):
            loaded = source.load(recipe)
            if loaded.max_seq_length and loaded.max_seq_length != recipe.profile.sequence.max:
                say(f"    warning: sentence-transformers truncates at {loaded.max_seq_length} tokens, the profile at "
                    f"{recipe.profile.sequence.max}: long texts will embed differently")
        with step(f"export ONNX (opset {recipe.opset}, dynamic axes batch, sequence)"):
            exported = export.export_onnx(loaded, task, staging / EXPORTED_FILE, recipe.opset)
            exported.spec.write(staging / SPEC_FILE)
        with step("validate the export against PyTorch on real text"):
            batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile)
            reference = validate.torch_runner(exported.wrapper, exported.spec)
            validator = validate.Validator(task, exported.spec, batches, reference, recipe.tolerances)
            exported_report = validate.require(
                validator.check("onnx", validate.onnxruntime_runner(exported.path, exported.spec)))
        with step(f"optimize for {device} (levels {', '.join(optimize_config.levels[device])})"):
            optimized = optimize.optimize(loaded, task, exported, validator, optimize_config, device,
                                          staging / "levels", exported_report)
            optimize.ship(optimized, staging / SHIPPED_FILE)
            say(f"    shipping '{optimized.chosen.name}': {optimized.why}")
        reports = [exported_report] + [level.parity for level in optimized.levels
                                       if level.parity and level.parity is not exported_report]
        with step(f"TensorRT engine ({trt_settings.precision}, {len(trt_settings.profiles)} profiles)"):
            engine, engine_record, engine_report = _engine(exported, trt_settings, validator, recipe, staging, options)
            if engine_report:
                reports.append(engine_report)
        record = {
            "weights_sha256": loaded.weights_sha256,
            "device": device,
            "parity": [report.to_dict() for report in reports],
            "optimize": _optimize_record(optimized, staging),
            "shipped_tolerances": dataclasses.asdict(optimize_config.tolerances[optimized.chosen.name]),
            "tensorrt": engine_record,
        }
        (staging / PARITY_FILE).write_text(json.dumps(record["parity"], indent=2) + "\n")
        (staging / BUILD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        folder = _commit(staging, options.build_root / recipe.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(table(["kind", "name", "dtype", "dims"], exported.spec.rows(), title="\nIO spec"))
    say(parity_table(reports, batches))
    say("\n" + optimized.table())
    if engine.profiles:
        say(table(["profile", "input", "min", "opt", "max"], engine.rows(), title="\nTensorRT optimization profiles"))
    say(f"\nbuild artifacts: {folder}")
    return Build(recipe, folder, exported.spec, record)


def _optimize_record(optimized: optimize.OptimizeResult, staging: Path) -> dict:
    """The optimize stage's record, each level with its graph's path inside the build folder."""
    record = optimized.to_dict()
    for entry, level in zip(record["levels"], optimized.levels):
        entry["file"] = str(level.path.relative_to(staging)) if level.path else None
    return record


def _engine(exported, settings, validator, recipe, staging, options):
    """Build the TensorRT engine; gate a deployable one with the TensorRT runtime. Returns (result, record, report).

    TensorRT parses the plain export (made fp16 by tensorrt.py when asked): the fused levels hold ONNX Runtime
    contrib ops (EmbedLayerNormalization, Attention) that TensorRT's parser does not know.
    """
    engine = tensorrt.build_engine(exported.path, exported.spec, settings, staging / "tensorrt",
                                   cache_dir=options.build_root / ".cache", backend=options.trt_backend)
    say(f"    {engine.message}")
    record = {"status": engine.status, "message": engine.message,
              "facts": engine.facts.to_dict() if engine.facts else None}
    report = None
    if engine.publishable:
        report = validate.require(validator.check(
            "tensorrt", tensorrt.engine_runner(engine.engine_path, exported.spec), settings.gate_tolerances(recipe)))
        shutil.move(engine.engine_path, staging / PLAN_FILE)
        record["plan"] = {
            "file": PLAN_FILE,
            "max_batch_size": settings.max_batch_size,
            "profiles": [{name: [list(s) for s in shape] for name, shape in p.shapes.items()}
                         for p in sorted(engine.profiles, key=lambda p: p.index)],
        }
    elif tensorrt.docker_available():
        command = tensorrt.trtexec_command(exported.path, staging / PLAN_FILE, exported.spec, settings,
                                           options.build_root / ".cache" / "trtexec.timing-cache")
        say(f"    a deployable plan can be built in the release's container: {shlex.join(command)}")
    return engine, record, report


def release(built: Build, options: ReleaseOptions) -> Release:
    """Render the build's Triton models, smoke them on a staged copy, then publish them as a new version."""
    recipe = built.recipe
    serving = serving_config(recipe, options.targets)
    tokenizer = AutoTokenizer.from_pretrained(source.resolve_folder(recipe.source))
    with step("render Triton configs (checked with Triton's ModelConfig schema)"):
        models = render.render_repository(recipe, built.spec, serving, render.Artifacts(
            built.shipped_path, tokenizer, _plan(built)))
        manifest = repository.build_manifest(
            recipe, built.spec, built.record["weights_sha256"], built.record["parity"],
            optimize=built.record["optimize"], tensorrt=built.record["tensorrt"], device=built.record["device"],
            shipped_tolerances=built.record["shipped_tolerances"])
        say("    " + ", ".join(model.name for model in models))
    staged_smoke = options.launcher not in (None, "url")  # a url server serves its own repository
    smoked = _smoke(recipe, built, models, manifest, options) if staged_smoke else None
    with step(f"publish to {options.repository}"):
        published = repository.publish(options.repository, models, manifest, version=options.version,
                                       force=options.force)
    say(f"published version {published.version} of {', '.join(published.paths)} in {options.repository}")
    if options.launcher == "url":
        smoked = _smoke(recipe, built, models, manifest, options, published=options.repository)
    return Release(published.version, tuple(published.paths), options.repository, smoked)


def _smoke(recipe, built, models, manifest, options, published: Path | None = None) -> smoke.SmokeResult:
    """The live smoke: on a staged copy of the release (before publishing), or on the published repository."""
    where = published
    if where is None:
        where = built.folder / "repository"
        shutil.rmtree(where, ignore_errors=True)
        repository.publish(where, models, manifest, version=1)
    with step(f"live smoke on {options.launcher} Triton ({where})"):
        reference = dataclasses.replace(smoke.Reference.for_recipe(recipe, built.spec),
                                        tolerances=built.shipped_tolerances)
        result = smoke.smoke(where, reference, options.launcher, models=[m.name for m in models],
                             **options.launcher_options)
    say("\n" + result.summary() + "\n")
    if not result.passed:
        say("the live smoke failed: " + ("the version above stays published" if published else "nothing was published"))
    return smoke.require(result)


def serving_config(recipe: Recipe, targets: tuple[str, ...] | None) -> render.ServingConfig:
    """The recipe's [serving] section, with the targets chosen on the command line."""
    serving = render.ServingConfig.from_recipe(recipe)
    if not targets:
        return serving
    unknown = [target for target in targets if target not in render.TARGETS]
    if unknown:
        raise UsageError(f"unknown target(s) {', '.join(unknown)}: choose from {', '.join(render.TARGETS)}")
    return dataclasses.replace(serving, targets=tuple(targets))


def shipped_tolerances(repository_root: Path, model: str) -> Tolerances:
    """The gate the published graph of `model` passed (int8 is gated looser than fp32), from its newest manifest."""
    folder = Path(repository_root) / model
    manifest = folder / str(max(repository.versions(folder))) / repository.MANIFEST_FILE
    return Tolerances(**json.loads(manifest.read_text())["shipped_tolerances"])


def _plan(built: Build) -> render.TensorRTPlan | None:
    plan = built.record["tensorrt"].get("plan")
    if not plan:
        return None
    profiles = tuple({name: tuple(tuple(s) for s in shape) for name, shape in p.items()} for p in plan["profiles"])
    return render.TensorRTPlan(built.folder / plan["file"], profiles, plan["max_batch_size"])


def parity_table(reports: list[validate.ParityReport], batches: list[validate.ValidationBatch]) -> str:
    rows = [
        [report.variant, output, s["max_abs"], s["max_rel"], s["metric"], s["metric_value"],
         "pass" if report.passed else "FAIL"]
        for report in reports
        for output, s in report.summary()["outputs"].items()
    ]
    shapes = ", ".join(batch.shape for batch in batches)
    return table(["graph", "output", "max |Δ|", "max rel", "metric", "worst", "gate"], rows,
                 title=f"\nParity against PyTorch (real tokens; batch x sequence {shapes})")


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
