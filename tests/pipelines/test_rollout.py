"""Rollout stage logic (plan, records, shards, resume, metrics) on a scripted backend."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.config import parse_params
from pipelines.artifacts import write_queries
from pipelines.queries import Query
from pipelines.rollout import plan_rollout, rollout
from tests.fakes import ScriptedBackend

BUDGETS = [0, 4, 8, 16]


def make_params(tmp, n_max=4, shard_size=2, **rollout_kw):
    raw = {
        "seed": 1,
        "prepare": {"out": str(tmp / "queries.parquet")},
        "models": {"m": {"backend": "llamacpp", "path": "x.gguf", "template": "chatml"}},
        "tiers": {"grid": [{"model": "m", "budgets": BUDGETS, "samples": [1, 2, 4]}]},
        "rollout": {"out": str(tmp / "rollouts"), "metrics": str(tmp / "rollout.json"),
                    "n_max": n_max, "shard_size": shard_size, **rollout_kw},
    }
    return parse_params(raw)


def write_some_queries(tmp, n=7):
    qs = [Query.create(f"What is {i} + 2?", str(i + 2), "gsm8k", "t") for i in range(n)]
    write_queries(qs, tmp / "queries.parquet")
    return qs


def factory(calls, fail_after=None):
    def make(model_id, config):
        b = ScriptedBackend(model_id, config, calls=calls)
        if fail_after is not None:
            orig = b.one_pass

            def one_pass(reqs, sampling):
                if len(calls) >= fail_after:
                    raise KeyboardInterrupt("simulated crash")
                return orig(reqs, sampling)

            b.one_pass = one_pass
        return b

    return make


def records(tmp):
    return pd.concat([pd.read_parquet(p) for p in sorted((tmp / "rollouts" / "m").glob("shard-*.parquet"))])


def test_plan_groups_budgets_and_checks_n_max(tmp_path):
    p = make_params(tmp_path)
    (plan,) = plan_rollout(p)
    assert plan.budgets == tuple(BUDGETS) and plan.n == 4 and len(plan.tiers) == 12
    with pytest.raises(ValueError, match="n_max"):
        plan_rollout(make_params(tmp_path, n_max=2))


def test_one_record_per_query_sample_budget_and_metrics(tmp_path):
    qs = write_some_queries(tmp_path)
    calls = []
    m = rollout(make_params(tmp_path), backend_factory=factory(calls), progress=False)
    df = records(tmp_path)
    assert len(df) == len(qs) * 4 * len(BUDGETS)
    assert not df.duplicated(["query_id", "sample", "budget"]).any()
    # a sample that finished within B keeps its own answer; otherwise it was forced
    assert (df["reasoning_tokens"] <= df["budget"]).all() | (~df["forced"]).all()
    assert (df.loc[df["forced"], "reasoning_tokens"] == df.loc[df["forced"], "budget"]).all()
    assert (df.loc[df["budget"] == 0, "reasoning_tokens"] == 0).all()
    saved = json.loads((tmp_path / "rollout.json").read_text())
    for key in ("queries", "samples", "generated_tokens", "naive_tokens", "tokens_per_second",
                "backend", "model", "wall_seconds"):
        assert key in saved
    assert saved["queries"] == len(qs) and saved["samples"] == len(qs) * 4
    assert m["naive_tokens"] > m["generated_tokens"] > 0
    # generated = completions at the max budget + every forced answer
    at_max = df[df["budget"] == max(BUDGETS)]
    assert m["generated_tokens"] == at_max["reasoning_tokens"].sum() + df["forced_tokens"].sum()


def test_rerun_does_no_work_and_resume_after_crash(tmp_path):
    qs = write_some_queries(tmp_path)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        rollout(make_params(tmp_path), backend_factory=factory(calls, fail_after=2), progress=False)
    assert len(calls) == 2  # two shards of 2 queries made it to disk
    first = records(tmp_path)
    assert first["query_id"].nunique() == 4
    calls2 = []
    rollout(make_params(tmp_path), backend_factory=factory(calls2), progress=False)
    redone = {q for c in calls2 for q in c}
    assert redone.isdisjoint(set(first["query_id"]))  # finished queries were not regenerated
    df = records(tmp_path)
    assert df.groupby(["query_id", "sample"]).size().eq(len(BUDGETS)).all()
    assert df["query_id"].nunique() == len(qs)
    calls3 = []
    rollout(make_params(tmp_path), backend_factory=factory(calls3), progress=False)
    assert calls3 == []


def test_changed_settings_invalidate_old_shards(tmp_path):
    write_some_queries(tmp_path, n=3)
    rollout(make_params(tmp_path), backend_factory=factory([]), progress=False)
    calls = []
    rollout(make_params(tmp_path, temperature=0.5), backend_factory=factory(calls), progress=False)
    assert sum(len(c) for c in calls) == 3
    assert list((tmp_path / "rollouts").glob("m.stale-*"))


def test_samples_do_not_depend_on_shard_size(tmp_path):
    write_some_queries(tmp_path, n=5)
    rollout(make_params(tmp_path, shard_size=1), backend_factory=factory([]), progress=False)
    a = records(tmp_path).sort_values(["query_id", "sample", "budget"]).reset_index(drop=True)
    # a (meaningless) settings change makes the second run regenerate every query, in one shard
    calls = []
    rollout(make_params(tmp_path, shard_size=5, temperature=0.8000001), backend_factory=factory(calls),
            progress=False)
    assert calls == [sorted(a["query_id"].unique())] and list((tmp_path / "rollouts").glob("m.stale-*"))
    assert len(list((tmp_path / "rollouts" / "m").glob("shard-*.parquet"))) == 1
    b = records(tmp_path).sort_values(["query_id", "sample", "budget"]).reset_index(drop=True)
    # every record is identical: samples depend on the query's seed, not on what shares a shard
    pd.testing.assert_frame_equal(a, b)


def test_fewshot_direct_prefix_continues_the_examples_answer_format(tmp_path):
    from pipelines.rollout.work import build_requests

    qs = write_some_queries(tmp_path, n=1)
    for template, want in (("fewshot", " The final answer is"), ("chatml", "The final answer is")):
        p = parse_params({**{"seed": 1, "prepare": {"out": str(tmp_path / "queries.parquet")}},
                          "models": {"m": {"backend": "llamacpp", "path": "x.gguf", "template": template}},
                          "tiers": {"grid": [{"model": "m", "budgets": [0, 8], "samples": [1]}]}})
        (plan,) = plan_rollout(p)
        (req,) = build_requests(plan, qs, p)
        assert req.forcing_text(0) == want and req.forcing_text(8) == "\nThe final answer is"
        assert (req.prompt + req.forcing_text(0)).count("Answer: The final answer is") == (template == "fewshot")
