"""Evaluate and export on an imported outcome table: metric keys, plots, the bundle, the
MLflow registered model, and parity between the exported runtime and the training model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import parse_params
from tests.pipelines.test_train import outcome_table, params_for, promotion_paths, raw_params, run_to_train

CONTRACT_KEYS = (
    "router_accuracy", "router_mean_cost", "best_fixed_tier", "best_fixed_accuracy", "best_fixed_mean_cost",
    "compute_saved_at_iso_accuracy", "accuracy_gain_at_iso_cost", "apgr", "cpt50", "cpt80", "aiq",
    "oracle_accuracy", "oracle_mean_cost", "ece", "brier", "evaluated_queries", "cv_folds", "baselines",
    "apgr_vs_logreg", "apgr_vs_logreg_ci",
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import yaml

    from pipelines import evaluate, export

    tmp = tmp_path_factory.mktemp("pipe")
    outcome_table(tmp / "table.csv", n=160)
    raw = raw_params(tmp, tmp / "table.csv",
                     evaluate={"metrics": str(tmp / "evaluate.json"), "plots_dir": str(tmp / "plots"), "bootstrap": 100},
                     export={"out_dir": str(tmp / "router"), "onnx_encoder": False, **promotion_paths(tmp)})
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    p = params_for(tmp, tmp / "table.csv", **{k: raw[k] for k in ("evaluate", "export")})
    run_to_train(p)
    # through the stages' command line, as a user runs them: export registers inside its MLflow run
    ev = evaluate.main(["--params", str(tmp / "params.yaml")])
    ex = export.main(["--params", str(tmp / "params.yaml")])
    return tmp, p, ev, ex


def test_evaluate_writes_contract_keys_and_plots(pipeline):
    tmp, p, ev, _ = pipeline
    saved = json.loads((tmp / "evaluate.json").read_text())
    for k in CONTRACT_KEYS:
        assert k in saved, k
    for k in ("router_accuracy", "router_mean_cost", "compute_saved_at_iso_accuracy", "apgr"):
        lo, hi = saved[f"{k}_ci"]
        assert lo <= hi
    # 160 queries, no split column of the table's own: every query is predicted out of fold
    assert saved["cv_folds"] == 5 and saved["evaluated_queries"] == 160 and len(saved["folds"]) == 5
    assert set(saved["baselines"]) == {"constant", "logreg", "random"}  # knn needs an embedding
    for b in saved["baselines"].values():
        assert {"apgr", "compute_saved_at_iso_accuracy", "aiq"} <= set(b)
    assert saved["baselines"]["random"]["apgr"] >= 0.5 - 1e-9  # the hull of fixed tiers: 0.5 or above
    lo, hi = saved["apgr_vs_logreg_ci"]
    assert lo <= saved["apgr_vs_logreg"] <= hi
    assert saved["oracle_accuracy"] >= saved["best_fixed_accuracy"] - 1e-9
    assert saved["oracle_accuracy"] >= saved["router_accuracy"] - 1e-9
    for f in ("pareto.png", "calibration.png", "tier_mix.png", "router_curve.csv", "fixed_tiers.csv",
              "calibration.csv", "tier_mix.csv", "baseline_curves.csv"):
        assert (tmp / "plots" / f).stat().st_size > 0
    # the table has a learnable signal: the router must beat a random mix of fixed tiers
    assert saved["apgr"] > 0.5


def test_bundle_manifest_hashes_and_no_pickle(pipeline):
    from router.bundle import read_manifest

    tmp, *_ = pipeline
    m = read_manifest(tmp / "router")
    assert m["schema_version"] == 1 and m["files"]
    assert {"lambda", "fallback_tier", "cheapest_tier"} <= set(m["policy"])
    assert "lightgbm" in m["versions"] and m["metrics"]["router_accuracy"] is not None
    suffixes = {f.rsplit(".", 1)[-1] for f in m["files"]}
    assert suffixes <= {"json", "txt", "npy", "onnx"}, suffixes


def test_a_bundle_of_an_outcome_table_routes_but_says_it_cannot_be_executed(pipeline):
    """An imported table's tiers name no model the params declare: no execution settings."""
    from router import BundleError, Router

    tmp, *_ = pipeline
    r = Router.load(tmp / "router")
    assert "execution" not in r.manifest and r.route("What is 2 + 3?").tier
    model = r.tiers[0].model
    with pytest.raises(BundleError, match=rf"no execution settings for model\(s\) \['{model}'\]"):
        r.execution(model)


