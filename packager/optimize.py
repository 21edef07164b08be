"""Graph optimization levels, each behind the parity gate, and the choice of the one to ship per target device.

Levels (LEVELS): `plain` (the export itself), `fused` (ONNX Runtime's transformer optimizer: Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), `int8` (dynamic quantization of the fused graph, for
CPU) and `fp16` (the fused graph in fp16, for GPU). The shipped level is the first that passes its gate in the
device's known speed order (SPEED_ORDER); the benchmark (packager/bench/) measures the real ratios.

int8 needs more than `quantize_dynamic` to keep the sentence-embedding cosine at 0.99 on real text (per-tensor
activation ranges meet BERT's outlier channels, see ../shared/notes/export-and-speed.md):
1. smoothing: each quantized MatMul/Attention input is divided per channel by s (a Mul node) and the weight rows
   multiplied by s, exact in fp32; s = max|x|^a / max|w|^(1-a), with x measured on CALIBRATION_TEXTS (not the
   validation text) and a chosen per node by the simulated quantization error;
2. if the gate still fails, the MatMuls whose quantization alone hurts most on the validation text get a weight
   residual (a second int8 MatMul on w - dequantized(quantized(w)), added to the first: the weight's int8 error
   is gone at about twice the int8 cost of the node), one more at a time, up to `max_residual_nodes`;
3. if that is not enough, the most sensitive nodes stay fp32 instead (about 4x the int8 cost of the node), one
   more at a time, up to `max_fp32_nodes`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from packager import iospec
from packager.console import say, table
from packager.errors import GateFailed, PackagerError, UsageError, first_line
from packager.export import Exported
from packager.recipe import Recipe, Tolerances
from packager.source import LoadedModel
from packager.tasks import Task
from packager.validate import ParityReport, Validator, onnxruntime_runner, tokenize

DEVICES = ("cpu", "gpu")
# Known speed order per device, fastest first (measured on CPU: int8 ~2x fused, fused ~1.5x plain; see README).
SPEED_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("int8", "fused", "plain"), "gpu": ("fp16", "fused", "plain")}
DEFAULT_LEVELS: dict[str, tuple[str, ...]] = {"cpu": ("plain", "fused", "int8"), "gpu": ("plain", "fused", "fp16")}
# Gates that differ from the recipe's [tolerances]: int8 is gated on the task metric, its max |Δ| only recorded.
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "int8": Tolerances(max_abs=math.inf, min_cosine=0.99, min_argmax_agreement=0.99),
    "fp16": Tolerances(max_abs=2e-2, min_cosine=0.9999, min_argmax_agreement=1.0),
}

# Ops kept in fp32 in an fp16 graph: normalisation, softmax and the reductions/divisions of the pooling, whose
# sums and small denominators (clamp at 1e-9) lose too much in fp16. The fused LayerNorm/Attention contrib ops
# accumulate in fp32 internally and stay fp16.
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Div", "Clip")
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")
# Hugging Face model_type -> ONNX Runtime optimizer model_type; others are tried as "bert" and warned about.
OPTIMIZER_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert"}
INT8_OPS = ("MatMul", "Attention")
# Smoothing statistics come from these texts, never from validate.VALIDATION_TEXTS (which is the gate's data).
CALIBRATION_TEXTS = (
    "The weather is lovely today and we are going for a walk in the park.",
    "Machine learning models are deployed behind an inference server.",
    "She sold her old car and bought a bicycle instead.",
    "How many people live in the largest city of the country?",
    "Please send me the report before the meeting on Monday.",
    "Les enfants jouent dans le jardin.",
    "Der Zug fährt um acht Uhr ab.",
    "Thanks!",
    "ok",
    "",
)
# How much quantizing one node moves the metric output (a ParityReport.summary() entry), per task metric.
SENSITIVITY: dict[str, Callable[[dict], float]] = {
    "cosine": lambda output: 1 - output["metric_value"],
    "argmax": lambda output: output["max_rel"],  # agreement is too coarse to rank nodes
}
SMOOTHING_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---------------------------------------------------------------- configuration (the recipe's [optimize] section)

@dataclass(frozen=True)
class Int8Settings:
    per_channel: bool = True  # per-output-channel weight scales (worst cosine 0.95 vs 0.85 per-tensor on MiniLM)
    smooth: bool = True
    max_residual_nodes: int = 4  # most MatMul nodes the search may give a weight residual (tried first: cheaper)
    max_fp32_nodes: int = 4  # most MatMul/Attention nodes the search may keep in fp32


@dataclass(frozen=True)
class OptimizeConfig:
    levels: dict[str, tuple[str, ...]]  # device -> levels to gate (the levels they are built from are built too)
    tolerances: dict[str, Tolerances]  # level -> gate
    int8: Int8Settings = Int8Settings()
    expect_fused_attention: bool = True

    def with_levels(self, device: str, levels: tuple[str, ...]) -> "OptimizeConfig":
        _check_levels(device, levels, "levels")
        return dataclasses.replace(self, levels={**self.levels, device: tuple(levels)})

    def with_tolerance(self, level: str, **values: float) -> "OptimizeConfig":
        return dataclasses.replace(self, tolerances={**self.tolerances, level: dataclasses.replace(self.tolerances[level], **values)})

    def with_int8(self, **values) -> "OptimizeConfig":
        return dataclasses.replace(self, int8=dataclasses.replace(self.int8, **values))


def parse_config(recipe: Recipe) -> OptimizeConfig:
    """The recipe's [optimize] section with defaults; UsageError naming any bad key, value or level."""
    where = f"recipe {recipe.name} [optimize]"
    section = dict(recipe.section("optimize"))
    level_tables = {name: dict(section.pop(name)) for name in LEVELS if isinstance(section.get(name), dict)}
    levels = {device: _level_list(section.pop(device, DEFAULT_LEVELS[device]), f"{where} {device}") for device in DEVICES}
    for device, names in levels.items():
        _check_levels(device, names, f"{where} {device}")
    expect = _typed(section.pop("expect_fused_attention", True), bool, f"{where} expect_fused_attention")
    if section:
        raise UsageError(f"{where}: unknown keys {sorted(section)}; known: {', '.join(DEVICES + tuple(LEVELS))}, expect_fused_attention")
    tolerances = {name: _level_tolerances(recipe, name, level_tables.get(name, {}), f"{where}.{name}") for name in LEVELS}
    int8_table = level_tables.get("int8", {})
    int8 = Int8Settings(**{key: _typed(int8_table[key], kind, f"{where}.int8 {key}")
                           for key, kind in INT8_SETTING_TYPES.items() if key in int8_table})
    return OptimizeConfig(levels, tolerances, int8, expect)


