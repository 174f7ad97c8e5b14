"""The promotion gate on a real MLflow SQLite registry: the first export becomes champion, a worse
candidate becomes challenger with a report of why, a better one moves champion, off-policy evidence
can refuse a candidate, and the manual override moves an alias and is logged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_params
from tests.pipelines.test_train import outcome_table, promotion_paths, raw_params, run_to_train

MODEL = "promotion-test"  # not the other tests' registered model: they share the session's store


def _export(tmp, candidates, **export):
    """Train ``candidates`` on the table, evaluate and export through the stages' command lines."""
    import yaml

    from pipelines import evaluate
    from pipelines import export as export_stage

    raw = raw_params(tmp, tmp / "table.csv",
                     evaluate={"metrics": str(tmp / "evaluate.json"), "plots_dir": str(tmp / "plots"), "bootstrap": 20,
                               "baselines": ["constant"]},
                     export={"out_dir": str(tmp / "router"), "onnx_encoder": False, "registered_model": MODEL,
                             **promotion_paths(tmp), **export},
                     ope={"bootstrap": 50})
    raw["train"]["candidates"] = candidates
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    p = parse_params(raw)
    run_to_train(p)
    evaluate.main(["--params", str(tmp / "params.yaml")])
    ex = export_stage.main(["--params", str(tmp / "params.yaml")])
    return ex, json.loads((tmp / "promotion.json").read_text()), p


def _alias(alias):
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(MODEL, alias).version)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("promotion")
    outcome_table(d / "table.csv", n=120)
    return d


