"""The packaging flow, readable in one place:

recipe -> load -> export (ONNX, named axes) -> IO spec -> validate (gate) -> optimize (each level gated)
       -> TensorRT engine -> build folder                                                        [build]
build folder -> render (Jinja -> config.pbtxt, Triton's schema) -> manifest           [stage_release]
       -> live smoke on a staged copy -> publish (new version, atomic)                          [release]

`package` is `build` then `release`; `packager publish` is `release` of an existing build folder; the bench and
the tests publish through `stage_release` too. The model is loaded once per run and handed along.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packager import export, fleet, optimize, render, repository, source, storage, tensorrt, validate
from packager.console import say, step, table
from packager.cpu import CPU_CLASSES, cpu_class
from packager.errors import PackagerError, UsageError
from packager.iospec import IOSpec
from packager.optimize.fp16 import fp16_graph
from packager.recipe import Recipe
from packager.record import (
    BUILD_FILE, BuildRecord, CpuRecord, EngineRecord, FailedPlan, Gate, Plan, Release, sha256, write_json,
)
from packager.tasks import get_task
from packager.triton import smoke
from packager.triton.reference import Reference

EXPORTED_FILE, SPEC_FILE, SHIPPED_FILE, PLAN_FILE = "model.onnx", "iospec.json", "model.shipped.onnx", "model.plan"
FP16_ENGINE_GRAPH = "tensorrt/model.fp16.onnx"  # the graph fp16 engines are built from (see tensorrt.build_mode)


@dataclass(frozen=True)
class BuildOptions:
    build_root: Path = Path("build")
    trt_backend: str = "auto"  # auto | tensorrt | tensorrt-rtx | none
    strict: bool = False  # refuse, rather than warn, when the installed TensorRT is not the target release's


@dataclass(frozen=True)
class ReleaseOptions:
    repository: Path | str = Path("model_repository")  # a folder, or s3://bucket/prefix
    s3_endpoint: str | None = None  # default: AWS_ENDPOINT_URL, else AWS's own
    switch_wait_s: float | None = None  # between the pin switch's phases (None: fleet.switch_wait)
    servers: tuple[str, ...] = ()  # servers (HTTP host:port) to see loading each phase of a bucket's switch
    version: int | None = None
    force: bool = False
    launcher: str | None = "local"  # the smoke's server; None skips the smoke
    launcher_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BuildFolder:
    """build/<name>: the gated graphs, the IO spec, and the build record the manifests are made from."""

    recipe: Recipe
    folder: Path
    spec: IOSpec
    record: BuildRecord
    loaded: source.LoadedModel | None = field(default=None, compare=False, repr=False)  # when this run loaded it

    @property
    def shipped_path(self) -> Path:
        return self.folder / SHIPPED_FILE

    def level_path(self, level: str) -> Path | None:
        """The graph of an optimization level, when it was built."""
        entry = self.record.optimize.level(level)
        return self.folder / entry.file if entry and entry.file else None

    def plan(self) -> render.TensorRTPlan | None:
        plan = self.record.tensorrt.plan
        return render.TensorRTPlan(self.folder / plan.file, plan.profiles, plan.max_batch_size) if plan else None

    def model(self) -> source.LoadedModel:
        """The loaded model: the one this run loaded, else loaded now."""
        if self.loaded is not None:
            return self.loaded
        with step(f"load {self.recipe.name} ({self.recipe.source.describe()})"):
            return source.load(self.recipe)

    @classmethod
    def read(cls, recipe: Recipe, build_root: Path) -> "BuildFolder":
        folder = build_root / recipe.name
        if not (folder / BUILD_FILE).exists():
            raise UsageError(f"no build of '{recipe.name}' in {build_root}: run `packager package {recipe.name}` first")
        return cls(recipe, folder, IOSpec.read(folder / SPEC_FILE), BuildRecord.read(folder))


@dataclass(frozen=True)
class StagedRelease:
    """The rendered models of a build, in publish order, with what their manifests share and each one's gate."""

    models: list[render.RenderedModel]
    release: Release
    gates: dict[str, Gate | None]

    @property
    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def publish(self, root: Path, version: int | None = None, force: bool = False) -> repository.PublishResult:
        return repository.publish(root, self.models, self.release, self.gates, version=version, force=force)

    def publish_to(self, store: storage.Store, version: int | None = None, force: bool = False,
                   switch_wait_s: float | None = None, servers: tuple[str, ...] = ()) -> int:
        """Publish to a local folder or a bucket (fleet.publish); returns the version."""
        return fleet.publish(store, self.models, self.release, self.gates, version=version, force=force,
                             switch_wait_s=switch_wait_s, servers=servers)


