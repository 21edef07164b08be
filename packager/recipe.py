"""Model recipes: small declarative TOML files that say what to package and how to check it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from packager.errors import UsageError

RECIPE_DIR = resources.files("packager") / "recipes"
STAGE_SECTIONS = ("serving", "optimize", "tensorrt")


@dataclass(frozen=True)
class Range:
    """A min / opt / max triple, as TensorRT optimization profiles and the validation grid use it."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, what: str, value: object) -> "Range":
        if isinstance(value, str):
            parts = value.replace(",", " ").split()
            value = [int(v) for v in parts] if all(v.isdigit() for v in parts) else value
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value)):
            raise UsageError(f"{what} must be three integers min, opt, max; got {value!r}")
        low, opt, high = value
        if not 1 <= low <= opt <= high:
            raise UsageError(f"{what} must satisfy 1 <= min <= opt <= max; got {low}, {opt}, {high}")
        return cls(low, opt, high)

    def values(self) -> tuple[int, ...]:
        """The distinct sizes, smallest first."""
        return tuple(sorted({self.min, self.opt, self.max}))


@dataclass(frozen=True)
class Profile:
    batch: Range
    sequence: Range


DEFAULT_BATCH, DEFAULT_SEQUENCE = Range(1, 8, 32), Range(2, 128, 256)


@dataclass(frozen=True)
class Source:
    """Where weights and tokenizer come from: exactly one of an embedded package, a local folder or a hub id."""

    package: str | None = None
    path: str | None = None
    hub: str | None = None

    def describe(self) -> str:
        if self.package:
            return f"package {self.package}"
        if self.path:
            return f"folder {self.path}"
        return f"hub {self.hub}"


@dataclass(frozen=True)
class Tolerances:
    max_abs: float = 1e-4
    min_cosine: float = 0.9999
    min_argmax_agreement: float = 1.0


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str
    source: Source
    profile: Profile
    opset: int = 17
    tolerances: Tolerances = field(default_factory=Tolerances)
    description: str = ""
    # Stage sections, parsed and checked by the stage that owns them (serving -> render, optimize, tensorrt).
    sections: dict[str, dict] = field(default_factory=dict)

    def section(self, name: str) -> dict:
        return self.sections.get(name, {})

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def known_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in RECIPE_DIR.iterdir() if p.name.endswith(".toml"))


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: [{key}] must be a table")
    return value


def parse_recipe(data: dict, where: str) -> Recipe:
    """Build a Recipe from parsed TOML, naming the file and key of anything wrong."""
    unknown = set(data) - {"name", "description", "task", "source", "export", "profile", "tolerances"} - set(STAGE_SECTIONS)
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
    source_data = _section(data, "source", where)
    sources = {k: v for k, v in source_data.items() if k in ("package", "path", "hub")}
    if len(sources) != 1 or set(source_data) - set(sources):
        raise UsageError(f"{where}: [source] needs exactly one of package, path, hub; got {sorted(source_data)}")
    profile = _section(data, "profile", where)
    try:
        tolerances = Tolerances(**_section(data, "tolerances", where))
    except TypeError as exc:
        raise UsageError(f"{where}: [tolerances] {exc}") from None
    for key in ("name", "task"):
        if not isinstance(data.get(key), str):
            raise UsageError(f"{where}: '{key}' must be a string")
    return Recipe(
        name=data["name"],
        task=data["task"],
        description=data.get("description", ""),
        source=Source(**sources),
        profile=Profile(
            batch=Range.parse(f"{where}: profile.batch", profile.get("batch")),
            sequence=Range.parse(f"{where}: profile.sequence", profile.get("sequence")),
        ),
        opset=int(_section(data, "export", where).get("opset", 17)),
        tolerances=tolerances,
        sections={key: _section(data, key, where) for key in STAGE_SECTIONS if key in data},
    )


def load_recipe(model: str, task: str | None = None) -> Recipe:
    """Resolve MODEL: a recipe name, a recipe file, or a local Hugging Face model folder."""
    candidate = Path(model)
    if candidate.is_file() and candidate.suffix == ".toml":
        with candidate.open("rb") as handle:
            return _with_task(parse_recipe(tomllib.load(handle), str(candidate)), task)
    if candidate.is_dir():
        return local_folder_recipe(candidate, task)
    if model in known_recipes():
        text = (RECIPE_DIR / f"{model}.toml").read_text()
        return _with_task(parse_recipe(tomllib.loads(text), f"recipe {model}"), task)
    raise UsageError(
        f"unknown model '{model}': known recipes are {', '.join(known_recipes())}, "
        "or give a recipe .toml file or a local Hugging Face model folder"
    )


def _with_task(recipe: Recipe, task: str | None) -> Recipe:
    return recipe.replace(task=task) if task else recipe


def local_folder_recipe(folder: Path, task: str | None) -> Recipe:
    """A recipe for a local model folder: the task given or inferred, the default profile within the model's limits."""
    from packager.tasks import infer_task

    folder = folder.resolve()
    name = "".join(c if c.isalnum() else "_" for c in folder.name.lower()).strip("_") or "model"
    longest = min(DEFAULT_SEQUENCE.max, *_sequence_limits(folder))
    sequence = Range(min(DEFAULT_SEQUENCE.min, longest), min(DEFAULT_SEQUENCE.opt, longest), longest)
    return Recipe(
        name=name,
        task=task or infer_task(folder),
        source=Source(path=str(folder)),
        profile=Profile(batch=DEFAULT_BATCH, sequence=sequence),
        description=f"local model folder {folder}",
    )


def _sequence_limits(folder: Path) -> list[int]:
    """The longest sequences the folder's model takes: its position embeddings, and sentence-transformers' length."""
    limits = []
    for file, key in (("config.json", "max_position_embeddings"), ("sentence_bert_config.json", "max_seq_length")):
        path = folder / file
        value = json.loads(path.read_text()).get(key) if path.exists() else None
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return limits