def test_runtime_matches_training_model_on_held_out_rows(pipeline):
    from pipelines.artifacts import load_dataset, load_model
    from router import Router

    tmp, p, *_ = pipeline
    success, cost, _ = load_model(tmp / "train")
    test = load_dataset(p.label, p.featurize, ("test",))
    r = Router.load(tmp / "router")
    np.testing.assert_allclose(r.success.predict(test.X), success.predict(test.X), atol=1e-6, rtol=0)
    np.testing.assert_allclose(r.cost.predict(test.X), cost.predict(test.X), atol=1e-6, rtol=0)
    # and end to end from text: the runtime's featurizer computes the same rows
    import pandas as pd

    texts = pd.read_parquet(p.prepare.out).set_index("query_id").loc[test.query_ids, "text"].tolist()
    _, P, _ = r.predict(texts)
    np.testing.assert_allclose(P, np.clip(success.predict(test.X), 0, 1), atol=1e-6, rtol=0)
    d = r.route(texts[0])
    assert d.tier in [t["name"] for t in test.tiers] and d.reason.startswith(("utility", "fallback"))


def test_registered_model_loads_by_alias(pipeline):
    import mlflow
    import pandas as pd

    tmp, _, _, ex = pipeline
    assert ex["registered"] is not None
    model = mlflow.pyfunc.load_model("models:/difficulty-router@champion")
    out = model.predict(pd.DataFrame({"text": ["What is 3 + 4?", ""]}))
    assert list(out.columns)[:3] == ["tier", "budget", "samples"]
    assert out.loc[1, "reason"] == "fallback:empty-query"


@pytest.fixture(scope="module")
def default_pipeline(tmp_path_factory):
    """The contextual export path: MiniLM features, the ONNX encoder shipped in the bundle (with
    export's own parity check against sentence-transformers), every default candidate."""
    import yaml

    from pipelines import evaluate, export

    tmp = tmp_path_factory.mktemp("default-export")
    outcome_table(tmp / "table.csv", n=60)
    # holdout mode: the bundle is fitted on train + val, so the test split is truly held out here
    raw = raw_params(tmp, tmp / "table.csv",
                     evaluate={"metrics": str(tmp / "evaluate.json"), "plots_dir": str(tmp / "plots"), "bootstrap": 50,
                               "cv_folds": 0},
                     export={"out_dir": str(tmp / "router"), **promotion_paths(tmp)})
    raw["featurize"] = {"out": str(tmp / "features.parquet"), "embedding": "all-MiniLM-L6-v2"}  # its default encoder
    raw["train"].pop("candidates")  # the default candidates, knn included
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    p = parse_params(raw)
    assert p.featurize.embedding == "all-MiniLM-L6-v2" and p.export.onnx_encoder
    run_to_train(p)
    evaluate.main(["--params", str(tmp / "params.yaml")])
    export.main(["--params", str(tmp / "params.yaml")])
    return tmp, p