@dataclass(frozen=True)
class Released:
    version: int
    models: tuple[str, ...]
    repository: Path | str
    smoke: smoke.SmokeResult | None


def package(recipe: Recipe, build_options: BuildOptions,
            release_options: ReleaseOptions) -> tuple[BuildFolder, Released]:
    built = build(recipe, build_options)
    return built, release(built, release_options)


def build(recipe: Recipe, options: BuildOptions, loaded: source.LoadedModel | None = None) -> BuildFolder:
    """Every stage up to the build folder; it appears in build_root/<name> only when all gates passed."""
    repository.check_name(recipe.name, "recipe name")  # it names the build folder and every model
    task = get_task(recipe.task)
    device = recipe.serving.device
    checked = tensorrt.preflight(recipe.tensorrt, options.trt_backend, options.strict)  # before any work
    clear_stale_staging(options.build_root)
    staging = _staging_dir(options.build_root, recipe.name)
    try:
        with step(f"load {recipe.name} ({recipe.source.describe()})"):
            loaded = loaded or source.load(recipe)
            if loaded.modules:
                say(f"    sentence embedding: {loaded.modules.describe()}")
            if loaded.max_seq_length and loaded.max_seq_length != recipe.profile.sequence.max:
                say(f"    warning: sentence-transformers truncates at {loaded.max_seq_length} tokens, the profile at "
                    f"{recipe.profile.sequence.max}: long texts will embed differently")
        with step(f"export ONNX (opset {recipe.opset}, dynamic axes batch, sequence)"):
            exported = export.export_onnx(loaded, task, staging / EXPORTED_FILE, recipe.opset)
            exported.spec.write(staging / SPEC_FILE)
        with step("validate the export against PyTorch on real text"):
            batches = validate.make_batches(loaded.tokenizer, exported.spec, recipe.profile, task)
            reference = task.reference(loaded, exported.spec)
            invariance = validate.invariance_layouts(loaded.tokenizer, exported.spec, recipe.profile, task)
            validator = validate.Validator(task, exported.spec, batches, reference, recipe.gates.fp32, invariance)
            exported_report = validate.require_parity(
                validator.check("onnx", validate.onnxruntime_runner(exported.path, exported.spec)))
        with step(f"optimize for {device} (levels {', '.join(recipe.optimize.levels(device))})"):
            optimized = optimize.optimize(loaded, task, exported, validator, recipe, device, staging / "levels",
                                          exported_report)
            shutil.copyfile(optimized.chosen.path, staging / SHIPPED_FILE)
            say(f"    shipping '{optimized.chosen.name}': {optimized.why}")
        reports = [exported_report] + [level.parity for level in optimized.levels
                                       if level.parity and level.parity is not exported_report]
        with step(f"TensorRT engine ({recipe.tensorrt.precision}, {len(recipe.engine_profiles)} profiles)"):
            engine, engine_record, engine_report = _engine(exported, recipe, validator, staging, options, checked)
            if engine_report:
                reports.append(engine_report)
        record = BuildRecord(
            recipe=recipe.name,
            weights_sha256=loaded.weights_sha256,
            parity=tuple(reports),
            optimize=optimized.to_record(staging),
            tensorrt=engine_record,
            graphs={str(path.relative_to(staging)): sha256(path)
                    for path in sorted(staging.rglob("*")) if path.suffix in (".onnx", ".plan")},
            cpu=_cpu_record(optimized.chosen),
            engine_stats=engine.stats,
        )
        record.write(staging)
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
    return BuildFolder(recipe, folder, exported.spec, record, loaded)


