"""``python -m pipelines drift``: PSI/KS on features and predicted p(correct), tier mix, OOD rate, cost
and accuracy per tier; a shift of the query mix toward the hardest queries is flagged (also in a
50-request window), the same mix is not, and broken answers flag accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import DriftConfig
from pipelines.drift import compare_columns, psi
from router import Router
from tests.router.bundle_fixture import session_proxy_bundle, synthetic_queries
from tests.traffic import feedback_of, proxy_traffic, run_drift, write_features

WINDOW = 200


def test_psi_is_zero_for_the_same_sample_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 5000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    values = [psi(ref, rng.normal(shift, 1, 2000)) for shift in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[0] < 0.02 and values[-1] > 0.25
    flags = compare_columns({"a": ref, "b": ref}, {"a": rng.normal(1, 1, 500), "b": rng.normal(0, 1, 500)},
                            DriftConfig())
    assert flags["a"]["flag"] and not flags["b"]["flag"]
    # a constant feature (a lexical count that never fires) has one bin and no drift
    assert psi(np.zeros(100), np.zeros(50)) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Training features of the bundle's query mix; two production windows through the proxy:
    the same mix, and the mix shifted to the hardest queries (6-7 digit numbers)."""
    bundle = session_proxy_bundle(tmp_path_factory)
    router = Router.load(bundle.path)
    d = tmp_path_factory.mktemp("drift")
    write_features(router, synthetic_queries(600, seed=0)[0], d / "features.parquet")  # the training mix
    windows = {}
    for name, seed, keep in (("same", 21, None), ("hard", 22, (6, 7))):
        texts, digits = synthetic_queries(1400, seed=seed)
        pick = [i for i, dg in enumerate(digits) if keep is None or dg in keep][:WINDOW]
        answers = proxy_traffic(router, [texts[i] for i in pick], d / f"{name}.jsonl", log_text=True)
        windows[name] = [body["router"] for _, body, _ in answers]
    return bundle.path, d, windows


def test_the_same_mix_with_calibrated_outcomes_is_not_flagged(setup):
    bundle, d, windows = setup
    rng = np.random.default_rng(1)
    recs = windows["same"]
    correct = (rng.uniform(size=len(recs)) < np.array([r["p_correct"] for r in recs])).astype(float)
    rep = run_drift(bundle, d, feedback_of(d, "same", "same", recs, correct), "same")
    assert rep["production_rows"] == WINDOW and rep["production_features_from"]
    assert rep["drift"] is False and rep["flags"] == [], rep["flags"]
    assert rep["features"]["compared"] == len(Router.load(bundle).featurizer.feature_names)
    assert rep["tier_mix_tv"] < DriftConfig().tier_mix_tv
    assert all(not v["flag"] for v in rep["accuracy_per_tier"].values())
    assert (d / "same.png").stat().st_size > 0


def test_a_shift_to_the_hardest_queries_is_flagged_within_50_requests(setup):
    bundle, d, windows = setup
    recs = windows["hard"]
    production = feedback_of(d, "hard", "hard", recs, [r["p_correct"] for r in recs])  # soft outcomes as predicted
    rep = run_drift(bundle, d, production, "hard")
    assert rep["drift"] is True
    assert {"log_max_number", "log_digits"} <= set(rep["features"]["flagged"])
    assert any(v["flag"] for v in rep["predicted_p_correct"].values())
    assert rep["tier_mix_tv"] > DriftConfig().tier_mix_tv
    assert not any(v["flag"] for v in rep["accuracy_per_tier"].values())  # outcomes as predicted
    small = run_drift(bundle, d, production, "hard50", "--last", "50")
    assert small["production_rows"] == 50 and small["drift"] is True
    tiny = run_drift(bundle, d, production, "hard20", "--last", "20")  # below drift.min_rows
    assert tiny["drift"] is False and "min_rows" in tiny["note"]


def test_answers_worse_than_predicted_flag_accuracy(setup):
    bundle, d, windows = setup
    recs = windows["same"]
    rep = run_drift(bundle, d, feedback_of(d, "same", "broken", recs, np.zeros(len(recs))), "broken")
    flagged = [t for t, v in rep["accuracy_per_tier"].items() if v["flag"]]
    assert flagged and rep["drift"] is True
    assert all(rep["accuracy_per_tier"][t]["requests"] >= DriftConfig().min_tier_rows for t in flagged)
    assert not rep["features"]["flagged"]  # the queries did not change, the answers did
