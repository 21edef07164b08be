"""Session fixtures for live-server tests: the tiny models exported, published to one repository, and served.

Import the fixtures into a test module, or add `pytest_plugins = ["tests.live_server"]` to tests/conftest.py.
The server is the real tritonserver of nvidia-pytriton (local launcher, python backend only); it starts once per
session in explicit model-control mode with nothing loaded (`live_loaded` loads what it can serve), and stops when
the session ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from packager import export, render, repository, source
from packager.iospec import IOSpec
from packager.recipe import Recipe
from packager.tasks import get_task
from packager.triton.server import TritonServer, available_backends, serve
from packager.triton.smoke import Reference, SmokeRow, load_servable


@dataclass(frozen=True)
class Published:
    """One recipe published to the live repository: its model names, IO spec and PyTorch reference."""

    recipe: Recipe
    models: tuple[str, ...]
    spec: IOSpec
    reference: Reference

    def named(self, suffix: str) -> str:
        """The model called `<recipe name><suffix>` (e.g. "_python" for the portable ensemble)."""
        name = self.recipe.name + suffix
        assert name in self.models, f"{name} not published; published: {self.models}"
        return name


def publish_recipe(recipe: Recipe, build_folder: Path, repository_root: Path) -> Published:
    """Export `recipe`, render its Triton models from the IO spec and publish them (no gates: the smoke checks)."""
    loaded = source.load(recipe)
    exported = export.export_onnx(loaded, get_task(recipe.task), build_folder / "model.onnx", recipe.opset)
    artifacts = render.Artifacts(exported.path, loaded.tokenizer)
    models = render.render_repository(recipe, exported.spec, render.ServingConfig.from_recipe(recipe), artifacts)
    manifest = repository.build_manifest(recipe, exported.spec, loaded.weights_sha256, parity=[])
    published = repository.publish(repository_root, models, manifest)
    return Published(recipe, tuple(published.paths), exported.spec, Reference.for_recipe(recipe, exported.spec, loaded))


@pytest.fixture(scope="session")
def live_repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("live") / "model_repository"


@pytest.fixture(scope="session")
def live_embeddings(tmp_path_factory, live_repository, tiny_recipe_embeddings) -> Published:
    return publish_recipe(tiny_recipe_embeddings, tmp_path_factory.mktemp("build"), live_repository)


@pytest.fixture(scope="session")
def live_classifier(tmp_path_factory, live_repository, tiny_recipe_classifier) -> Published:
    return publish_recipe(tiny_recipe_classifier, tmp_path_factory.mktemp("build"), live_repository)


@pytest.fixture(scope="session")
def live_server(live_repository, live_embeddings, live_classifier) -> TritonServer:
    """One local tritonserver on the repository holding both tiny recipes; models load on request."""
    pytest.importorskip("pytriton", reason="the local launcher needs nvidia-pytriton")
    with serve("local", live_repository, ready_timeout_s=60) as server:
        yield server


@pytest.fixture(scope="session")
def live_loaded(live_server, live_repository) -> dict[str, SmokeRow]:
    """Every model of the live repository that the server can serve, loaded (ensembles in parallel): name -> row."""
    _, rows = load_servable(live_server, live_repository, backends=available_backends("local"))
    return {row.model: row for row in rows}
