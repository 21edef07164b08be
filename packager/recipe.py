"""Model recipes: small declarative TOML files that say what to package and how to check it.

This module is the ONE schema of a recipe: every section is a typed dataclass, and `parse_recipe` checks the whole
file (unknown keys with a suggestion, wrong types, values out of range, sections that contradict each other) before
any work starts, through packager.schema. Stages read their section from the parsed `Recipe`; none parses TOML.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from packager.errors import UsageError
from packager.releases import TRITON_RELEASES
from packager.schema import merge, parse_table, read_toml, to_data

RECIPE_DIR = resources.files("packager") / "recipes"

DEVICES = ("cpu", "gpu")
# Optimization level -> the devices it is built for (packager.optimize implements each).
LEVEL_DEVICES: dict[str, tuple[str, ...]] = {
    "plain": DEVICES, "fused": DEVICES, "int8": ("cpu",), "fp16": ("gpu",),
}
TASK_NAMES = (  # packager.tasks implements each
    "embeddings", "sequence-classification", "token-classification", "question-answering", "text-pair-classification",
)
PAIR_TASKS = ("question-answering", "text-pair-classification")  # tasks whose ensemble takes two texts
# Serving targets (packager.render renders each): a model plus its ensemble.
TARGETS = ("onnxruntime", "python", "tensorrt")
PRECISIONS = ("fp32", "fp16")  # TensorRT engine precisions


# The gate (a key of Gates) of each optimization level and engine precision.
LEVEL_GATES = {"export": "fp32", "plain": "fp32", "fused": "fp32", "int8": "int8", "fp16": "fp16"}
ENGINE_GATES = {"fp32": "fp32", "fp16": "fp16"}


def _check(condition: bool, message: str) -> None:
    """In a section's __post_init__: a bad value (the parser adds where it is)."""
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class Range:
    """A min / opt / max triple, as TensorRT optimization profiles and the validation grid use it."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        _check(1 <= self.min <= self.opt <= self.max,
               f"must satisfy 1 <= min <= opt <= max; got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def from_toml(cls, what: str, value: object) -> "Range":
        """From [min, opt, max] or "min,opt,max"; UsageError naming `what` otherwise."""
        if isinstance(value, str):
            parts = value.replace(",", " ").split()
            value = [int(v) for v in parts] if all(v.isdigit() for v in parts) else value
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise UsageError(f"{what} must be three integers min, opt, max; got {value!r}")
        try:
            return cls(*value)
        except ValueError as exc:
            raise UsageError(f"{what} {exc}") from None

    def values(self) -> tuple[int, ...]:
        """The distinct sizes, smallest first."""
        return tuple(sorted({self.min, self.opt, self.max}))

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max

    def to_data(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """The shapes the model serves: batch and sequence min/opt/max (the sequence max is the truncation length)."""

    batch: Range
    sequence: Range


DEFAULT_BATCH, DEFAULT_SEQUENCE = Range(1, 8, 32), Range(2, 128, 256)
PAIR_SEQUENCE_MIN = 16  # the shortest padded length of a pair task's folder: a question is never truncated


@dataclass(frozen=True)
class Source:
    """Where weights and tokenizer come from: exactly one of an embedded package, a local folder or a hub id."""

    package: str = ""
    path: str = ""
    hub: str = ""
    allow_pickled_weights: bool = False  # *.bin / *.pt weights run code when unpickled: refused unless true

    def __post_init__(self):
        given = [name for name in ("package", "path", "hub") if getattr(self, name)]
        _check(len(given) == 1, f"needs exactly one of package, path, hub; got {given or 'none'}")

    def describe(self) -> str:
        """Where it comes from, for people: 'package X', 'folder X' or 'hub X'."""
        if self.package:
            return f"package {self.package}"
        if self.path:
            return f"folder {self.path}"
        return f"hub {self.hub}"


@dataclass(frozen=True)
class Export:
    opset: int = 17

    def __post_init__(self):
        _check(11 <= self.opset <= 23, f"opset must be between 11 and 23; got {self.opset}")


@dataclass(frozen=True)
class Tolerances:
    """One gate: how far a candidate may be from PyTorch, and from itself when its batch mates change."""

    max_abs: float = 1e-4  # largest |candidate - torch| over real (non-padded) positions
    min_cosine: float = 0.9999  # worst cosine of the metric output (embeddings)
    min_argmax_agreement: float = 1.0  # share of equal argmax (classifiers)
    max_invariance: float = 1e-5  # largest |alone - inside a batch| over real positions, per text

    def __post_init__(self):
        _check(self.max_abs >= 0 and self.max_invariance >= 0, "max_abs and max_invariance must be >= 0")
        _check(-1 <= self.min_cosine <= 1, f"min_cosine must be within -1..1; got {self.min_cosine}")
        _check(0 <= self.min_argmax_agreement <= 1,
               f"min_argmax_agreement must be within 0..1; got {self.min_argmax_agreement}")


@dataclass(frozen=True)
class Gates:
    """The one table of gates: each optimization level and engine precision is checked against one of these
    (LEVEL_GATES, ENGINE_GATES), and the manifest names the gate every published graph passed."""

    fp32: Tolerances = Tolerances()  # the export, plain and fused graphs, fp32 engines
    int8: Tolerances = Tolerances(max_abs=math.inf, min_cosine=0.995, min_argmax_agreement=0.99, max_invariance=1e-4)
    fp16: Tolerances = Tolerances(max_abs=2e-2, min_cosine=0.9999, min_argmax_agreement=1.0, max_invariance=1e-3)

    def for_level(self, level: str) -> tuple[str, Tolerances]:
        name = LEVEL_GATES[level]
        return name, getattr(self, name)

    def for_engine(self, precision: str) -> tuple[str, Tolerances]:
        name = ENGINE_GATES[precision]
        return name, getattr(self, name)


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """Session options Triton's onnxruntime backend reads from a config; the portable model reads the same."""

    intra_op_thread_count: int = 0  # 0: ONNX Runtime's default (one per core)
    inter_op_thread_count: int = 0
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization_level: Literal["all", "extended", "basic", "disabled"] = "all"

    def __post_init__(self):
        _check(self.intra_op_thread_count >= 0 and self.inter_op_thread_count >= 0, "thread counts must be >= 0")