def test_first_champion_then_a_worse_candidate_is_refused_and_the_override_is_logged(tmp):
    from mlflow import MlflowClient

    from pipelines.__main__ import main as pipelines_main

    ex1, rep1, _ = _export(tmp, ["logreg"])
    assert rep1["decision"] == "champion" and "no champion yet" in rep1["reason"] and _alias("champion") == ex1["registered"]

    # a router that cannot tell queries apart: refused on held-out queries, champion stays
    ex2, rep2, _ = _export(tmp, ["constant"])
    assert ex2["promotion"] == "challenger" and rep2["decision"] == "challenger"
    assert _alias("champion") == ex1["registered"] and _alias("challenger") == ex2["registered"]
    held = rep2["checks"]["held_out"]
    assert held["passed"] is False and held["candidate"] < held["champion"]
    assert held["queries"] == 120 and held["champion_figures"]["apgr"] is not None
    # same labelled queries: the champion's own out-of-sample figures, not its in-sample routing
    assert "own out-of-sample" in held["champion_figures"]["source"]
    assert rep2["checks"]["off_policy"] == {"feedback": str(tmp / "feedback.parquet"), "used": False,
                                            "why": "no production feedback"}
    assert rep2["reason"].startswith("refused (held_out)") and "apgr candidate" in rep2["reason"]
    tags = MlflowClient().get_model_version(MODEL, ex2["registered"]).tags
    assert tags["promotion.decision"] == "challenger" and tags["promotion.held_out.passed"] == "False"

    # the manual override: the refused version becomes champion, on the record
    pipelines_main(["promote", "--params", str(tmp / "params.yaml"), "--version", ex2["registered"],
                    "--reason", "test: overriding the gate"])
    assert _alias("champion") == ex2["registered"]
    tags = MlflowClient().get_model_version(MODEL, ex2["registered"]).tags
    assert tags["override.champion.reason"] == "test: overriding the gate"
    assert tags["override.champion.previous"] == ex1["registered"]
    audit = [json.loads(x) for x in (tmp / "promotions.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["alias"], a["version"]) for a in audit] == [
        ("gate", "champion", ex1["registered"]), ("gate", "challenger", ex2["registered"]),
        ("override", "champion", ex2["registered"])]
    with pytest.raises(ValueError, match="no version 99"):
        pipelines_main(["promote", "--params", str(tmp / "params.yaml"), "--version", "99", "--reason", "x"])
    with pytest.raises(ValueError, match="reason is required"):
        pipelines_main(["promote", "--params", str(tmp / "params.yaml"), "--version", "1", "--reason", " "])

    # a better candidate than the (overridden) champion moves the alias
    ex3, rep3, _ = _export(tmp, ["logreg"])
    assert rep3["decision"] == "champion" and _alias("champion") == ex3["registered"], rep3["reason"]
    assert rep3["champion_before"] == ex2["registered"] and rep3["checks"]["held_out"]["difference"] > 0


def _feedback(bundle, texts, correct_if, eps=0.3, seed=0):
    """A feedback table as the proxy + ``pipelines feedback`` write it: ``bundle`` routed ``texts``
    with exploration; an outcome is 1 where ``correct_if(text index, tier)``."""
    from router import Router

    r = Router.load(bundle)
    ids = [f"r{i}" for i in range(len(texts))]
    rows = []
    for i, routed in enumerate(r.route_detailed(texts, keys=ids, explore=eps)):
        d = routed.decision
        j = [t.name for t in r.tiers].index(d.tier)
        rows.append({"request_id": ids[i], "chosen": d.tier, "executed": d.tier, "reason": d.reason,
                     "explored": routed.explored, "explore": routed.explore,
                     "greedy": None if routed.greedy is None else r.tiers[routed.greedy].name,
                     "propensity": routed.propensity, "p_correct": d.p_correct, "lambda": routed.lam,
                     "allowed": json.dumps([{**u, "tier": r.tiers[u["tier"]].name} for u in routed.utilities()]),
                     "observed_cost": float(routed.c[j]) if routed.c is not None else np.nan, "text": texts[i],
                     "correct": float(correct_if(i, d.tier))})
    return pd.DataFrame(rows)


def test_off_policy_evidence_refuses_a_candidate_the_held_out_check_passes(tmp_path):
    """Production says only the tier the champion picks answers a query. A candidate that beats the
    champion on held-out queries but routes some requests elsewhere is refused on that evidence."""
    import shutil

    from pipelines.promotion import compare, value

    outcome_table(tmp_path / "table.csv", n=120)
    ex1, rep1, p = _export(tmp_path, ["constant"], registered_model=MODEL + "-ope")
    assert rep1["decision"] == "champion"
    champion = tmp_path / "champion"
    shutil.copytree(tmp_path / "router", champion)
    texts = pd.read_parquet(p.prepare.out)["text"].tolist() * 2
    from router import Router

    greedy = {i: d.tier for i, d in enumerate(Router.load(champion).route_batch(texts))}
    df = _feedback(champion, texts, lambda i, tier: tier == greedy[i])
    from pipelines import artifacts

    artifacts.write_feedback(df, tmp_path / "feedback.parquet")
    # the next candidate (a real router) routes differently from the constant champion
    ex2, rep2, _ = _export(tmp_path, ["logreg"], registered_model=MODEL + "-ope")
    ope = rep2["checks"]["off_policy"]
    assert ope["used"] is True and ope["rows"] == len(texts)
    assert ope["champion_figures"]["accuracy"] == pytest.approx(1.0, abs=0.05)
    assert rep2["checks"]["held_out"]["passed"] is True
    assert ope["candidate_figures"]["accuracy"] < ope["champion_figures"]["accuracy"]
    assert ope["candidate"] < ope["champion"] and ope["passed"] is False and rep2["decision"] == "challenger" and "off_policy" in rep2["reason"]
    # the pieces: figures by metric, and the margin's direction
    figures = {"router_accuracy": 0.5, "router_mean_cost": 10.0, "apgr": 0.7}
    assert value("router_mean_cost", figures, 0.1) == 10.0 and value("utility", figures, 0.01) == pytest.approx(0.4)
    assert value("apgr", figures, 0.01) == 0.7 and value("aiq", figures, 0.01) is None
    assert compare("router_mean_cost", 9.0, 10.0, 1.0)["passed"] and not compare("router_mean_cost", 9.5, 10.0, 1.0)["passed"]
    assert compare("router_accuracy", 0.7, 0.6, 0.05)["passed"] and not compare("router_accuracy", None, 0.6, 0.0)["passed"]
