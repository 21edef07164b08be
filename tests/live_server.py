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

from packager import pipeline
from packager.iospec import IOSpec
from packager.recipe import Recipe
from packager.triton.server import TritonServer, available_backends, serve
from packager.triton.discovery import load_servable
from packager.triton.reference import Reference
from packager.triton.rows import SmokeRow


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


def publish_recipe(recipe: Recipe, build_root: Path, repository_root: Path) -> Published:
    """Build `recipe` (export and its gate, plain level, no TensorRT) and publish it, as `packager package` does
    without its own smoke: the tests run the smoke."""
    plain = recipe.override({"optimize": {"cpu": ["plain"]}})
    built = pipeline.build(plain, pipeline.BuildOptions(build_root=build_root, trt_backend="none"))
    released = pipeline.release(built, pipeline.ReleaseOptions(repository=repository_root, launcher=None))
    return Published(recipe, released.models, built.spec, Reference.of(recipe, built.spec, built.model()))


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
