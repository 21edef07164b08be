"""Real weights beyond the embedded MiniLM: all-mpnet-base-v2 (MPNet), fetched by `make models` (440 MB, so not in
CI: the test skips, saying so, when the folder is absent). Its export passes the fp32 gate against
sentence-transformers' own encode, and the graph's sentence embeddings equal encode's on the validation text."""

from pathlib import Path

import numpy as np
import pytest

from packager import pipeline, source, validate
from packager.recipe import load_recipe

pytestmark = pytest.mark.slow

MPNET = Path("~/.cache/triton-packager/models/all-mpnet-base-v2").expanduser()


@pytest.mark.skipif(not (MPNET / "modules.json").exists(), reason=f"{MPNET} absent: `make models` fetches it")
def test_mpnet_passes_the_gate_and_equals_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    recipe = load_recipe("mpnet").override({"optimize": {"cpu": ["plain"]},
                                            "profile": {"batch": [1, 2, 4], "sequence": [2, 64, 384]}})
    built = pipeline.build(recipe, pipeline.BuildOptions(build_root=tmp_path, trt_backend="none"))
    assert built.record.parity[0].outputs()["sentence_embedding"].metric_value >= 0.9999
    texts = list(validate.VALIDATION_TEXTS)
    expected = SentenceTransformer(str(MPNET), device="cpu").encode(texts)
    encoded = built.model().tokenizer(texts, padding=True, truncation=True, max_length=384, return_tensors="np")
    run = validate.onnxruntime_runner(built.level_path("plain"), built.spec)
    got = run({t.name: encoded[t.name].astype(t.numpy_dtype) for t in built.spec.inputs})["sentence_embedding"]
    assert np.abs(got - expected).max() <= 1e-4
    assert source.load(recipe).modules.describe().startswith("mean pooling, normalize")
