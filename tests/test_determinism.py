"""Same inputs, same release: two builds of the tiny model give byte-identical graphs, configs that differ only in
the version they pin, and manifests that differ only in the version and the creation time."""

from __future__ import annotations

import difflib

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from packager import pipeline
from packager.record import Manifest, to_data


@pytest.fixture(scope="module")
def two_releases(tiny_recipe_embeddings, tmp_path_factory):
    """The tiny model built twice from scratch (two build folders) and published as versions 1 and 2."""
    root = tmp_path_factory.mktemp("twice")
    builds = []
    for run in (1, 2):
        options = pipeline.BuildOptions(build_root=root / f"build-{run}", trt_backend="tensorrt-rtx")
        built = pipeline.build(tiny_recipe_embeddings, options)
        released = pipeline.release(built, pipeline.ReleaseOptions(repository=root / "repository", launcher=None))
        assert released.version == run
        configs = {name: (root / "repository" / name / "config.pbtxt").read_text() for name in released.models}
        builds.append((built, released, configs))
    return root / "repository", builds


def test_a_rebuild_gives_byte_identical_graphs(two_releases):
    _, [(first, _, _), (second, _, _)] = two_releases
    assert first.record.graphs == second.record.graphs
    assert {"model.onnx", "model.shipped.onnx", "levels/model.fused.onnx"} <= set(first.record.graphs)
    for relative in first.record.graphs:
        assert (first.folder / relative).read_bytes() == (second.folder / relative).read_bytes(), relative


def unpinned(text: str) -> model_config_pb2.ModelConfig:
    """A config with the versions it pins cleared."""
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    config.version_policy.specific.ClearField("versions")
    for step in config.ensemble_scheduling.step:
        step.model_version = 0
    return config


def test_configs_differ_only_in_the_version_they_pin(two_releases):
    _, [(_, released, first), (_, _, second)] = two_releases
    for name in released.models:
        assert unpinned(first[name]) == unpinned(second[name]), name
        changed = [line for line in difflib.ndiff(first[name].splitlines(), second[name].splitlines())
                   if line.startswith(("- ", "+ "))]
        assert changed and all("version" in line for line in changed), (name, changed)


def test_manifests_differ_only_in_version_and_creation_time(two_releases):
    repository, [(_, released, _), _] = two_releases
    for name in released.models:
        first, second = (to_data(Manifest.read(repository / name / str(version))) for version in (1, 2))
        assert (first.pop("version"), second.pop("version")) == (1, 2)
        first["release"].pop("created"), second["release"].pop("created")
        configs = [(repository / name / str(version) / "config.pbtxt").read_text() for version in (1, 2)]
        assert unpinned(configs[0]) == unpinned(configs[1]), "each version keeps its config, which pins it"
        first["files"].pop("config.pbtxt"), second["files"].pop("config.pbtxt")
        assert first == second, name
        assert first["release"]["build"]["graphs"] and first["release"]["build"]["engine_stats"] is None
    assert Manifest.read(repository / f"{released.models[1]}" / "2").files, "file digests are part of the check"