@dataclass(frozen=True)
class Serving:
    """The [serving] section: which models are published and how Triton runs them."""

    targets: tuple[Literal["onnxruntime", "python", "tensorrt"], ...] = ("onnxruntime", "python")
    text_input: str = "text"  # the ensembles' public input
    device: Literal["cpu", "gpu"] = "cpu"  # what the graph is optimized for; instance kind of <name>_onnx
    instances: int = 1
    tokenizer_instances: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()  # empty: the profile's opt and max batch
    max_queue_delay_us: int = 1000
    tensorrt_accelerator: bool = False  # GPU only: ONNX Runtime's TensorRT execution provider
    tensorrt_precision: Literal["FP32", "FP16"] = "FP16"
    # "buckets": the served tokenizer pads each request up to a length bucket, so that requests of similar length
    # share a shape and a backend that batches equal shapes only (Triton's onnxruntime) can join them. "longest"
    # (the default) pads to the request's longest text: on MiniLM on a 2-core CPU it served mixed-length traffic
    # 1.2x faster than buckets, whose padding cost more than the joins saved (README, "Length buckets").
    pad_to: Literal["buckets", "longest"] = "longest"
    length_buckets: tuple[int, ...] = ()  # with buckets; empty: powers of two from 16 below the profile's max, the max
    onnxruntime: OnnxRuntimeOptions = OnnxRuntimeOptions()
    # token-classification: also the ensemble <name>_entities, text -> entity spans with character offsets, grouped
    # as transformers' pipeline("token-classification", aggregation_strategy="simple") groups them
    entities: bool = False

    def __post_init__(self):
        _check(bool(self.targets), "targets must name at least one target")
        _check(len(set(self.targets)) == len(self.targets), f"targets repeats a target: {list(self.targets)}")
        _check(bool(self.text_input), "text_input must not be empty")
        _check(self.instances >= 1 and self.tokenizer_instances >= 1, "instance counts must be >= 1")
        _check(all(size >= 1 for size in self.preferred_batch_sizes), "preferred_batch_sizes must be >= 1")
        _check(self.max_queue_delay_us >= 0, "max_queue_delay_us must be >= 0")
        _check(not self.tensorrt_accelerator or self.device == "gpu", "tensorrt_accelerator needs device = \"gpu\"")

    def batch_sizes(self, profile: Profile) -> tuple[int, ...]:
        return self.preferred_batch_sizes or tuple(sorted({profile.batch.opt, profile.batch.max}))

    def buckets(self, profile: Profile) -> tuple[int, ...]:
        """The lengths a served request is padded up to (empty: to its longest text); the last is the max."""
        sequence = profile.sequence
        if self.pad_to == "longest":
            return ()
        if self.length_buckets:
            return tuple(sorted(set(self.length_buckets) | {sequence.max}))
        sizes = [2**power for power in range(4, sequence.max.bit_length()) if sequence.min <= 2**power < sequence.max]
        return (*sizes, sequence.max)


