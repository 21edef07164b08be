"""Session fixtures for live-server tests: the tiny models exported, published to one repository, and served.

tests/conftest.py registers them (`pytest_plugins`); a test module asks for them by name. The heavy imports wait
for the first fixture that needs them.
The server is the real tritonserver of nvidia-pytriton (local launcher: the python backend, and Triton's onnxruntime
backend when `make triton-backends` has built it); it starts once per session in explicit model-control mode with
nothing loaded (`live_loaded` loads what it can serve), and stops when the session ends.

Tests of the native onnxruntime backend call `require_native_backend()`: they skip without the built backend, and
fail instead when PACKAGER_REQUIRE_ORT_BACKEND=1 (CI builds it and sets that). `without_native_backend` hides the
built backend from the local launcher (an empty cache folder), for the tests of a server that lacks it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from packager.triton import backends

if TYPE_CHECKING:
    from packager.iospec import IOSpec
    from packager.recipe import Recipe
    from packager.triton.reference import Reference
    from packager.triton.rows import SmokeRow
    from packager.triton.server import TritonServer

REQUIRE_NATIVE = "PACKAGER_REQUIRE_ORT_BACKEND"


def native_backend() -> bool:
    """True when the local launcher's server has Triton's onnxruntime backend (built by `make triton-backends`)."""
    return backends.find() is not None


def require_native_backend() -> None:
    """Skip the calling test without the built onnxruntime backend; fail when the environment requires it."""
    if native_backend():
        return
    message = "Triton's onnxruntime backend is not built for this server: run `make triton-backends`"
    if os.environ.get(REQUIRE_NATIVE) == "1":
        pytest.fail(f"{message} ({REQUIRE_NATIVE}=1 requires it)")
    pytest.skip(message)


@pytest.fixture
def without_native_backend(monkeypatch, tmp_path):
    """The local launcher finds no built onnxruntime backend: its cache folder is empty."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert not native_backend()


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
    from packager import pipeline
    from packager.triton.reference import Reference

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
    from packager.triton.server import serve

    with serve("local", live_repository, ready_timeout_s=60) as server:
        yield server


@pytest.fixture(scope="session")
def live_loaded(live_server, live_repository) -> dict[str, SmokeRow]:
    """Every model of the live repository that the server can serve, loaded (ensembles in parallel): name -> row."""
    from packager.triton.discovery import load_servable
    from packager.triton.server import available_backends

    _, rows = load_servable(live_server, live_repository, backends=available_backends("local"))
    return {row.model: row for row in rows}