INT8_SETTING_TYPES = {"per_channel": bool, "smooth": bool, "max_residual_nodes": int, "max_fp32_nodes": int}


def _level_tolerances(recipe: Recipe, name: str, table: dict, where: str) -> Tolerances:
    """DEFAULT_TOLERANCES (else the recipe's [tolerances]) with the level table's tolerance keys."""
    keys = [f.name for f in dataclasses.fields(Tolerances)]
    allowed = keys + (list(INT8_SETTING_TYPES) if name == "int8" else [])
    unknown = set(table) - set(allowed)
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(allowed)}")
    values = {key: float(_typed(table[key], (int, float), f"{where} {key}")) for key in keys if key in table}
    return dataclasses.replace(DEFAULT_TOLERANCES.get(name, recipe.tolerances), **values)


def _typed(value, kind, where: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where}: expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
    return value


def _level_list(value, where: str) -> tuple[str, ...]:
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise UsageError(f"{where}: must be a list of level names, e.g. [\"plain\", \"fused\"]; got {value!r}")
    return tuple(value)


def _check_levels(device: str, names: tuple[str, ...], where: str) -> None:
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}': known devices are {', '.join(DEVICES)}")
    for name in names:
        if name not in LEVELS:
            raise UsageError(f"{where}: unknown level '{name}'; known levels are {', '.join(LEVELS)}")
        if device not in LEVELS[name].devices:
            raise UsageError(f"{where}: level '{name}' is for {', '.join(LEVELS[name].devices)}, not {device}")