def padded_length(longest: int, minimum: int, buckets: tuple[int, ...]) -> int:
    """The length a served request is padded to: its longest text, at least `minimum`, rounded up to a bucket."""
    length = max(longest, minimum)
    return next((bucket for bucket in buckets if bucket >= length), length)


@dataclass(frozen=True)
class Int8Settings:
    """Static int8 (packager.optimize.int8): calibrated constant activation scales, per-column weights."""

    weight_bits: Literal[7, 8] = 7  # 7: codes in [-64, 64], no u8s8 saturation, the same on every x86 class
    smooth: bool = True  # move activation outliers into the weights (chosen per node)
    max_outlier_channels: int = 8  # per MatMul: activation channels computed in fp32 instead (0, 1, 2, 4 or 8)
    ffn_residuals: bool = True  # the feed-forward MatMuls get a second int8 product on their weight residual
    max_residual_nodes: int = 6  # when the gate fails: more MatMuls get a residual, most sensitive first
    max_fp32_nodes: int = 4  # then the most sensitive MatMul/Attention nodes stay fp32, one more at a time

    def __post_init__(self):
        _check(min(self.max_outlier_channels, self.max_residual_nodes, self.max_fp32_nodes) >= 0,
               "max_outlier_channels, max_residual_nodes and max_fp32_nodes must be >= 0")


@dataclass(frozen=True)
class Optimize:
    """The [optimize] section: the levels tried per device (the fastest that passes its gate ships)."""

    cpu: tuple[str, ...] = ("plain", "fused", "int8")
    gpu: tuple[str, ...] = ("plain", "fused", "fp16")
    expect_fused_attention: bool = True  # warn, naming the cause, when the optimizer fuses no attention
    int8: Int8Settings = Int8Settings()

    def __post_init__(self):
        for device in DEVICES:
            check_levels(device, getattr(self, device))

    def levels(self, device: str) -> tuple[str, ...]:
        return getattr(self, device)


def check_levels(device: str, levels: tuple[str, ...]) -> None:
    _check(bool(levels), f"{device}: name at least one level")
    for level in levels:
        known = ", ".join(LEVEL_DEVICES)
        _check(level in LEVEL_DEVICES, f"{device}: unknown level '{level}'; known levels are {known}")
        _check(device in LEVEL_DEVICES[level],
               f"{device}: level '{level}' is for {', '.join(LEVEL_DEVICES[level])}, not {device}")


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimization profile: a batch and a sequence range inside the recipe's profile (each
    defaults to the recipe's)."""

    name: str
    batch: Range | None = None
    sequence: Range | None = None

    def contains(self, batch: int, sequence: int) -> bool:
        return self.batch.contains(batch) and self.sequence.contains(sequence)


