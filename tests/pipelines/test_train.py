"""Train stage: an imported outcome table trains end to end; splits never share a query; in
holdout mode the test split is never read; bad tables get clear errors; featurize embeds only
new queries."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_params


def outcome_table(path, n=90, seed=0):
    """Arithmetic-looking queries whose success on the cheap tier falls with number size."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 10 ** rng.randint(1, 3))
        text = f"What is {a} + {b}?" if i % 2 else f"Compute {a} * {b} and then add {a}."
        hard = b > 50
        for tier, cost, p in (("direct", 5, 0.1 if hard else 0.9), ("think", 60, 0.5 if hard else 0.95),
                              ("vote", 240, 0.8 if hard else 0.97)):
            for s in range(2):
                rows.append({"query_id": f"q{i:03d}", "text": text, "tier": tier,
                             "correct": int(rng.random() < p), "cost": cost + rng.randint(0, 5)})
    pd.DataFrame(rows).to_csv(path, index=False)


def raw_params(tmp, table, **extra) -> dict:
    return {
        "seed": 0,
        "data": {"outcomes": str(table), "split": [0.5, 0.25, 0.25]},
        "prepare": {"out": str(tmp / "queries.parquet"), "report": str(tmp / "prepare.json")},
        "rollout": {"out": str(tmp / "rollouts"), "metrics": str(tmp / "rollout.json")},
        "label": {"out": str(tmp / "outcomes.parquet"), "tiers_out": str(tmp / "tiers.json"),
                  "report": str(tmp / "label.json"), "metrics": str(tmp / "label_metrics.json")},
        "featurize": {"out": str(tmp / "features.parquet"), "embedding": "none"},
        "train": {"out_dir": str(tmp / "train"), "metrics": str(tmp / "train.json"),
                  "candidates": ["constant", "logreg", "lgbm_per_tier", "lgbm_joint"]},
        **extra,
    }


def promotion_paths(tmp) -> dict:
    """The export section's promotion-gate files, inside ``tmp`` (their defaults are in the work tree)."""
    return {"promotion_report": str(tmp / "promotion.json"), "promotion_audit": str(tmp / "promotions.jsonl"),
            "promote_feedback": str(tmp / "feedback.parquet")}


def params_for(tmp, table, **extra):
    return parse_params(raw_params(tmp, table, **extra))


def run_to_train(p):
    from pipelines.featurize import featurize
    from pipelines.label import label
    from pipelines.prepare import prepare
    from pipelines.rollout import rollout
    from pipelines.train import train

    prepare(p)
    assert rollout(p)["skipped"]
    label(p)
    featurize(p)
    return train(p)


def test_imported_table_trains_and_reports_metrics(tmp_path):
    outcome_table(tmp_path / "table.csv")
    m = run_to_train(params_for(tmp_path, tmp_path / "table.csv"))
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["chosen"] in ("constant", "logreg", "lgbm_per_tier", "lgbm_joint")
    for name in ("constant", "logreg", "lgbm_per_tier", "lgbm_joint"):
        for tier in ("direct", "think", "vote"):
            row = saved["models"][name]["per_tier"][tier]
            assert {"log_loss", "brier", "auc"} <= set(row)
    assert set(saved["cost_models"]) == {"constant", "lgbm_joint"}
    # 90 queries, no split column: evaluation cross-fits, so the bundle is fitted on all of them
    assert saved["evaluation"]["cv_folds"] == 5 and saved["train_queries"] == 90
    assert isinstance(saved["lambda"], float)
    # the signal (number size) is in the lexical features: the chosen model must beat the base rate
    assert m["cv_brier"] < m["constant_cv_brier"]
    assert (tmp_path / "train" / "model.json").exists()
    assert not list((tmp_path / "train").glob("*.pkl")) and not list((tmp_path / "train").glob("*.joblib"))