def test_default_export_ships_onnx_and_routes_like_training(default_pipeline):
    import pandas as pd

    from pipelines.artifacts import load_dataset, load_model
    from pipelines.featurize import make_featurizer
    from router import Router

    tmp, p = default_pipeline
    ev = json.loads((tmp / "evaluate.json").read_text())
    assert ev["cv_folds"] == 0 and ev["evaluated_queries"] == ev["test_queries"] > 0
    assert {"constant", "logreg", "knn", "random"} == set(ev["baselines"])
    r = Router.load(tmp / "router")  # auto: the bundle's ONNX encoder, no torch needed
    assert r.featurizer.encoder_name == "onnx"
    assert r.manifest["encoder"]["onnx"].endswith(".onnx")
    test = load_dataset(p.label, p.featurize, ("test",))
    texts = pd.read_parquet(p.prepare.out).set_index("query_id").loc[test.query_ids, "text"].tolist()
    X_runtime = r.featurizer.transform(texts)
    X_train = make_featurizer(p.featurize).transform(texts)  # sentence-transformers, as featurize ran
    np.testing.assert_allclose(X_runtime, X_train, atol=1e-5, rtol=0)
    success, _, _ = load_model(tmp / "train")
    _, P, C = r.predict(texts)
    np.testing.assert_allclose(P, np.clip(success.predict(test.X), 0, 1), atol=1e-5, rtol=0)
    routed = [(d, r.tiers[r.decide(P[j], C[j])[0]].name) for j, d in enumerate(r.route_batch(texts))]
    utility = [(d.tier, want) for d, want in routed if d.reason.startswith("utility")]
    assert utility and all(got == want for got, want in utility)


def _adaptive_case(n=400, seed=0):
    """Two static tiers (cheap weak, dear strong) and an adaptive one as accurate as the strong
    tier at half its cost but with twice its latency; predictions equal the truth."""
    hard = np.random.default_rng(seed).permutation(n) < n // 2  # exactly half
    Y = np.stack([np.where(hard, 0.0, 1.0), np.ones(n), np.ones(n)], axis=1)
    Cost = np.stack([np.full(n, 10.0), np.full(n, 100.0), np.full(n, 50.0)], axis=1)
    Lat = np.stack([np.full(n, 10.0), np.full(n, 25.0), np.full(n, 50.0)], axis=1)
    return Y, Cost, Lat


def test_adaptive_compute_saved_vs_static_is_what_the_adaptive_tier_saves():
    from pipelines.evaluate import adaptive_vs_static
    from pipelines.routing_metrics import curve, lambda_grid

    Y, Cost, Lat = _adaptive_case()
    adaptive = np.array([False, False, True])
    lam = np.full(len(Y), 1e-4)  # accuracy first: the static router sends hard queries to the strong tier
    choice = curve(Y, Cost, Y, Cost, lambda_grid(Cost, 120))[0]
    out = adaptive_vs_static(Y, Cost, Y, Cost, Lat, lam, adaptive, choice, 200, 0)
    assert out["static_router_accuracy"] == pytest.approx(1.0)
    # static: easy queries 10, hard 100 -> mean 55; adaptive: easy 10, hard 50 -> mean 30
    assert out["adaptive_compute_saved_vs_static"] == pytest.approx(1 - 30 / 55, abs=0.02)
    lo, hi = out["adaptive_compute_saved_vs_static_ci"]
    assert lo <= out["adaptive_compute_saved_vs_static"] <= hi and hi - lo < 0.1
    # latency: static 0.5*10 + 0.5*25 = 17.5; adaptive at most 0.5*10 + 0.5*50 = 30 (the sweep's hull
    # may mix in cheaper-latency points): the adaptive tier costs wall time
    assert out["static_router_mean_latency_tokens"] == pytest.approx(17.5)
    assert 1 - 30 / 17.5 - 1e-9 <= out["adaptive_latency_saved_vs_static"] < 0


def test_adaptive_vs_static_is_absent_without_both_kinds_of_tier():
    from pipelines.evaluate import adaptive_vs_static

    Y, Cost, Lat = _adaptive_case()
    choice = np.zeros((3, len(Y)), dtype=np.int64)
    lam = np.zeros(len(Y))
    assert adaptive_vs_static(Y, Cost, Y, Cost, Lat, lam, np.array([False] * 3), choice, 10, 0) is None
    assert adaptive_vs_static(Y, Cost, Y, Cost, Lat, lam, np.array([True] * 3), choice, 10, 0) is None