@dataclass(frozen=True)
class TensorRT:
    """The [tensorrt] section: the engine for Triton's tensorrt_plan backend."""

    precision: Literal["fp32", "fp16"] = "fp32"
    fp16_method: Literal["graph", "flag"] = "graph"  # an fp16 ONNX graph (strongly typed), or BuilderFlag.FP16
    workspace_mib: int = 1024
    triton_release: str = "24.10"
    profiles: tuple[EngineProfile, ...] = ()  # empty: one profile equal to the recipe's
    version_compatible: bool = False  # BuilderFlag.VERSION_COMPATIBLE: later TensorRT 10 runtimes load the plan
    hardware_compatibility_level: Literal["none", "ampere+"] = "none"  # ampere+: any GPU of compute capability >= 8.0

    def __post_init__(self):
        _check(self.workspace_mib > 0, f"workspace_mib must be a positive integer; got {self.workspace_mib}")
        _check(self.triton_release in TRITON_RELEASES,
               f"unknown Triton release '{self.triton_release}'; known: {', '.join(TRITON_RELEASES)}")
        names = [profile.name for profile in self.profiles]
        _check(len(set(names)) == len(names), f"profile names must be unique; got {names}")


@dataclass(frozen=True)
class Deploy:
    """The [deploy] section: what each Triton server of a Kubernetes fleet gets (packager.manifests renders it).

    The defaults fit the embedded MiniLM on CPU: its five models served idle in 1.1 GiB (server and python stubs,
    scripts/fleet_check.py), so 2 GiB leaves room for batches.
    """

    replicas: int = 2  # Deployment replicas; the InferenceService's minReplicas
    max_replicas: int = 4  # the InferenceService's autoscaling ceiling
    cpu: float = 2.0  # cores requested and limited, in steps of 0.001 (rendered as millicores when fractional)
    memory_mib: int = 2048  # memory requested and limited
    shm_mib: int = 1024  # /dev/shm (a memory-backed emptyDir): the python backend passes tensors through it
    gpus: int = 0  # nvidia.com/gpu per server
    model_control: Literal["poll", "explicit"] = "poll"  # poll: new pins load by themselves; explicit: all at start
    poll_seconds: int = 15  # --repository-poll-secs in poll mode (each poll lists the repository)
    credentials_secret: str = "triton-model-repository"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    image: str = ""  # empty: nvcr.io/nvidia/tritonserver:<triton_release>-py3

    def __post_init__(self):
        _check(1 <= self.replicas <= self.max_replicas <= 1000,
               f"must satisfy 1 <= replicas <= max_replicas <= 1000; got {self.replicas}, {self.max_replicas}")
        _check(0.001 <= self.cpu <= 512 and abs(self.cpu * 1000 - round(self.cpu * 1000)) < 1e-6,
               f"cpu must be 0.001..512 cores in steps of 0.001; got {self.cpu}")
        _check(256 <= self.memory_mib <= 4 << 20, f"memory_mib must be 256..{4 << 20}; got {self.memory_mib}")
        _check(64 <= self.shm_mib < self.memory_mib,
               f"shm_mib must be at least 64 and below memory_mib ({self.memory_mib}); got {self.shm_mib}")
        _check(0 <= self.gpus <= 16, f"gpus must be 0..16; got {self.gpus}")
        _check(1 <= self.poll_seconds <= 3600, f"poll_seconds must be 1..3600; got {self.poll_seconds}")
        _check(_DNS_NAME.fullmatch(self.credentials_secret) is not None,
               f"credentials_secret must be a Kubernetes name (lowercase letters, digits, '-'); "
               f"got {self.credentials_secret!r}")
        _check(self.image == self.image.strip() and " " not in self.image, f"image must be an image reference; "
                                                                           f"got {self.image!r}")

    @property
    def cpu_quantity(self) -> str:
        """`cpu` as a Kubernetes quantity: "2" or "1500m"."""
        millicores = round(self.cpu * 1000)
        return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Recipe:
    name: str
    task: Literal["embeddings", "sequence-classification", "token-classification", "question-answering",
                  "text-pair-classification"]
    source: Source
    profile: Profile
    description: str = ""
    export: Export = Export()
    gates: Gates = Gates()
    serving: Serving = Serving()
    optimize: Optimize = Optimize()
    tensorrt: TensorRT = TensorRT()
    deploy: Deploy = Deploy()

    @property
    def opset(self) -> int:
        return self.export.opset

    @property
    def engine_profiles(self) -> tuple[EngineProfile, ...]:
        """The TensorRT profiles, each range filled in from the recipe's profile (one equal to it by default)."""
        entries = self.tensorrt.profiles or (EngineProfile("default"),)
        return tuple(EngineProfile(entry.name, entry.batch or self.profile.batch,
                                   entry.sequence or self.profile.sequence) for entry in entries)

    @property
    def engine_max_batch_size(self) -> int:
        """The largest batch every engine profile accepts: Triton's max_batch_size for the plan."""
        return min(profile.batch.max for profile in self.engine_profiles)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_data(self) -> dict:
        """The recipe as TOML-shaped data (what parse_recipe reads); the manifest records it."""
        return to_data(self)

    def override(self, data: dict, where: str = "override") -> "Recipe":
        """The recipe with `data` (TOML-shaped, e.g. {"tensorrt": {"precision": "fp16"}}) merged in, checked whole."""
        return parse_recipe(merge(self.to_data(), data), where)