def test_splits_disjoint_and_test_split_never_read(tmp_path):
    from pipelines.train import train

    outcome_table(tmp_path / "table.csv")
    p = params_for(tmp_path, tmp_path / "table.csv", evaluate={"cv_folds": 0})  # holdout: test is held out
    first = run_to_train(p)
    assert first["evaluation"]["cv_folds"] == 0
    out = pd.read_parquet(tmp_path / "outcomes.parquet")
    per_query = out.groupby("query_id")["split"].nunique()
    assert (per_query == 1).all()
    splits = {s: set(g["query_id"]) for s, g in out.groupby("split")}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    # poison every test row: if train read them, its models or metrics would change
    out.loc[out["split"] == "test", "p_correct"] = np.nan
    out.loc[out["split"] == "test", "cost"] = -1e9
    out.to_parquet(tmp_path / "outcomes.parquet", index=False)
    second = train(p)
    assert second["cv_brier"] == pytest.approx(first["cv_brier"], abs=1e-12)
    assert second["chosen"] == first["chosen"]


def test_new_candidates_fit_and_reload_with_equal_predictions(tmp_path):
    """Every candidate (gain models, cumulative, blend, PCA-projected trees) predicts the same
    after a save/load round trip in data formats, and through inner cross-validation."""
    from pipelines import learn
    from pipelines.artifacts import Dataset
    from pipelines.config import PolicyConfig, TrainConfig
    from router.models import load_predictor

    rng = np.random.default_rng(0)
    n = 120
    X = np.concatenate([rng.normal(size=(n, 3)), rng.normal(size=(n, 40))], axis=1)
    hard = X[:, 0] > 0
    Y = np.stack([np.where(hard, 0.1, 0.9), np.where(hard, 0.7, 0.95)], axis=1)
    Y = (rng.random(Y.shape) < Y).astype(float)
    Cost = np.stack([np.full(n, 2.0), 100 + 50 * (X[:, 1] > 0)], axis=1)
    tiers = [{"name": "direct", "model": "m", "budget": 0, "samples": 1},
             {"name": "cot", "model": "m", "budget": 256, "samples": 1}]
    ds = Dataset([f"q{i}" for i in range(n)], np.array(["train"] * n), X, Y, Cost, tiers,
                 ["a", "b", "c"] + [f"emb_{i}" for i in range(40)])
    cfg = TrainConfig(candidates=("constant", "logreg", "knn", "lgbm_gain", "ridge_gain", "sufficient", "blend",
                                  "lgbm_joint", "lgbm_per_tier"), tree_embedding_dims=8,
                      lgbm={**TrainConfig().lgbm, "n_estimators": 80})
    rows = np.arange(90)
    for name in cfg.candidates:
        m = learn.fit_success(name, ds, rows, cfg)
        d = tmp_path / name
        d.mkdir()
        again = load_predictor(d, m.save(d, "s_"))
        np.testing.assert_allclose(again.predict(X[90:]), m.predict(X[90:]), atol=1e-9)
        assert m.predict(X[90:]).shape == (30, 2)
    fit = learn.fit_router(ds, rows, cfg, PolicyConfig())
    assert fit.chosen in cfg.candidates and set(fit.report["models"]) == set(cfg.candidates)
    assert fit.cost_model == "lgbm_joint"  # the cot tier's cost varies with feature b
    assert 0 <= fit.success.predict(X[90:]).min() and fit.success.predict(X[90:]).max() <= 1