def parse_levels_option(text: str) -> tuple[str, ...]:
    """A --levels value: comma-separated level names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise UsageError("--levels needs at least one level, e.g. --levels plain,fused,int8")
    return names


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Built:
    path: Path
    fusions: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    report: ParityReport | None = None  # the gate's report, when building already ran the gate on this graph


@dataclass(frozen=True)
class LevelResult:
    name: str
    path: Path | None  # None only when the build itself failed (reason says why)
    parity: ParityReport | None
    fusions: dict[str, int]
    passed: bool
    reason: str  # why it failed; empty when passed
    shipped: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "level": self.name, "passed": self.passed, "shipped": self.shipped, "reason": self.reason,
            "fusions": self.fusions, "notes": list(self.notes),
            "parity": self.parity.summary() if self.parity else None,
        }


@dataclass(frozen=True)
class OptimizeResult:
    device: str
    levels: tuple[LevelResult, ...]
    chosen: LevelResult
    why: str

    def level(self, name: str) -> LevelResult:
        return next(result for result in self.levels if result.name == name)

    def to_dict(self) -> dict:
        """The manifest's record: device, shipped level and why, and every level's fusions and parity."""
        return {"device": self.device, "shipped": self.chosen.name, "why": self.why,
                "levels": [result.to_dict() for result in self.levels]}

    def table(self) -> str:
        """Every level side by side: gate, worst differences per output, the task metric, fusions."""
        outputs = self._output_names()
        rows = []
        for result in self.levels:
            summary = result.parity.summary()["outputs"] if result.parity else {}
            metric = next((s for s in summary.values() if s["metric_value"] is not None), None)
            rows.append([
                result.name, "yes" if result.passed else "no", "<-" if result.shipped else "",
                *(summary[name]["max_abs"] if name in summary else None for name in outputs),
                metric["metric_value"] if metric else None,
                ", ".join(f"{op} {count}" for op, count in result.fusions.items() if count),
                result.reason,
            ])
        headers = ["level", "passed", "shipped", *(f"max|Δ| {name}" for name in outputs), "metric (worst)", "fusions", "reason"]
        return table(headers, rows, title=f"optimization levels for {self.device}")

    def _output_names(self) -> list[str]:
        reports = [result.parity for result in self.levels if result.parity]
        return list(dict.fromkeys(row.output for report in reports for row in report.rows))


# ---------------------------------------------------------------- the stage

@dataclass
class BuildContext:
    loaded: LoadedModel
    task: Task
    exported: Exported
    validator: Validator
    config: OptimizeConfig
    work_dir: Path
    exported_report: ParityReport | None = None  # the export's own gate, reused by the plain level
    built: dict[str, Built] = field(default_factory=dict)

    def output(self, level: str) -> Path:
        return self.work_dir / f"model.{level}.onnx"


@dataclass(frozen=True)
class Level:
    name: str
    base: str | None  # the level whose graph this one transforms (built first)
    devices: tuple[str, ...]
    build: Callable[[BuildContext], Built]


def optimize(
    loaded: LoadedModel, task: Task, exported: Exported, validator: Validator, config: OptimizeConfig,
    device: str, work_dir: Path, exported_report: ParityReport | None = None,
) -> OptimizeResult:
    """Build and gate the device's levels; choose the fastest that passed. GateFailed when none did.

    `exported_report` is the export's gate, when it ran already: the plain level reuses it.
    """
    _check_levels(device, config.levels[device], "levels")
    work_dir.mkdir(parents=True, exist_ok=True)
    context = BuildContext(loaded, task, exported, validator, config, work_dir, exported_report)
    results = [_build_and_gate(context, name) for name in config.levels[device]]
    passing = [result for result in results if result.passed]
    if not passing:
        raise GateFailed("no optimization level passed its gate: " + "; ".join(f"{r.name}: {r.reason}" for r in results))
    chosen = min(passing, key=lambda result: SPEED_ORDER[device].index(result.name))
    failed_faster = [r for r in results if not r.passed and SPEED_ORDER[device].index(r.name) < SPEED_ORDER[device].index(chosen.name)]
    why = f"fastest level that passed its gate for {device} (known order {' > '.join(SPEED_ORDER[device])})"
    if failed_faster:
        why += "; " + "; ".join(f"{r.name} failed: {r.reason}" for r in failed_faster)
    results = [dataclasses.replace(r, shipped=r is chosen) for r in results]
    return OptimizeResult(device, tuple(results), next(r for r in results if r.shipped), why)


def ship(result: OptimizeResult, destination: Path) -> Path:
    """Copy the chosen graph to `destination` (e.g. the build folder's model.onnx)."""
    if result.chosen.path != destination:
        shutil.copyfile(result.chosen.path, destination)
    return destination


def _build_and_gate(context: BuildContext, name: str) -> LevelResult:
    try:
        built = _build(context, name)
    except PackagerError as exc:
        return LevelResult(name, None, None, {}, False, f"build failed: {first_line(exc)}")
    spec = iospec.from_onnx(built.path)
    if spec != context.exported.spec:
        return LevelResult(name, built.path, None, built.fusions, False, "its inputs/outputs differ from the export's IO spec", notes=built.notes)
    report = built.report or context.validator.check(name, onnxruntime_runner(built.path, spec), context.config.tolerances[name])
    reason = "" if report.passed else _worst_reason(report)
    return LevelResult(name, built.path, report, built.fusions, report.passed, reason, notes=built.notes)


def _build(context: BuildContext, name: str) -> Built:
    """Build `name`, and first the level it is built from (built, not gated, when it was not asked for)."""
    if name not in context.built:
        base = LEVELS[name].base
        if base:
            _build(context, base)
        context.built[name] = LEVELS[name].build(context)
    return context.built[name]


def _worst_reason(report: ParityReport) -> str:
    worst = report.worst()
    return f"'{worst.output}' at {worst.shape}: {worst.reason}"


# ---------------------------------------------------------------- plain and fused

def _build_plain(context: BuildContext) -> Built:
    return Built(context.exported.path, report=context.exported_report)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the optimizer's and quantizer's info logging and warnings (their results are reported instead)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _build_fused(context: BuildContext) -> Built:
    from onnxruntime.transformers.optimizer import optimize_model

    model_config = context.loaded.model.config
    model_type = getattr(model_config, "model_type", "")
    try:
        with _quiet():
            optimized = optimize_model(
                str(context.exported.path), model_type=OPTIMIZER_MODEL_TYPES.get(model_type, "bert"),
                num_heads=getattr(model_config, "num_attention_heads", 0), hidden_size=getattr(model_config, "hidden_size", 0),
                opt_level=0,
            )
    except Exception as exc:
        raise PackagerError(f"ONNX Runtime's transformer optimizer failed: {first_line(exc)}") from None
    fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    path = context.output("fused")
    optimized.save_model_to_file(str(path))
    notes = ()
    if context.config.expect_fused_attention and not any(fusions.get(op) for op in FUSED_ATTENTION_OPS):
        cause = attention_not_fused_cause(context.loaded)
        say(f"    warning: attention did not fuse: {cause}")
        notes = (f"attention did not fuse: {cause}",)
    return Built(path, fusions, notes)


def attention_not_fused_cause(loaded: LoadedModel) -> str:
    """The likeliest reason the optimizer found no attention pattern, from what is known about the export."""
    config = loaded.model.config
    implementation = getattr(config, "_attn_implementation", "eager")
    if implementation != "eager":
        return (f"the model was exported with attn_implementation='{implementation}', whose graph the optimizer does "
                "not match; load it with attn_implementation='eager'")
    model_type = getattr(config, "model_type", "?")
    if model_type not in OPTIMIZER_MODEL_TYPES:
        return f"model_type '{model_type}' is not a BERT-like encoder the optimizer's 'bert' fusions know"
    return (f"the exported attention subgraph does not match the optimizer's patterns (num_heads="
            f"{getattr(config, 'num_attention_heads', '?')}, hidden_size={getattr(config, 'hidden_size', '?')})")


# ---------------------------------------------------------------- fp16

def fp16_graph(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of `src` to `dst`: fp16 weights and compute, inputs and outputs in their original types,
    FP16_KEEP_FP32_OPS in fp32. Works on the plain export (for TensorRT) and on the fused graph (ORT contrib ops)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    try:
        with _quiet():
            model.convert_float_to_float16(
                keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
            )
    except Exception as exc:
        raise PackagerError(f"fp16 conversion of {src.name} failed: {first_line(exc)}") from None
    model.topological_sort()  # the converter appends its Cast nodes at the end; parsers need graph order
    onnx.save(model.model, str(dst))
    return dst


def _build_fp16(context: BuildContext) -> Built:
    base = context.built["fused"]
    return Built(fp16_graph(base.path, context.output("fp16")), base.fusions)


# ---------------------------------------------------------------- int8

def _build_int8(context: BuildContext) -> Built:
    settings = context.config.int8
    source = context.built["fused"]
    model = onnx.load(str(source.path))
    notes = []
    if settings.smooth:
        smoothed = smooth_model(model, _capture_inputs(model, _int8_nodes(model), _calibration_inputs(context)))
        notes.append(f"smoothed {smoothed} MatMul/Attention inputs (per-channel scales from {len(CALIBRATION_TEXTS)} calibration texts)")
    path = quantize_int8(model, context.output("int8"), settings.per_channel)
    report = _gate_int8(context, path)
    if not report.passed:
        remedy, chosen, report = _search_remedies(context, model, path, report)
        done = REMEDIES[remedy].done.format(count=len(chosen))
        notes.append(f"{done}: {', '.join(chosen)}" if report.passed else f"failed the gate with up to {done}")
    return Built(path, source.fusions, tuple(notes), report)


def _gate_int8(context: BuildContext, path: Path) -> ParityReport:
    return context.validator.check("int8", onnxruntime_runner(path, context.exported.spec), context.config.tolerances["int8"])


def quantize_int8(model: onnx.ModelProto, path: Path, per_channel: bool, exclude: list[str] | None = None,
                  only: list[str] | None = None) -> Path:
    """Dynamic int8 quantization (uint8 activations, int8 weights) of `model`'s MatMul/Attention nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet():
            quantize_dynamic(
                model, path, op_types_to_quantize=list(INT8_OPS), per_channel=per_channel, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude or [], nodes_to_quantize=only or [],
                # the fused graph's contrib-op outputs have no inferred types; they are all float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except Exception as exc:
        raise PackagerError(f"int8 quantization failed: {first_line(exc)}") from None
    return path


def _search_remedies(
    context: BuildContext, model: onnx.ModelProto, path: Path, report: ParityReport
) -> tuple[str, list[str], ParityReport]:
    """Apply each remedy (REMEDIES, cheapest first) to the most sensitive nodes, one more at a time up to its
    limit, until the gate passes. Returns the remedy, the nodes it was applied to and the last gate report.

    A node's sensitivity is how far the task metric output moves (SENSITIVITY) when only that node is quantized,
    on the validation batch at the profile's opt shape.
    """
    settings = context.config.int8
    chosen: list[str] = []
    remedies = [name for name, remedy in REMEDIES.items() if getattr(settings, remedy.limit)]
    if not remedies:
        return "fp32", chosen, report
    order = _sensitivity_order(context, model)
    for name in remedies:
        remedy = REMEDIES[name]
        candidates = [node for node in order if remedy.applies(model, node)][: getattr(settings, remedy.limit)]
        for count in range(1, len(candidates) + 1):
            chosen = candidates[:count]
            report = _gate_int8(context, remedy.build(model, path, settings.per_channel, chosen))
            if report.passed:
                return name, chosen, report
    return name, chosen, report


def _sensitivity_order(context: BuildContext, model: onnx.ModelProto) -> list[str]:
    """The int8 nodes, most sensitive first (see _search_remedies)."""
    probe = _opt_shape_validator(context.validator)
    scratch = context.work_dir / "int8-probe.onnx"
    sensitivity = {}
    for node in _int8_nodes(model):
        quantize_int8(model, scratch, context.config.int8.per_channel, only=[node])
        moved = probe.check("int8-probe", onnxruntime_runner(scratch, context.exported.spec)).summary()["outputs"]
        sensitivity[node] = SENSITIVITY[context.task.metric](moved[context.task.metric_output])
    scratch.unlink(missing_ok=True)
    return sorted(sensitivity, key=sensitivity.get, reverse=True)


def _with_weight_residuals(model: onnx.ModelProto, path: Path, per_channel: bool, nodes: list[str]) -> Path:
    """Quantize a copy of `model` in which each of `nodes` (MatMuls) has a weight residual (see add_weight_residuals)."""
    refined = onnx.ModelProto()
    refined.CopyFrom(model)
    add_weight_residuals(refined, nodes, per_channel)
    return quantize_int8(refined, path, per_channel)


def _with_fp32_nodes(model: onnx.ModelProto, path: Path, per_channel: bool, nodes: list[str]) -> Path:
    return quantize_int8(model, path, per_channel, exclude=nodes)


def add_weight_residuals(model: onnx.ModelProto, nodes: list[str], per_channel: bool) -> None:
    """In place: split each MatMul x @ w in `nodes` into x @ (w - r) + x @ r, r = w - dequantized(int8(w)).

    Exact in fp32. The int8 weight scales are the quantizer's (symmetric, max|w| / 127 per output column, or per
    tensor), so w - r quantizes without error and the sum of both int8 products carries the weight's quantization
    error only to the second order.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    nodes_out = []
    for node in model.graph.node:
        nodes_out.append(node)
        if node.name not in nodes:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        residual = int8_weight_residual(weight, per_channel)
        residual_name, partial, output = f"{node.name}_weight_residual", f"{node.name}_main", node.output[0]
        # w - r is int8(w) dequantized: it quantizes to the same int8 weight, and the sum stays exact in fp32
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight - residual, node.input[1]))
        model.graph.initializer.append(numpy_helper.from_array(residual, residual_name))
        node.output[0] = partial
        nodes_out += [
            helper.make_node("MatMul", [node.input[0], residual_name], [f"{residual_name}_product"], name=f"{residual_name}_MatMul"),
            helper.make_node("Add", [partial, f"{residual_name}_product"], [output], name=f"{residual_name}_Add"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes_out)


def int8_weight_residual(weight: np.ndarray, per_channel: bool) -> np.ndarray:
    """w - dequantized(symmetric int8 w), per output column (the last axis) or per tensor."""
    peak = np.abs(weight).max(axis=0, keepdims=True) if per_channel else np.abs(weight).max()
    step = np.maximum(peak, 1e-12) / 127
    return (weight - np.round(weight / step) * step).astype(np.float32)


def _is_matmul(model: onnx.ModelProto, name: str) -> bool:
    return next(node.op_type for node in model.graph.node if node.name == name) == "MatMul"


@dataclass(frozen=True)
class Remedy:
    limit: str  # the Int8Settings field with the most nodes it may be applied to
    applies: Callable[[onnx.ModelProto, str], bool]
    build: Callable[[onnx.ModelProto, Path, bool, list[str]], Path]
    done: str  # how the note says it was applied to {count} nodes


# Cheapest first (measured on MiniLM, 8x128: a weight residual costs about one more int8 MatMul, fp32 about four).
REMEDIES: dict[str, Remedy] = {
    "residual": Remedy("max_residual_nodes", _is_matmul, _with_weight_residuals,
                       "{count} most sensitive node(s) given a weight residual"),
    "fp32": Remedy("max_fp32_nodes", lambda _model, _node: True, _with_fp32_nodes, "{count} most sensitive node(s) kept in fp32"),
}


def _opt_shape_validator(validator: Validator) -> Validator:
    """The validator restricted to its batch at the profile's opt shape (the middle sizes), its reference reused."""
    batch, sequence = (_middle({getattr(b, axis) for b in validator.batches}) for axis in ("batch", "sequence"))
    index = next(i for i, b in enumerate(validator.batches) if (b.batch, b.sequence) == (batch, sequence))
    reference = validator.references[index]
    return Validator(validator.task, validator.spec, [validator.batches[index]], lambda _inputs: reference, validator.tolerances)


def _middle(values: set[int]) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _int8_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMul/Attention nodes with a constant weight: what dynamic quantization turns into int8."""
    initializers = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type in INT8_OPS and node.input[1] in initializers]


def _calibration_inputs(context: BuildContext) -> dict[str, np.ndarray]:
    """CALIBRATION_TEXTS tokenized at the profile's opt sequence length (padded, as served batches are)."""
    sequence = _middle({batch.sequence for batch in context.validator.batches})
    return tokenize(context.loaded.tokenizer, context.exported.spec, list(CALIBRATION_TEXTS), sequence)


def _capture_inputs(model: onnx.ModelProto, nodes: list[str], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` on `inputs` and return each named node's activation input, flattened to (rows, channels)."""
    import onnxruntime as ort

    by_name = {node.name: node for node in model.graph.node}
    tensors = list(dict.fromkeys(by_name[name].input[0] for name in nodes))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(tensors, inputs)
    activations = {name: value.reshape(-1, value.shape[-1]) for name, value in zip(tensors, values)}
    return {name: activations[by_name[name].input[0]] for name in nodes}


def smooth_model(model: onnx.ModelProto, activations: dict[str, np.ndarray]) -> int:
    """Move activation outliers into the weights of each node in `activations`, in place; returns the count.

    x @ w == (x / s) @ (s[:, None] * w): a Mul by 1/s is inserted before the node and w's rows are scaled by s.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name in activations:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            scale = smoothing_scale(activations[node.name], weight)
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), node.input[1]))
            inverse = f"{node.name}_smooth_inverse_scale"
            model.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
            smoothed = f"{node.name}_smoothed_input"
            nodes.append(helper.make_node("Mul", [node.input[0], inverse], [smoothed], name=f"{node.name}_smooth"))
            node.input[0] = smoothed
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(activations)


def smoothing_scale(activation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per input channel s = max|x|^a / max|w|^(1-a), with a minimising the simulated int8 error of x @ w.

    Channel maxima are floored at their median so that a channel quiet in calibration cannot get a huge 1/s.
    """
    x_max = np.abs(activation).max(axis=0)
    w_max = np.abs(weight).max(axis=1)
    x_max = np.maximum(x_max, np.median(x_max))
    w_max = np.maximum(w_max, np.median(w_max))
    candidates = [x_max**alpha / w_max ** (1 - alpha) for alpha in SMOOTHING_ALPHAS]
    reference = activation @ weight
    errors = [_int8_error(activation / s, weight * s[:, None], reference) for s in candidates]
    return candidates[int(np.argmin(errors))].astype(np.float32)


def _int8_error(activation: np.ndarray, weight: np.ndarray, reference: np.ndarray) -> float:
    """Relative error of x @ w with x per-tensor asymmetric uint8 and w per-column symmetric int8, as ORT does."""
    low, high = min(float(activation.min()), 0.0), max(float(activation.max()), 0.0)
    step = max(high - low, 1e-12) / 255
    zero = np.round(-low / step)
    x = (np.clip(np.round(activation / step) + zero, 0, 255) - zero) * step
    w_step = np.maximum(np.abs(weight).max(axis=0, keepdims=True), 1e-12) / 127
    w = np.round(weight / w_step) * w_step
    return float(np.linalg.norm(x @ w - reference) / max(np.linalg.norm(reference), 1e-12))


LEVELS: dict[str, Level] = {
    "plain": Level("plain", None, DEVICES, _build_plain),
    "fused": Level("fused", "plain", DEVICES, _build_fused),
    "int8": Level("int8", "fused", ("cpu",), _build_int8),
    "fp16": Level("fp16", "fused", ("gpu",), _build_fp16),
}