# ---- parsing ---------------------------------------------------------------------------------------------------


def parse_recipe(data: dict, where: str) -> Recipe:
    """Build a Recipe from parsed TOML; UsageError naming the file, section and key of anything wrong."""
    recipe = parse_table(Recipe, data, where)
    _check_across_sections(recipe, where)
    return recipe


def _check_across_sections(recipe: Recipe, where: str) -> None:
    """Engine profiles inside and covering the recipe's profile; preferred batch sizes within it."""
    for index, profile in enumerate(recipe.engine_profiles):
        for axis in ("batch", "sequence"):
            inner, outer = getattr(profile, axis), getattr(recipe.profile, axis)
            if inner.min < outer.min or inner.max > outer.max:
                raise UsageError(f"{where}: [tensorrt] profiles[{index}] ({profile.name}): {axis} "
                                 f"{inner.min}..{inner.max} is outside the recipe's {outer.min}..{outer.max}")
    batch, sequence = recipe.profile.batch, recipe.profile.sequence
    for b, s in itertools.product(range(batch.min, batch.max + 1), range(sequence.min, sequence.max + 1)):
        if not any(profile.contains(b, s) for profile in recipe.engine_profiles):
            raise UsageError(f"{where}: [tensorrt] profiles: no profile accepts batch {b} x sequence {s}, which the "
                             "recipe's profile allows")
    for size in recipe.serving.preferred_batch_sizes:
        if size > batch.max:
            raise UsageError(f"{where}: [serving] preferred_batch_sizes {size} exceeds the profile's max batch "
                             f"{batch.max}")
    for size in recipe.serving.length_buckets:
        if not sequence.contains(size):
            raise UsageError(f"{where}: [serving] length_buckets {size} is outside the profile's sequence "
                             f"{sequence.min}..{sequence.max}")
    if recipe.serving.entities and recipe.task != "token-classification":
        raise UsageError(f"{where}: [serving] entities groups token-classification logits; task is {recipe.task}")


# ---- finding recipes ---------------------------------------------------------------------------------------------


def known_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in RECIPE_DIR.iterdir() if p.name.endswith(".toml"))


def load_recipe(model: str, task: str | None = None, overrides: dict | None = None) -> Recipe:
    """Resolve MODEL (a recipe name, a recipe file, or a local Hugging Face model folder) into a checked recipe.

    `overrides` (TOML-shaped, from command-line options) are merged in before the whole recipe is checked.
    """
    changes = merge({"task": task} if task else {}, overrides or {})
    candidate = Path(model) if model else None
    if candidate is not None and candidate.is_file() and candidate.suffix == ".toml":
        return parse_recipe(merge(read_toml(candidate.read_bytes(), str(candidate)), changes), str(candidate))
    if candidate is not None and candidate.is_dir() and (candidate / "config.json").is_file():
        return parse_recipe(merge(local_folder_data(candidate), changes), f"model folder {candidate}")
    if model in known_recipes():
        text = (RECIPE_DIR / f"{model}.toml").read_bytes()
        return parse_recipe(merge(read_toml(text, f"recipe {model}"), changes), f"recipe {model}")
    raise UsageError(
        f"unknown model {model!r}: known recipes are {', '.join(known_recipes())}, "
        "or give a recipe .toml file or a local Hugging Face model folder (one with a config.json)"
    )