@pytest.mark.parametrize("case", ["one_tier", "never_solved", "equal_costs", "nan_cost", "few_queries"])
def test_bad_tables_get_a_clear_error_or_a_documented_fallback(tmp_path, case, caplog):
    """The issue's bad inputs: a clear ValueError before any model is fitted, or a documented
    fallback (a warning in train.json, bad rows in the label report, fewer folds)."""
    from pipelines.evaluate import evaluate

    outcome_table(tmp_path / "table.csv", n=40 if case != "few_queries" else 9)
    df = pd.read_csv(tmp_path / "table.csv")
    if case == "one_tier":
        df = df[df["tier"] == "think"]
    elif case == "never_solved":
        df.loc[df["tier"] == "vote", "correct"] = 0
    elif case == "equal_costs":
        df["cost"] = 7
    elif case == "nan_cost":
        df["cost"] = df["cost"].astype(float)
        df.loc[(df["query_id"] == "q003") & (df["tier"] == "think"), "cost"] = np.nan
    df.to_csv(tmp_path / "table.csv", index=False)
    p = params_for(tmp_path, tmp_path / "table.csv",
                   evaluate={"metrics": str(tmp_path / "evaluate.json"), "plots_dir": str(tmp_path / "plots"),
                             "bootstrap": 20})
    if case == "one_tier":
        with pytest.raises(ValueError, match="at least two tiers"):
            run_to_train(p)
        return
    m = run_to_train(p)
    ev = evaluate(p)
    if case == "never_solved":
        assert any("vote never solves" in w for w in m["warnings"])
        assert ev["tier_mix"].get("vote", 0.0) == 0.0
    elif case == "equal_costs":
        assert any("costs the same" in w for w in m["warnings"])
        assert ev["apgr"] is None and ev["compute_saved_at_iso_accuracy"] is not None
    elif case == "nan_cost":
        report = json.loads((tmp_path / "label.json").read_text())
        assert any("cost" in b["reason"] for b in report["bad_rows"])  # reported with its line number
        assert ev["evaluated_queries"] == 39  # the query with the NaN cost is left out, not guessed
    elif case == "few_queries":
        assert ev["cv_folds"] == 2 and "reduced to 2 folds" in ev["evaluation"]
        with pytest.raises(ValueError, match="too few to cross-fit"):
            from pipelines.learn import evaluation_folds
            from pipelines.config import EvaluateConfig

            evaluation_folds({"queries": 6, "by_split": {}, "splits_from": "hash"}, EvaluateConfig())


def test_featurize_embeds_only_new_queries(tmp_path):
    from pipelines.artifacts import read_features
    from pipelines.featurize import featurize
    from pipelines.artifacts import write_queries
    from pipelines.queries import Query

    qs = [Query.create(f"How many apples are in {i} baskets of 3?", str(3 * i), "gsm8k", "t") for i in range(25)]
    p = parse_params({"prepare": {"out": str(tmp_path / "q.parquet")},
                      "featurize": {"out": str(tmp_path / "f.parquet")}})
    write_queries(qs, tmp_path / "q.parquet")
    assert featurize(p)["embedded"] == 25
    more = qs + [Query.create(f"What is {i} squared?", str(i * i), "gsm8k", "t") for i in range(10)]
    write_queries(more, tmp_path / "q.parquet")
    stats = featurize(p)
    assert stats["embedded"] == 10 and stats["cached"] == 25
    df, spec = read_features(tmp_path / "f.parquet")
    assert len(df) == 35 and df.shape[1] == 1 + len(spec.feature_names())
    assert featurize(p)["embedded"] == 0


def test_featurize_with_the_static_embedding_recomputes_and_matches_the_runtime_encoder(tmp_path, monkeypatch):
    import pipelines.static_distill as sd
    from pipelines.artifacts import read_features
    from pipelines.featurize import featurize
    from pipelines.artifacts import write_queries
    from pipelines.queries import Query
    from router.featurizer import MINILM_STATIC
    from router.static_encoder import StaticEncoder

    qs = [Query.create(f"How many legs do {i} spiders have?", str(8 * i), "gsm8k", "t") for i in range(12)]
    write_queries(qs, tmp_path / "q.parquet")
    base = {"prepare": {"out": str(tmp_path / "q.parquet")},
            "featurize": {"out": str(tmp_path / "f.parquet"), "embedding": "all-MiniLM-L6-v2"}}
    featurize(parse_params(base))
    files = sd.static_files()  # distilled once per machine: the cache is reused from here on
    monkeypatch.setattr(sd, "distill_table", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-distilled")))
    p = parse_params({**base, "featurize": {**base["featurize"], "embedding": MINILM_STATIC}})
    assert featurize(p)["embedded"] == 12  # another spec: the contextual cache is not reused
    assert parse_params({}).featurize.embedding == MINILM_STATIC  # the default
    df, spec = read_features(tmp_path / "f.parquet")
    assert spec.embedding == MINILM_STATIC
    emb = df[[c for c in df.columns if c.startswith("emb_")]].to_numpy()
    want = StaticEncoder(files["table"], files["tokenizer"]).encode([q.text for q in qs])
    assert np.array_equal(emb.astype(np.float32), want)
    with pytest.raises(Exception, match="computed by"):
        featurize(parse_params({**base, "featurize": {**base["featurize"], "embedding": MINILM_STATIC,
                                                      "encoder": "onnx"}}))