def _cpu_record(shipped: optimize.LevelResult) -> CpuRecord:
    here = cpu_class()
    if shipped.valid_for is None:
        return CpuRecord(here, CPU_CLASSES, f"'{shipped.name}' computes the same on every x86 class")
    return CpuRecord(here, shipped.valid_for, f"'{shipped.name}' was gated as {', '.join(shipped.valid_for)} "
                                               "compute it")


def _engine(exported: export.Exported, recipe: Recipe, validator: validate.Validator, staging: Path,
            options: BuildOptions, checked: tensorrt.Preflight,
            ) -> tuple[tensorrt.EngineResult, EngineRecord, validate.ParityReport | None]:
    """Build the TensorRT engine; gate a deployable one with the TensorRT runtime. A plan that fails its runtime gate
    is kept in build/<name>.failed-plan/ with failure.json (the error and the build facts), since the staging folder
    goes; the next plan of <name> that passes removes it.

    TensorRT parses the plain export, or for fp16 its fp16 graph: the fused levels hold ONNX Runtime contrib ops
    (EmbedLayerNormalization, Attention) that TensorRT's parser does not know.
    """
    def engine_graph() -> Path:
        (staging / FP16_ENGINE_GRAPH).parent.mkdir(parents=True, exist_ok=True)
        return fp16_graph(exported.path, staging / FP16_ENGINE_GRAPH)

    engine = tensorrt.build_engine(exported.path, exported.spec, recipe, staging / "tensorrt",
                                   cache_dir=options.build_root / ".cache", fp16_graph=engine_graph, checked=checked)
    say(f"    {engine.message}")
    if engine.status == "deployable":
        gate = Gate(*recipe.gates.for_engine(recipe.tensorrt.precision))
        failed = options.build_root / f"{recipe.name}.failed-plan"
        try:
            runner = tensorrt.engine_runner(engine.engine_path, exported.spec, checked.loaded,
                                            version_compatible=recipe.tensorrt.version_compatible)
            report = validate.require_parity(validator.check("tensorrt", runner, gate.tolerances))
            validate.require_invariant(validator.check_invariance("tensorrt", runner, gate.tolerances))
        except Exception as exc:
            say(f"    the plan that failed its runtime gate is kept in {keep_failed_plan(engine, failed, exc)}")
            raise
        shutil.rmtree(failed, ignore_errors=True)
        shutil.move(engine.engine_path, staging / PLAN_FILE)
        plan = Plan(PLAN_FILE, recipe.engine_max_batch_size, engine.profiles)
        return engine, EngineRecord(engine.status, engine.message, engine.facts, plan, gate), report
    if tensorrt.docker_available():
        final = options.build_root.resolve() / recipe.name  # where the graph is once the build folder is committed
        needs_fp16 = tensorrt.build_mode(recipe.tensorrt, tensorrt.BACKENDS["tensorrt"]).fp16_graph
        graph = final / FP16_ENGINE_GRAPH if needs_fp16 else final / EXPORTED_FILE
        if needs_fp16 and not (staging / FP16_ENGINE_GRAPH).exists():
            engine_graph()
        command = tensorrt.trtexec_command(graph, final / PLAN_FILE, exported.spec, recipe,
                                           options.build_root.resolve() / ".cache" / "trtexec.timing-cache")
        say(f"    a deployable plan can be built in the release's container: {shlex.join(command)}")
    return engine, EngineRecord(engine.status, engine.message, engine.facts), None