def local_folder_data(folder: Path) -> dict:
    """Recipe data for a local model folder: the inferred task, the default profile within the model's limits."""
    folder = folder.resolve()
    name = "".join(c if c.isalnum() else "_" for c in folder.name.lower()).strip("_") or "model"
    longest = min([DEFAULT_SEQUENCE.max, *_sequence_limits(folder)])
    task = infer_task(folder)
    shortest = PAIR_SEQUENCE_MIN if task in PAIR_TASKS else DEFAULT_SEQUENCE.min
    sequence = [min(shortest, longest), min(DEFAULT_SEQUENCE.opt, longest), longest]
    return {
        "name": name,
        "task": task,
        "description": f"local model folder {folder}",
        "source": {"path": str(folder)},
        "profile": {"batch": DEFAULT_BATCH.to_data(), "sequence": sequence},
    }


# Families whose position ids start after the padding index (transformers' create_position_ids_from_input_ids):
# their table of max_position_embeddings rows serves pad_token_id + 1 fewer tokens (RoBERTa: 514 rows, 512 tokens).
PADDING_OFFSET_FAMILIES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "ibert",
    "longformer", "luke", "mpnet", "xmod",
})


@dataclass(frozen=True)
class Positions:
    """The longest sequence a model's position table serves, and why."""

    usable: int
    table: int  # max_position_embeddings
    offset: int  # rows before the first position (pad_token_id + 1 for PADDING_OFFSET_FAMILIES, else 0)
    model_type: str

    def describe(self) -> str:
        if not self.offset:
            return f"{self.usable} positions"
        return (f"{self.usable} positions ({self.model_type}: max_position_embeddings {self.table} less its "
                f"position offset {self.offset})")


def model_positions(config: dict) -> Positions | None:
    """The usable positions of a model from its config (config.json's data); None when it names no table."""
    table = config.get("max_position_embeddings")
    if not isinstance(table, int) or isinstance(table, bool) or table <= 0:
        return None
    model_type = str(config.get("model_type", ""))
    offset = 0
    if model_type in PADDING_OFFSET_FAMILIES:
        pad = config.get("pad_token_id")
        offset = (pad if isinstance(pad, int) else 1) + 1
    return Positions(table - offset, table, offset, model_type)


def _sequence_limits(folder: Path) -> list[int]:
    """The longest sequences the folder's model takes: its usable positions, and sentence-transformers' length."""
    limits = []
    for file in ("config.json", "sentence_bert_config.json"):
        path = folder / file
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{path} is not valid JSON") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} is not a JSON object")
        positions = model_positions(data) if file == "config.json" else None
        value = positions.usable if positions else data.get("max_seq_length")
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return limits


# The task of each Auto class's architecture suffix (a config's "architectures"), checked in this order.
ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)


def infer_task(folder: Path) -> str:
    """The task of a local model folder: embeddings for sentence-transformers folders, else from the config; a
    sequence classifier saved by sentence-transformers' CrossEncoder (a "sentence_transformers" key in its config)
    scores text pairs."""
    if (folder / "modules.json").exists() or (folder / "sentence_bert_config.json").exists():
        return "embeddings"
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
        architectures = config.get("architectures") or []
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UsageError(f"{config_path} is not a valid JSON object") from None
    for suffix, task in ARCHITECTURE_TASKS:
        if any(str(a).endswith(suffix) for a in architectures):
            if task == "sequence-classification" and "sentence_transformers" in config:
                return "text-pair-classification"
            return task
    if any(str(a).endswith("Model") for a in architectures):
        return "embeddings"
    raise UsageError(f"cannot infer the task of {folder} (architectures {architectures}); pass TASK= / --task")
