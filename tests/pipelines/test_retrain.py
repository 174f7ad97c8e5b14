"""Retraining with production rows mixed in (``pipelines retrain``), against a concept shift that a
per-tier map of p cannot express: the upstream "small" model got worse on long numbers only
(truth logits of its tiers SHIFT lower on 5-7 digit queries, the "big" model unchanged).

Traffic of the training mix goes through the proxy (exploration 0.2, logged text), outcomes are
drawn from the shifted truth, and ``feedback`` joins them. Then: without a drift flag the bundle
passes through; with ``--when always`` the retrained bundle's cross-fitted Brier falls, it verifies
and routes, and on fresh queries its predictions are closer to the shifted truth than the original
bundle's and than the recalibrated one's (recalibration lowers every small-tier p alike)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.__main__ import main as pipelines_main
from router import Router
from router.bundle import read_manifest
from tests.router.bundle_fixture import PROXY_TIERS, session_proxy_bundle, synthetic_queries, true_p_correct
from tests.traffic import proxy_traffic, write_labelled

COMMON = ["--set", "mlflow.enabled=false"]
SHIFT = 3.0  # logits of the small model's tiers on 5-7 digit queries, in production


def shifted_truth(digits: np.ndarray) -> np.ndarray:
    logit_shift = np.where(digits[:, None] >= 5, -SHIFT, 0.0) * np.array([t[1] == "small" for t in PROXY_TIERS])
    return true_p_correct(digits, PROXY_TIERS, logit_shift)


def labelled(built, d) -> list[str]:
    """The bundle's training queries as the pipeline's labelled table; the --set keys naming it."""
    sections = write_labelled(Router.load(built.path), built.texts, built.Y, built.Cost, d,
                              [f"q{i:04d}" for i in range(len(built.texts))], split=built.split)
    return ["--set", f"label.out={sections['label']['out']}", "--set", f"label.tiers_out={sections['label']['tiers_out']}",
            "--set", f"featurize.out={sections['featurize']['out']}"]


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    built = session_proxy_bundle(tmp_path_factory)
    d = tmp_path_factory.mktemp("retrain")
    label_args = labelled(built, d)
    texts, digits = synthetic_queries(600, seed=41)
    answers = proxy_traffic(Router.load(built.path), texts, d / "decisions.jsonl", explore=0.2, log_text=True)
    names = [t[0] for t in PROXY_TIERS]
    truth = shifted_truth(digits)
    rng = np.random.default_rng(0)
    routed = [body["router"] for _, body, _ in answers]
    p = np.array([truth[i, names.index(r["tier"])] for i, r in enumerate(routed)])
    pd.DataFrame({"request_id": [r["request_id"] for r in routed],
                  "correct": (rng.random(len(p)) < p).astype(float)}).to_csv(d / "outcomes.csv", index=False)
    pipelines_main(["feedback", "--decisions", str(d / "decisions.jsonl"), "--outcomes", str(d / "outcomes.csv"),
                    "--out", str(d / "production"), *COMMON])
    (d / "no_drift.json").write_text(json.dumps({"drift": False}))
    fb = ["--bundle", str(built.path), "--feedback", str(d / "production" / "feedback.parquet")]
    pipelines_main(["retrain", *fb, "--drift", str(d / "no_drift.json"), "--out", str(d / "kept"),
                    "--report", str(d / "kept.json"), *COMMON, *label_args])
    pipelines_main(["retrain", *fb, "--when", "always", "--out", str(d / "retrained"),
                    "--report", str(d / "retrain.json"), *COMMON, *label_args])
    pipelines_main(["recalibrate", *fb, "--out", str(d / "recalibrated"), "--report", str(d / "recalibrate.json"),
                    *COMMON])
    return built, d


def test_no_drift_flag_passes_the_bundle_through(loop):
    built, d = loop
    rep = json.loads((d / "kept.json").read_text())
    assert rep["applied"] is False and "flags no drift" in rep["why"]
    assert Router.load(d / "kept").bundle_sha256 == Router.load(built.path).bundle_sha256


def test_retraining_lowers_the_cross_fitted_brier_and_writes_a_verified_bundle(loop):
    built, d = loop
    rep = json.loads((d / "retrain.json").read_text())
    assert rep["applied"] is True and rep["rows"] == 600 and rep["labelled_queries"] == len(built.texts), rep
    assert rep["brier_after"] < rep["brier_before"] - 0.02, rep
    m = read_manifest(d / "retrained")  # every file's sha256 checked
    assert m["success"]["kind"] == "corrected" and m["success"]["base"] == built.manifest["success"]
    assert m["retraining"]["parent_sha256"] == Router.load(built.path).bundle_sha256
    assert m["cost"] == built.manifest["cost"] and m["policy"] == built.manifest["policy"]


def test_the_retrained_bundle_follows_the_shift_where_recalibration_cannot(loop):
    built, d = loop
    texts, digits = synthetic_queries(140, seed=99)  # fresh queries, not in the log
    truth = shifted_truth(digits)
    small = np.array([t[1] == "small" for t in PROXY_TIERS])
    names = [t[0] for t in PROXY_TIERS]
    err, acc = {}, {}
    for name in ("original", "recalibrated", "retrained"):
        r = Router.load(built.path if name == "original" else d / name)
        _, P, _ = r.predict(texts)
        err[name] = float(np.abs(P[:, small] - truth[:, small]).mean())
        chosen = [names.index(x.tier) for x in r.route_batch(texts)]
        acc[name] = float(truth[np.arange(len(texts)), chosen].mean())  # replay under the shifted truth
    # measured (seeds 99, 5, 7 of the fresh queries): mean |p - truth| on the small tiers 0.18 ->
    # 0.14 recalibrated, 0.10 retrained; replayed accuracy 0.73-0.77 -> 0.96 either way
    assert err["retrained"] < err["original"] - 0.05, err
    assert err["retrained"] < err["recalibrated"] - 0.02, err
    assert acc["retrained"] > acc["original"] + 0.1, acc
    decisions = Router.load(d / "retrained").route_batch(texts + [""])
    assert {x.tier for x in decisions} <= set(names) and decisions[-1].reason == "fallback:empty-query"


def test_logs_without_text_pass_the_bundle_through_and_say_why(loop, tmp_path):
    built, d = loop
    df = pd.read_parquet(d / "production" / "feedback.parquet")
    df["text"] = None
    df.to_parquet(tmp_path / "no_text.parquet")
    pipelines_main(["retrain", "--bundle", str(built.path), "--feedback", str(tmp_path / "no_text.parquet"),
                    "--when", "always", "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), *COMMON])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["applied"] is False and rep["excluded"]["no_text"] == 600 and "--log-text" in rep["why"], rep
    assert Router.load(tmp_path / "out").bundle_sha256 == Router.load(built.path).bundle_sha256
