"""A model folder is data, never code: folders that would run their own code or unpickle weights are refused before
anything is loaded, with one line naming the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertModel

from packager import source
from packager.errors import PackagerError
from packager.recipe import load_recipe
from tests.tiny_model import tiny_recipe

EVIL_CODE = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def folder(tmp_path, tiny_bert_dir):
    copy = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, copy)
    return copy


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def load(folder, **settings):
    return source.load(tiny_recipe(folder, source={"path": str(folder), **settings}))


def test_a_config_auto_map_is_refused_and_its_code_never_runs(folder, tmp_path):
    marker = tmp_path / "ran"
    (folder / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    edit_json(folder / "config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    with pytest.raises(PackagerError, match=r"config.json has 'auto_map'.*never runs"):
        load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("file, key, value", [
    ("tokenizer_config.json", "tokenizer_class", "EvilTokenizer"),
    ("config.json", "architectures", ["EvilModel"]),
])
def test_classes_outside_transformers_are_refused(folder, file, key, value):
    edit_json(folder / file, **{key: value})
    with pytest.raises(PackagerError, match=f"{file}: '{key}' names .*Evil.*not a transformers class"):
        load(folder)


def test_pickled_weights_are_refused_unless_the_recipe_opts_in(folder):
    model = BertModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PackagerError, match=r"only pickled weights \(pytorch_model.bin\).*allow_pickled_weights"):
        load(folder)
    loaded = load(folder, allow_pickled_weights=True)
    assert loaded.weights_sha256 and sum(p.numel() for p in loaded.model.parameters()) > 0


def test_a_corrupt_config_is_one_line(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PackagerError, match=r"config.json is not valid JSON") as failure:
        load(folder)
    assert "\n" not in str(failure.value)


def test_the_embedded_model_loads_without_remote_code():
    source.check_runs_no_code(source.resolve_folder(load_recipe("bert").source))
