"""Label stage: outcomes from rollout records (subset estimator, costs) and table import."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_params
from pipelines.estimators import majority_vote_accuracy
from pipelines.label import add_query_labels, outcomes_from_records
from pipelines.outcome_table import import_outcomes
from router.tiers import Tier


def records():
    rows = []
    # query a: 4 samples; at budget 8, answers 3,3,5,None (3 is right); at budget 0 all wrong
    for s, (ans8, tok8, ans0) in enumerate([("3", 6, "1"), ("3", 8, "1"), ("5", 8, "2"), (None, 8, "1")]):
        rows.append(dict(query_id="a", model="m", sample=s, budget=8, vote_key=ans8, correct=ans8 == "3", tokens=tok8))
        rows.append(dict(query_id="a", model="m", sample=s, budget=0, vote_key=ans0, correct=False, tokens=2))
    return pd.DataFrame(rows)


def test_outcomes_from_records_match_estimators():
    tiers = [Tier("m-b0-k1", "m", 0, 1, 2.0), Tier("m-b8-k1", "m", 8, 1, 2.0), Tier("m-b8-k3", "m", 8, 3, 2.0)]
    out = outcomes_from_records(records(), tiers, {"a": "train"}).set_index("tier")
    assert out.loc["m-b0-k1", "p_correct"] == 0.0
    assert out.loc["m-b8-k1", "p_correct"] == 0.5
    keys, correct = ["3", "3", "5", None], [True, True, False, False]
    assert out.loc["m-b8-k3", "p_correct"] == pytest.approx(majority_vote_accuracy(keys, correct, 3))
    assert out.loc["m-b8-k3", "cost_tokens"] == pytest.approx(3 * np.mean([6, 8, 8, 8]))
    assert out.loc["m-b8-k3", "cost"] == pytest.approx(2.0 * out.loc["m-b8-k3", "cost_tokens"])
    assert out.loc["m-b8-k3", "latency_tokens"] == 8.0  # every 3-subset contains an 8


def test_query_labels_cheapest_tier_and_difficulty():
    out = pd.DataFrame({
        "query_id": ["a", "a", "b", "b", "c", "c"], "tier": ["t1", "t2"] * 3,
        "p_correct": [0.9, 1.0, 0.1, 0.7, 0.0, 0.2], "cost": [1, 5] * 3,
    })
    lab = add_query_labels(out, threshold=0.5).drop_duplicates("query_id").set_index("query_id")
    assert lab.loc["a", "cheapest_tier"] == "t1" and lab.loc["a", "difficulty"] == "easy"
    assert lab.loc["b", "cheapest_tier"] == "t2" and lab.loc["b", "difficulty"] != "easy"
    assert lab.loc["c", "cheapest_tier"] == "none" and lab.loc["c", "difficulty"] == "unsolved"


def write_table(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)


def test_import_reports_bad_rows_with_line_numbers(tmp_path):
    rows = []
    for i in range(6):
        for tier, cost in (("small", 10), ("big", 100)):
            rows.append({"query_id": f"q{i}", "text": f"question {i}", "tier": tier, "correct": i % 2, "cost": cost})
    rows[3]["correct"] = 1.5  # line 5
    rows[4]["text"] = ""  # line 6
    rows.append({"query_id": "q9", "text": "x", "tier": "huge", "correct": 1, "cost": ""})  # line 14
    write_table(tmp_path / "t.csv", rows)
    p = parse_params({})
    imported = import_outcomes(str(tmp_path / "t.csv"), p)
    out, tiers, queries, bad = imported.outcomes, imported.tiers, imported.queries, imported.bad
    reasons = {b["line"]: b["reason"] for b in bad}
    assert "correct" in reasons[5] and "text" in reasons[6] and "cost" in reasons[14]
    # q1 lost its big row (line 5) and q2 its small row (line 6): both lack a tier now
    assert {"q1", "q2"} == {b["query_id"] for b in bad if "lacks" in b["reason"]}
    assert [t.name for t in tiers] == ["small", "big"]  # cheapest first, by mean cost (not by name)
    assert set(out["query_id"]) == {"q0", "q3", "q4", "q5"}
    assert len(queries) == 4


def test_import_with_declared_tiers_rejects_undeclared(tmp_path):
    rows = [{"query_id": "q", "text": "t", "tier": "a", "correct": 1, "cost": 1},
            {"query_id": "q", "text": "t", "tier": "zz", "correct": 0, "cost": 3},
            {"query_id": "q", "text": "t", "tier": "b", "correct": 0, "cost": 2}]
    pd.DataFrame(rows).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    p = parse_params({"models": {"a": {}}, "tiers": {"list": [{"name": "a", "model": "a", "budget": 0},
                                                              {"name": "b", "model": "a", "budget": 8}]}})
    imported = import_outcomes(str(tmp_path / "t.jsonl"), p)
    out, bad = imported.outcomes, imported.bad
    assert bad == [{"line": 2, "reason": "tier 'zz' not declared in params", "query_id": "q"}]
    assert out["tier"].tolist() == ["a", "b"]


def test_import_orders_undeclared_tiers_by_mean_cost_then_name(tmp_path):
    rows = [{"query_id": f"q{i}", "text": f"t{i}", "tier": tier, "correct": 1, "cost": cost}
            for i in range(3) for tier, cost in (("a-costly", 50 + i), ("b-cheap", 1), ("c-mid", 10), ("a-mid", 10))]
    write_table(tmp_path / "t.csv", rows)
    tiers = import_outcomes(str(tmp_path / "t.csv"), parse_params({})).tiers
    assert [t.name for t in tiers] == ["b-cheap", "a-mid", "c-mid", "a-costly"]


def test_label_scores_records_with_the_verifier_not_the_rollout():
    """Records carry text only; the same records scored against another gold answer flip."""
    from pipelines.label import score_records
    from pipelines.queries import Query

    rec = pd.DataFrame([
        dict(query_id="q", model="m", sample=0, budget=0, forced=True, answer_text="The final answer is 12.",
             completion=None),
        dict(query_id="q", model="m", sample=0, budget=64, forced=False, answer_text=None,
             completion="6 * 2 = 12. The final answer is 12."),
    ])
    right = score_records(rec, {"q": Query("q", "6 * 2?", "12", "gsm8k", "t", "train")})
    wrong = score_records(rec, {"q": Query("q", "6 * 2?", "13", "gsm8k", "t", "train")})
    assert right["correct"].tolist() == [True, True] and wrong["correct"].tolist() == [False, False]
    assert right["vote_key"].tolist() == ["12", "12"]


def test_adaptive_tiers_are_labelled_from_the_same_records():
    from pipelines.adaptive import Samples, Stage, cascade, vote_until

    df = records()
    df["reasoning_tokens"] = np.where(df["budget"] == 0, 0, df["tokens"])
    df["forced"] = df["budget"] == 0
    static = [Tier("m-b0-k2", "m", 0, 2, 2.0), Tier("m-b8-k3", "m", 8, 3, 2.0)]
    vu = Tier("m-b8-a2k4", "m", 8, 4, 2.0, kind="vote_until", agree=2)
    cas = Tier("m-b0-k2-then-m-b8-k3", "m", 8, 3, 2.0, kind="cascade", chain=("m-b0-k2", "m-b8-k3"))
    out = outcomes_from_records(df, static + [vu, cas], {"a": "val"}).set_index("tier")
    s = Samples(n=4, correct_keys={"3"}, keys={0: ["1", "1", "2", "1"], 8: ["3", "3", "5", None]},
                tokens={0: [2.0] * 4, 8: [6.0, 8.0, 8.0, 8.0]}, reasoning={0: [0.0] * 4, 8: [6.0, 8.0, 8.0, 8.0]},
                forced={0: [True] * 4, 8: [False] * 4})
    want = vote_until(s, 8, 2, 4, price=2.0)
    assert out.loc[vu.name, "p_correct"] == pytest.approx(want.p_correct)
    assert out.loc[vu.name, "cost"] == pytest.approx(want.cost) and out.loc[vu.name, "split"] == "val"
    # never more than the static tier that always draws 4 would cost
    assert out.loc[vu.name, "cost_tokens"] < 4 * np.mean([6, 8, 8, 8])
    want = cascade([Stage("m", 0, 2, 2.0, 0), Stage("m", 8, 3, 2.0, 8)], {"m": s})
    assert out.loc[cas.name, "p_correct"] == pytest.approx(want.p_correct)
    assert out.loc[cas.name, "latency_tokens"] == pytest.approx(want.latency_tokens)


def test_a_table_with_answers_per_sample_gets_votes_and_early_stopping_votes(tmp_path):
    """Several rows per (query, tier) with an ``answer`` column: the tier's samples. The label
    stage derives k-votes and vote_until from them, with the rollout estimators."""
    from pipelines.adaptive import Samples, vote_until
    from pipelines.label import label

    rng = np.random.default_rng(3)
    rows, truth = [], {}
    for i in range(30):
        for tier, cost, p in (("direct", 2.0, 0.3), ("cot", 40.0, 0.7)):
            for s in range(3):
                ok = rng.random() < p
                answer = "7" if ok else ("" if rng.random() < 0.2 else str(rng.integers(1, 4)))
                rows.append({"query_id": f"q{i}", "text": f"question {i}", "tier": tier, "correct": int(ok),
                             "cost": cost + s, "answer": answer})
                truth.setdefault((f"q{i}", tier), []).append((answer, ok, cost + s))
    write_table(tmp_path / "t.csv", rows)
    p = parse_params({"data": {"outcomes": str(tmp_path / "t.csv")},
                      "label": {"out": str(tmp_path / "o.parquet"), "tiers_out": str(tmp_path / "tiers.json"),
                                "report": str(tmp_path / "r.json"), "metrics": str(tmp_path / "m.json")}})
    label(p)
    out = pd.read_parquet(tmp_path / "o.parquet")
    tiers = {t["name"]: t for t in json.loads((tmp_path / "tiers.json").read_text())}
    assert {"direct", "cot", "direct-k2", "direct-k3", "direct-a2k3", "cot-k2", "cot-k3", "cot-a2k3"} == set(tiers)
    assert tiers["cot-a2k3"]["kind"] == "vote_until"
    row = out[(out["tier"] == "cot-a2k3") & (out["query_id"] == "q5")].iloc[0]
    samples = truth[("q5", "cot")]
    s = Samples(n=3, correct_keys={"7"} if any(ok for _, ok, _ in samples) else set(),
                keys={0: [a or None for a, _, _ in samples]}, tokens={0: [c for _, _, c in samples]},
                reasoning={0: [c for _, _, c in samples]}, forced={0: [False] * 3})
    want = vote_until(s, 0, 2, 3)
    assert row["p_correct"] == pytest.approx(want.p_correct) and row["cost"] == pytest.approx(want.cost)
    k3 = out[(out["tier"] == "cot-k3") & (out["query_id"] == "q5")].iloc[0]
    keys = [a or None for a, _, _ in samples]
    assert k3["p_correct"] == pytest.approx(majority_vote_accuracy(keys, [ok for _, ok, _ in samples], 3))
    assert k3["cost"] == pytest.approx(sum(c for _, _, c in samples))
