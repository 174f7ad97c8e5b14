"""Recalibration on production outcomes: traffic through the proxy (decision log), outcomes drawn from
a truth 0.3 below the bundle's predictions, ``pipelines feedback``, then ``pipelines recalibrate``:
out-of-sample Brier and ECE fall, the new bundle verifies, loads and routes with lower predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.__main__ import main as pipelines_main
from router import Router
from router.bundle import read_manifest
from tests.router.bundle_fixture import session_proxy_bundle, synthetic_queries
from tests.traffic import proxy_traffic

COMMON = ["--set", "mlflow.enabled=false"]
SHIFT = 0.3  # the truth is this far below what the bundle predicts


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    bundle = session_proxy_bundle(tmp_path_factory).path
    d = tmp_path_factory.mktemp("recalibrate")
    texts, _ = synthetic_queries(400, seed=31)
    answers = proxy_traffic(Router.load(bundle), texts, d / "decisions.jsonl", explore=0.2, log_text=True)
    routed = [body["router"] for _, body, _ in answers]
    rng = np.random.default_rng(0)
    truth = np.clip(np.array([r["p_correct"] for r in routed]) - SHIFT, 0.0, 1.0)
    pd.DataFrame({"request_id": [r["request_id"] for r in routed],
                  "correct": (rng.random(len(truth)) < truth).astype(float)}).to_csv(d / "outcomes.csv", index=False)
    pipelines_main(["feedback", "--decisions", str(d / "decisions.jsonl"), "--outcomes", str(d / "outcomes.csv"),
                    "--out", str(d / "production"), *COMMON])
    pipelines_main(["recalibrate", "--bundle", str(bundle), "--feedback", str(d / "production" / "feedback.parquet"),
                    "--out", str(d / "recalibrated"), "--report", str(d / "recalibrate.json"), *COMMON])
    return bundle, d, json.loads((d / "recalibrate.json").read_text())


def test_out_of_sample_brier_and_ece_fall(recalibrated):
    _, _, rep = recalibrated
    assert rep["rows"] == 400 and rep["prediction_source"] == "logged" and rep["applied"] is True
    own = [n for n, k in rep["maps"].items() if k == "own"]
    assert own and set(rep["maps"].values()) <= {"own", "pooled"}
    assert rep["brier_after"] < rep["brier_before"] - 0.03, rep
    assert rep["ece_after"] < rep["ece_before"] / 2, rep
    for name in own:
        t = rep["per_tier"][name]
        # the predictions were SHIFT too high; cross-fitted maps bring them to the observed rate
        assert t["predicted_before"] - t["observed"] > 0.15
        assert abs(t["predicted_after"] - t["observed"]) < 0.06, (name, t)


def test_the_recalibrated_bundle_verifies_loads_and_routes_lower(recalibrated):
    bundle, d, rep = recalibrated
    m = read_manifest(d / "recalibrated")  # every file's sha256 checked
    assert m["success"]["kind"] == "calibrated" and m["recalibration"]["rows"] == 400
    assert m["recalibration"]["parent_sha256"] == Router.load(bundle).bundle_sha256
    old, new = Router.load(bundle), Router.load(d / "recalibrated")
    texts, _ = synthetic_queries(60, seed=99)  # fresh queries of the same mix
    _, P0, C0 = old.predict(texts)
    _, P1, C1 = new.predict(texts)
    np.testing.assert_allclose(C1, C0)  # only the success model changed
    names = [t.name for t in new.tiers]
    truth = np.clip(P0 - SHIFT, 0.0, 1.0)  # what the outcomes were drawn from
    for j, name in enumerate(names):  # every tier gets a map: its own, or the pooled one
        before, after = np.abs(P0[:, j] - truth[:, j]).mean(), np.abs(P1[:, j] - truth[:, j]).mean()
        # a tier's own map is fitted on its outcomes; the pooled one is fitted on all tiers'
        # and cannot follow the clipping at 0 on a tier whose predictions are low, so it only
        # has to move the tier a good part of the way
        assert after < before * (0.5 if rep["maps"][name] == "own" else 0.8), (name, before, after)
        assert P1[:, j].mean() < P0[:, j].mean(), name
    decisions = new.route_batch(texts + [""])
    assert all(x.tier in names for x in decisions) and decisions[-1].reason == "fallback:empty-query"
    assert sum(x.reason.startswith("utility") for x in decisions) > 30


def test_too_few_outcomes_pass_the_bundle_through_unchanged(recalibrated, tmp_path):
    bundle, d, _ = recalibrated
    df = pd.read_parquet(d / "production" / "feedback.parquet")
    df.loc[df.index[10:], "correct"] = np.nan
    df.to_parquet(tmp_path / "few.parquet")
    pipelines_main(["recalibrate", "--bundle", str(bundle), "--feedback", str(tmp_path / "few.parquet"),
                    "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), *COMMON])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["applied"] is False and rep["rows"] == 10 and "needs at least 30" in rep["why"]
    assert Router.load(tmp_path / "out").bundle_sha256 == Router.load(bundle).bundle_sha256


def test_calibrated_traffic_is_not_recalibrated(recalibrated, tmp_path):
    """Outcomes drawn from the bundle's own predictions: the maps would fit noise, so the
    cross-fitted Brier does not fall and the bundle passes through."""
    bundle, d, _ = recalibrated
    df = pd.read_parquet(d / "production" / "feedback.parquet")
    rng = np.random.default_rng(3)
    df["correct"] = (rng.random(len(df)) < df["p_correct"].to_numpy()).astype(float)
    df.to_parquet(tmp_path / "calibrated.parquet")
    pipelines_main(["recalibrate", "--bundle", str(bundle), "--feedback", str(tmp_path / "calibrated.parquet"),
                    "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), *COMMON])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["applied"] is False and rep["brier_after"] >= rep["brier_before"], rep
    assert Router.load(tmp_path / "out").bundle_sha256 == Router.load(bundle).bundle_sha256


def test_rows_another_bundle_logged_without_text_are_left_out_and_counted(recalibrated, tmp_path):
    """After a new export the log holds the old bundle's rows: those with text are rescored by the
    bundle being recalibrated, those without are counted, not a crash."""
    bundle, d, _ = recalibrated
    df = pd.read_parquet(d / "production" / "feedback.parquet")
    old = df.index[:150]
    df.loc[old, "bundle_sha256"] = "0" * 64
    df.loc[old[:100], "text"] = None
    df.to_parquet(tmp_path / "mixed.parquet")
    pipelines_main(["recalibrate", "--bundle", str(bundle), "--feedback", str(tmp_path / "mixed.parquet"),
                    "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), *COMMON])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["excluded"]["other_bundle_without_text"] == 100 and rep["rows"] == 300, rep
    assert rep["prediction_source"] == "logged+text" and rep["applied"] is True
