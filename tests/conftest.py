import os

import pytest

from tests.tiny_model import tiny_recipe, write_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.live_server"]  # the live server's session fixtures, for every module that asks for them


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-classifier"), task="sequence-classification")


@pytest.fixture(scope="session")
def tiny_recipe_embeddings(tiny_bert_dir):
    return tiny_recipe(tiny_bert_dir)


@pytest.fixture(scope="session")
def tiny_recipe_classifier(tiny_classifier_dir):
    return tiny_recipe(tiny_classifier_dir, task="sequence-classification", name="tinycls")


def pytest_addoption(parser):
    parser.addoption("--matrix-table", action="store_true",
                     help="print the family × task matrix (tests/test_matrix.py) as the README's table")