def keep_failed_plan(engine: tensorrt.EngineResult, folder: Path, failure: Exception) -> Path:
    """Move the plan into `folder` (replacing an older one) with failure.json: the build facts and the error."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.move(engine.engine_path, folder / PLAN_FILE)
    write_json(folder / "failure.json", FailedPlan(f"{type(failure).__name__}: {failure}", engine.facts))
    return folder


def stage_release(built: BuildFolder, loaded: source.LoadedModel) -> StagedRelease:
    """The build's Triton models rendered (names, types and dims from the IO spec), with their manifests' facts."""
    recipe = built.recipe
    with step("render Triton configs (checked with Triton's ModelConfig schema)"):
        models = render.render_repository(recipe, built.spec, render.Artifacts(
            built.shipped_path, loaded.tokenizer, built.plan(), loaded.modules.prompts if loaded.modules else {},
            loaded.labels))
        say("    " + ", ".join(model.name for model in models))
    gates = {"onnx": built.record.shipped_gate, "plan": built.record.tensorrt.gate}
    return StagedRelease(models, Release.of(recipe.to_data(), recipe.source.describe(), built.spec, built.record),
                         {model.name: gates.get(model.runs) for model in models})


def release(built: BuildFolder, options: ReleaseOptions) -> Released:
    """Render the build's Triton models, smoke them on a staged copy, then publish them as a new version."""
    loaded = built.model()
    staged = stage_release(built, loaded)
    staged_smoke = options.launcher not in (None, "url")  # a url server serves its own repository
    smoked = _smoke(built, staged, loaded, options) if staged_smoke else None
    store = storage.open_store(options.repository, options.s3_endpoint)
    with step(f"publish to {store.url}"):
        version = staged.publish_to(store, version=options.version, force=options.force,
                                    switch_wait_s=options.switch_wait_s, servers=options.servers)
    say(f"published version {version} of {', '.join(staged.names)} in {store.url}")
    if options.launcher == "url":
        with fleet.served_copy(options.repository, store, staged.names) as published:  # the configs it serves
            smoked = _smoke(built, staged, loaded, options, published=published)
    return Released(version, tuple(staged.names), options.repository, smoked)


def _smoke(built: BuildFolder, staged: StagedRelease, loaded: source.LoadedModel, options: ReleaseOptions,
           published: Path | None = None) -> smoke.SmokeResult:
    """The live smoke: on a staged copy of the release (before publishing), or on the published repository."""
    where = published
    if where is None:
        where = built.folder / "repository"
        shutil.rmtree(where, ignore_errors=True)
        staged.publish(where, version=1)
    with step(f"live smoke on {options.launcher} Triton ({where})"):
        reference = Reference.of(built.recipe, built.spec, loaded)
        result = smoke.smoke(where, reference, options.launcher, models=staged.names, **options.launcher_options)
    say("\n" + result.summary() + "\n")
    if not result.passed:
        say("the live smoke failed: " + ("the version above stays published" if published else "nothing was published"))
    return smoke.require(result)


def parity_table(reports: list[validate.ParityReport], batches: list[validate.ValidationBatch]) -> str:
    rows = [
        [report.variant, output, s.max_abs, s.max_rel, s.metric, s.metric_value, "pass" if report.passed else "FAIL"]
        for report in reports
        for output, s in report.outputs().items()
    ]
    shapes = ", ".join(batch.shape for batch in batches)
    return table(["graph", "output", "max |Δ|", "max rel", "metric", "worst", "gate"], rows,
                 title=f"\nParity against PyTorch (real tokens; batch x sequence {shapes})")


def clear_stale_staging(build_root: Path) -> None:
    """Remove staging folders (build/.<name>.<random>) that a killed run left behind, unless one is in use."""
    if not build_root.is_dir():
        return
    for folder in build_root.glob(".*.*"):
        if folder.is_dir() and not _owner_alive(folder / ".owner"):
            shutil.rmtree(folder, ignore_errors=True)


def _owner_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_dir(build_root: Path, name: str) -> Path:
    try:
        build_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=build_root))
    except OSError as exc:
        raise PackagerError(f"cannot write to the build folder {build_root}: {exc.strerror}") from None
    (staging / ".owner").write_text(str(os.getpid()))
    return staging


def _commit(staging: Path, final: Path) -> Path:
    """Replace `final` by `staging` (two renames on one filesystem)."""
    (staging / ".owner").unlink(missing_ok=True)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
