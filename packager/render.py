"""Triton model configs rendered from the Jinja templates in packager/templates/, every name, type and dim from
the IO spec.

One model per serving target (TARGETS), a tokenizer model, and per target an ensemble text -> tokenizer -> model.
Every config is parsed with Triton's own schema (tritonclient's ModelConfig) before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from google.protobuf import text_format
from transformers import PreTrainedTokenizerBase
from tritonclient.grpc import model_config_pb2

from packager.errors import PackagerError, UsageError, first_line
from packager.iospec import BATCH, SEQUENCE, IOSpec, TensorSpec
from packager.recipe import TARGETS as TARGET_NAMES
from packager.recipe import Profile, Recipe, Serving
from packager.record import ProfileShapes
from packager.tasks import get_task
from packager.templating import TEMPLATE_DIR, environment

# Read as real files: Jinja loads the templates from TEMPLATE_DIR and publish copies the python models' model.py.
PYTHON_MODELS = TEMPLATE_DIR / "python"
TOKENIZER_FOLDER = "tokenizer"  # inside the tokenizer model's version folder
FAST_TOKENIZER_FILE = "tokenizer.json"  # what `tokenizers` loads; absent for slow tokenizers
ENCODING_FILE = "encoding.json"  # next to the tokenizer model's model.py (and the entities model's)
ENTITIES_FILE = "entities.json"  # next to the entities model's model.py: labels by id, ignored labels, unknown id
ENTITIES_OUTPUT = "entities"  # the entities ensemble's output: one JSON list of entity groups per text
ENTITIES_SUFFIX, ENTITY_GROUPS_SUFFIX = "_entities", "_entity_groups"  # the ensemble, and its python step
IGNORED_LABELS = ("O",)  # the pipeline's default ignore_labels
PADDING_FILE = "padding.json"  # next to the portable model's model.py
# The tokenizers.Encoding field behind each output of a Hugging Face fast tokenizer (transformers'
# TokenizersBackend._convert_encoding): the tokenizer model reads them without importing transformers.
ENCODING_FIELDS = {
    "input_ids": "ids",
    "token_type_ids": "type_ids",
    "attention_mask": "attention_mask",
    "special_tokens_mask": "special_tokens_mask",
}

DEVICE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# optimization.graph.level as Triton's onnxruntime backend reads it (0 or absent: all optimizations).
GRAPH_LEVELS = {"all": 0, "extended": 1, "basic": -1, "disabled": 2}
EXECUTION_MODES = {"sequential": 0, "parallel": 1}
ACCELERATOR_WORKSPACE_BYTES = 1 << 30

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRTPlan:
    """A deployable engine: its optimization profiles in index order (batch axis first in every shape) and the
    largest batch the engine serves (the plan's max_batch_size)."""

    path: Path
    profiles: tuple[ProfileShapes, ...]
    max_batch_size: int


@dataclass(frozen=True)
class Artifacts:
    """What the models are built from: the gated ONNX graph, its tokenizer, and optionally a TensorRT engine."""

    onnx: Path
    tokenizer: PreTrainedTokenizerBase
    tensorrt: TensorRTPlan | None = None
    prompts: Mapping[str, str] = field(default_factory=dict)  # sentence-transformers prompts, by name
    labels: tuple[str, ...] = ()  # a classifier's labels by id (the model config's id2label), for [serving] entities


@dataclass(frozen=True)
class RenderedModel:
    """One model folder: its config (rendered per version) and the files of its version folder.

    `files` maps a path inside the version folder to a file to copy or the bytes to write.
    """

    name: str
    template: str
    context: Mapping[str, object]
    files: Mapping[str, Path | bytes]
    runs: str | None = None  # what answers its requests: "onnx" (the shipped graph), "plan" (TensorRT); None: text only

    def config_text(self, version: int) -> str:
        """config.pbtxt for `version`, checked against Triton's schema."""
        return render_config(self.template, {**self.context, "version": version})


@dataclass(frozen=True)
class Target:
    """A serving target: its model folder, its ensemble, and how its model is rendered."""

    model_suffix: str
    ensemble_suffix: str
    build: Callable[[str, "_Inputs"], RenderedModel]
    runs: str = "onnx"  # what the model serves: "onnx" (the shipped graph) or "plan" (a TensorRT engine)

    @property
    def needs_engine(self) -> bool:
        return self.runs == "plan"


@dataclass(frozen=True)
class _Inputs:
    recipe: Recipe
    spec: IOSpec
    serving: Serving
    artifacts: Artifacts


def render_repository(recipe: Recipe, spec: IOSpec, artifacts: Artifacts) -> list[RenderedModel]:
    """The tokenizer, then per target of the recipe's [serving] (tensorrt only with an engine) its model and its
    ensemble, schema-checked. The order is the publish order: every ensemble after the steps it pins.
    """
    serving = recipe.serving
    _check_spec(spec, text_input_names(recipe))
    inputs = _Inputs(recipe, spec, serving, artifacts)
    tokenizer = _tokenizer_model(f"{recipe.name}_tokenizer", inputs)
    models = [tokenizer]
    for target_name in serving.targets:
        target = TARGETS[target_name]
        if target.needs_engine and artifacts.tensorrt is None:
            continue
        model = dataclasses.replace(target.build(recipe.name + target.model_suffix, inputs), runs=target.runs)
        ensemble = _ensemble(recipe.name + target.ensemble_suffix, tokenizer.name, model, inputs)
        models += [model, dataclasses.replace(ensemble, runs=target.runs)]
    if serving.entities and len(models) > 1:  # its ensemble pins the first target's model
        models += _entities(recipe.name, tokenizer, models[1], inputs)
    for model in models:
        model.config_text(1)
    return models


def render_config(template: str, context: Mapping[str, object]) -> str:
    """Render one template and parse the result with Triton's ModelConfig schema; one-line errors name the template."""
    try:
        text = environment().get_template(template).render(**context)
    except jinja2.TemplateError as exc:
        raise PackagerError(f"template {template}: {first_line(exc)}") from None
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise PackagerError(f"template {template} renders a config Triton's schema rejects: {first_line(exc)}") \
            from None
    return text


# ---- model contexts -------------------------------------------------------------------------------------------


def _onnxruntime_model(name: str, inputs: _Inputs) -> RenderedModel:
    context = _model_context(name, inputs, DEVICE_KINDS[inputs.serving.device], ragged=False)
    context.update(_session_options(inputs.serving, accelerate=True))
    return RenderedModel(name, "onnxruntime.pbtxt.j2", context, {"model.onnx": inputs.artifacts.onnx})


def _python_model(name: str, inputs: _Inputs) -> RenderedModel:
    """ONNX Runtime (CPU) on the python backend: joins requests of different sequence lengths by padding."""
    context = _model_context(name, inputs, "KIND_CPU", ragged=True)
    context.update(_session_options(inputs.serving, accelerate=False))
    padding = {
        "sequence_axes": {t.name: t.axis(SEQUENCE) for t in inputs.spec.inputs + inputs.spec.outputs
                          if SEQUENCE in t.dims},
        "pad_values": _pad_values(inputs.artifacts.tokenizer, inputs.spec),
    }
    files = {
        "model.py": PYTHON_MODELS / "onnxruntime_model.py",
        "model.onnx": inputs.artifacts.onnx,
        PADDING_FILE: (json.dumps(padding, indent=2) + "\n").encode(),
    }
    return RenderedModel(name, "python_onnxruntime.pbtxt.j2", context, files)


def _tensorrt_model(name: str, inputs: _Inputs) -> RenderedModel:
    plan = inputs.artifacts.tensorrt
    _check_profiles(plan, inputs.spec)
    context = _model_context(name, inputs, "KIND_GPU", ragged=False)
    context["max_batch_size"] = plan.max_batch_size
    sizes = [size for size in context["batching"]["preferred_batch_sizes"] if size <= plan.max_batch_size]
    context["batching"]["preferred_batch_sizes"] = sizes or [plan.max_batch_size]
    context["instance"]["profiles"] = [str(profile.index) for profile in plan.profiles]
    context["warmup"] = _warmup(inputs.spec, _plan_shapes(plan))
    return RenderedModel(name, "tensorrt.pbtxt.j2", context, {"model.plan": plan.path})


def _tokenizer_model(name: str, inputs: _Inputs) -> RenderedModel:
    sequence = inputs.recipe.profile.sequence
    context = {
        "name": name,
        "recipe": inputs.recipe.name,
        "max_batch_size": inputs.recipe.profile.batch.max,
        "inputs": _text_tensors(inputs.recipe),
        "outputs": [_tensor(t) for t in inputs.spec.inputs],
        "instance": {"kind": "KIND_CPU", "count": inputs.serving.tokenizer_instances, "profiles": []},
        "parameters": {
            "max_sequence_length": str(sequence.max),
            "min_sequence_length": str(sequence.min),
            "tokenizer_folder": TOKENIZER_FOLDER,
        },
    }
    if inputs.artifacts.prompts:  # a request's prompt_name parameter picks one
        context["parameters"]["prompts"] = json.dumps(dict(inputs.artifacts.prompts), sort_keys=True)
    buckets = inputs.serving.buckets(inputs.recipe.profile)
    if buckets:  # pad each request up to one of these lengths ([serving] pad_to = "buckets")
        context["parameters"]["length_buckets"] = ",".join(map(str, buckets))
    saved = _tokenizer_files(inputs.artifacts.tokenizer)
    encoding = _encoding_settings(inputs.artifacts.tokenizer, inputs.spec, fast=FAST_TOKENIZER_FILE in saved,
                                  truncation=get_task(inputs.recipe.task).truncation)
    files: dict[str, Path | bytes] = {
        "model.py": PYTHON_MODELS / "tokenizer_model.py",
        ENCODING_FILE: (json.dumps(encoding, indent=2) + "\n").encode(),
    }
    for path, data in saved.items():
        files[f"{TOKENIZER_FOLDER}/{path}"] = data
    return RenderedModel(name, "tokenizer.pbtxt.j2", context, files)


def _ensemble(name: str, tokenizer: str, model: RenderedModel, inputs: _Inputs) -> RenderedModel:
    spec, texts = inputs.spec, text_input_names(inputs.recipe)
    tensors = {n: n for n in spec.input_names}
    context = {
        "name": name,
        "recipe": inputs.recipe.name,
        "max_batch_size": model.context["max_batch_size"],
        "inputs": _text_tensors(inputs.recipe),
        "outputs": [_tensor(t) for t in spec.outputs],
        "steps": [
            {"model": tokenizer, "input_map": {text: text for text in texts}, "output_map": tensors},
            {"model": model.name, "input_map": tensors, "output_map": {n: n for n in spec.output_names}},
        ],
    }
    return RenderedModel(name, "ensemble.pbtxt.j2", context, {})


def _entities(name: str, tokenizer: RenderedModel, model: RenderedModel, inputs: _Inputs) -> list[RenderedModel]:
    """The python step that groups token-classification logits into entity spans, and the ensemble
    text -> tokenizer -> model -> entity groups."""
    task = get_task(inputs.recipe.task)
    text, logits = text_input_names(inputs.recipe)[0], inputs.spec.tensor(task.metric_output)
    tokenizer_files = {path: data for path, data in tokenizer.files.items()
                       if path.startswith(f"{TOKENIZER_FOLDER}/")}  # the tokenizer model's, saved once
    if f"{TOKENIZER_FOLDER}/{FAST_TOKENIZER_FILE}" not in tokenizer_files:
        raise PackagerError("[serving] entities needs a fast tokenizer (tokenizer.json): character offsets come from it")
    if len(inputs.artifacts.labels) != logits.dims[-1]:
        raise PackagerError(f"[serving] entities needs a label for each of the {logits.dims[-1]} logits; the model's "
                            f"config names {len(inputs.artifacts.labels)}")
    step_name = name + ENTITY_GROUPS_SUFFIX
    files: dict[str, Path | bytes] = {
        "model.py": PYTHON_MODELS / "entities_model.py",
        ENCODING_FILE: tokenizer.files[ENCODING_FILE],
        ENTITIES_FILE: (json.dumps({"labels": list(inputs.artifacts.labels), "ignore_labels": list(IGNORED_LABELS),
                                    "unk_id": inputs.artifacts.tokenizer.unk_token_id}, indent=2) + "\n").encode(),
        **tokenizer_files,
    }
    step = RenderedModel(step_name, "entities.pbtxt.j2", {
        "name": step_name,
        "recipe": inputs.recipe.name,
        "max_batch_size": inputs.recipe.profile.batch.max,
        "inputs": [_string_tensor(text), _tensor(logits)],
        "outputs": [_string_tensor(ENTITIES_OUTPUT)],
        "instance": {"kind": "KIND_CPU", "count": inputs.serving.tokenizer_instances, "profiles": []},
        "parameters": {"max_sequence_length": str(inputs.recipe.profile.sequence.max),
                       "tokenizer_folder": TOKENIZER_FOLDER},
    }, files)
    tensors = {n: n for n in inputs.spec.input_names}
    ensemble_name = name + ENTITIES_SUFFIX
    ensemble = RenderedModel(ensemble_name, "ensemble.pbtxt.j2", {
        "name": ensemble_name,
        "recipe": inputs.recipe.name,
        "max_batch_size": model.context["max_batch_size"],
        "inputs": [_string_tensor(text)],
        "outputs": [_string_tensor(ENTITIES_OUTPUT)],
        "steps": [
            {"model": tokenizer.name, "input_map": {text: text}, "output_map": tensors},
            {"model": model.name, "input_map": tensors, "output_map": {logits.name: logits.name}},
            {"model": step_name, "input_map": {text: text, logits.name: logits.name},
             "output_map": {ENTITIES_OUTPUT: ENTITIES_OUTPUT}},
        ],
    }, {})
    return [step, dataclasses.replace(ensemble, runs=model.runs)]


TARGETS: dict[str, Target] = {
    "onnxruntime": Target("_onnx", "", _onnxruntime_model),
    "python": Target("_onnx_python", "_python", _python_model),
    "tensorrt": Target("_tensorrt_plan", "_tensorrt", _tensorrt_model, runs="plan"),
}
assert tuple(TARGETS) == TARGET_NAMES, "every target the recipe schema knows is rendered"


def _model_context(name: str, inputs: _Inputs, kind: str, ragged: bool) -> dict:
    recipe, spec, serving = inputs.recipe, inputs.spec, inputs.serving
    return {
        "name": name,
        "recipe": recipe.name,
        "max_batch_size": recipe.profile.batch.max,
        "inputs": [_tensor(t, ragged=ragged and SEQUENCE in t.dims) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        "batching": {
            "preferred_batch_sizes": list(serving.batch_sizes(recipe.profile)),
            "max_queue_delay_us": serving.max_queue_delay_us,
        },
        "instance": {"kind": kind, "count": serving.instances, "profiles": []},
        "warmup": _warmup(spec, _profile_shapes(spec, recipe.profile)),
    }


def _session_options(serving: Serving, accelerate: bool) -> dict:
    options = serving.onnxruntime
    accelerator = None
    if accelerate and serving.tensorrt_accelerator:
        accelerator = {"name": "tensorrt", "parameters": {
            "precision_mode": serving.tensorrt_precision,
            "max_workspace_size_bytes": str(ACCELERATOR_WORKSPACE_BYTES),
        }}
    return {
        "graph_level": GRAPH_LEVELS[options.graph_optimization_level],
        "accelerator": accelerator,
        "parameters": {
            "intra_op_thread_count": str(options.intra_op_thread_count),
            "inter_op_thread_count": str(options.inter_op_thread_count),
            "execution_mode": str(EXECUTION_MODES[options.execution_mode]),
        },
    }


def _tensor(tensor: TensorSpec, ragged: bool = False) -> dict:
    return {"name": tensor.name, "data_type": tensor.triton_type, "dims": tensor.triton_dims(BATCH), "ragged": ragged}


def text_input_names(recipe: Recipe) -> tuple[str, ...]:
    """The ensemble's text inputs: the task's pair (e.g. question, context), else [serving] text_input."""
    return get_task(recipe.task).text_inputs or (recipe.serving.text_input,)


def _string_tensor(name: str) -> dict:
    """One string per batch row."""
    return {"name": name, "data_type": "TYPE_STRING", "dims": [1], "ragged": False}


def _text_tensors(recipe: Recipe) -> list[dict]:
    return [_string_tensor(name) for name in text_input_names(recipe)]


def _warmup(spec: IOSpec, shapes: list[Mapping[str, Shape]]) -> list[dict]:
    """Warmup samples of zeros, one per set of full input shapes (batch first)."""
    samples = []
    for shape in shapes:
        batch = shape[spec.inputs[0].name][0]
        tensors = [{"name": t.name, "data_type": t.triton_type, "dims": list(shape[t.name][1:])} for t in spec.inputs]
        sizes = " x ".join(str(size) for size in shape[spec.inputs[0].name])
        samples.append({"name": f"zeros {sizes}", "batch_size": batch, "inputs": tensors})
    return samples


def _profile_shapes(spec: IOSpec, profile: Profile) -> list[dict[str, Shape]]:
    """The recipe profile's smallest and largest shapes: the model's kernels are loaded before traffic."""
    ends = ((profile.batch.min, profile.sequence.min), (profile.batch.max, profile.sequence.max))
    return [
        {t.name: tuple(batch if d == BATCH else sequence if d == SEQUENCE else d for d in t.dims) for t in spec.inputs}
        for batch, sequence in ends
    ]


def _plan_shapes(plan: TensorRTPlan) -> list[dict[str, Shape]]:
    """Each engine profile's min and max shapes, the batch capped at the plan's max_batch_size."""
    samples = []
    for profile in plan.profiles:
        for end in (0, 2):
            shape = {name: (min(shapes[end][0], plan.max_batch_size), *shapes[end][1:])
                     for name, shapes in profile.shapes.items()}
            if all(shape[name][0] >= shapes[0][0] for name, shapes in profile.shapes.items()) and shape not in samples:
                samples.append(shape)
    return samples


# ---- checks and tokenizer facts -------------------------------------------------------------------------------


def _check_spec(spec: IOSpec, texts: tuple[str, ...]) -> None:
    """Triton batching needs the batch axis first; inputs may have no other dynamic axis than the sequence."""
    for tensor in spec.inputs + spec.outputs:
        if not tensor.dims or tensor.dims[0] != BATCH:
            raise PackagerError(
                f"tensor '{tensor.name}' dims {list(tensor.dims)}: Triton batching needs '{BATCH}' first")
    for tensor in spec.inputs:
        other = [d for d in tensor.dims[1:] if isinstance(d, str) and d != SEQUENCE]
        if other:
            raise PackagerError(
                f"input '{tensor.name}' has dynamic axes {other}: warmup and padding know only '{SEQUENCE}'")
    for text in texts:
        if text in spec.input_names + spec.output_names:
            raise UsageError(f"the ensemble's text input '{text}' clashes with a tensor of the model")


def _check_profiles(plan: TensorRTPlan, spec: IOSpec) -> None:
    """Every profile sizes every input at its rank; some profile takes the plan's max_batch_size."""
    if not plan.profiles:
        raise PackagerError(f"TensorRT engine {plan.path} comes with no optimization profiles")
    for index, profile in enumerate(plan.profiles):
        if set(profile.shapes) != set(spec.input_names):
            raise PackagerError(
                f"TensorRT profile {index} sizes {sorted(profile.shapes)}; the graph's inputs are {spec.input_names}"
            )
        for tensor in spec.inputs:
            if any(len(shape) != len(tensor.dims) for shape in profile.shapes[tensor.name]):
                raise PackagerError(
                    f"TensorRT profile {index} shapes of '{tensor.name}' are not of rank {len(tensor.dims)}"
                )
    largest = max(ranges[2][0] for profile in plan.profiles for ranges in profile.shapes.values())
    if not 1 <= plan.max_batch_size <= largest:
        raise PackagerError(
            f"TensorRT max_batch_size {plan.max_batch_size} is outside the engine's batch range 1..{largest}"
        )


def _pad_values(tokenizer: PreTrainedTokenizerBase, spec: IOSpec) -> dict[str, int]:
    """The value the tokenizer pads each input with, read from a padded batch (pad id, mask 0, type 0...)."""
    try:
        encoded = tokenizer(["a", "a a a a a a"], padding="longest", return_tensors="np")
    except ValueError as exc:
        raise PackagerError(f"the tokenizer cannot pad a batch: {first_line(exc)}") from None
    position = -1 if tokenizer.padding_side == "right" else 0
    missing = [name for name in spec.input_names if name not in encoded]
    if missing:
        raise PackagerError(f"the tokenizer gives {sorted(encoded.keys())}, not the graph's inputs {missing}")
    return {name: int(encoded[name][0, position]) for name in spec.input_names}


def _encoding_settings(tokenizer: PreTrainedTokenizerBase, spec: IOSpec, fast: bool, truncation: str) -> dict:
    """What the tokenizer model needs to encode as the Hugging Face tokenizer does (see tokenizer_model.py)."""
    return {
        "library": "tokenizers" if fast else "transformers",
        "fields": _encoding_fields(spec) if fast else {},
        "pad_values": _pad_values(tokenizer, spec),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "truncation_strategy": truncation,  # the task's: longest_first, or only_second (a pair's second text)
        "split_special_tokens": tokenizer.split_special_tokens,
    }


def _encoding_fields(spec: IOSpec) -> dict[str, str]:
    """Graph input -> the tokenizers.Encoding field a fast tokenizer fills it from."""
    unknown = [name for name in spec.input_names if name not in ENCODING_FIELDS]
    if unknown:
        raise PackagerError(f"graph inputs {unknown} are no tokenizers encoding field: {sorted(ENCODING_FIELDS)}")
    return {name: ENCODING_FIELDS[name] for name in spec.input_names}


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files `save_pretrained` writes, so the served tokenizer loads offline from its version folder."""
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
