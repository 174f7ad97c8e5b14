"""The rollout stage: one pass of a real LLM per model over every query, every budget at once.

Work is written in atomic shards of a few whole queries, so a crash loses at most the shard in
flight and a rerun does only what is missing (``pipelines.artifacts``: shards, fingerprints).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines import artifacts
from pipelines.config import Params
from pipelines.rollout.work import ModelPlan, fingerprint_spec, plan_rollout
from pipelines.tracking import NULL_RUN
from router.tiers import Tier

log = logging.getLogger(__name__)

SECTIONS = ("seed", "prepare", "models", "tiers", "rollout")


def naive_tokens(df, tiers: Iterable[Tier]) -> float:
    """Generated tokens if every tier were generated separately from these same samples.

    A separate run of tier (B, k) draws k samples at max_tokens=B, forcing the answer of a
    cut one: per query k * mean over samples of what budget B spends.
    """
    per_budget = df.groupby(["model", "budget", "query_id"])["tokens"].mean().groupby(["model", "budget"]).sum()
    return sum(t.samples * float(per_budget.get((t.model, t.budget), 0.0)) for t in tiers)


def rollout_metrics(df, plans: list[ModelPlan], shard_metas: list[dict], wall: float) -> dict[str, Any]:
    """The contract keys of ``metrics/rollout.json`` (plus the budgets each model was rolled out at)."""
    bmax = {p.model: p.budgets[-1] for p in plans}
    if len(df):
        at_max = df[df["budget"] == df["model"].map(bmax)]
        generated = int(at_max["reasoning_tokens"].sum() + df["forced_tokens"].sum())
        samples = int(df.groupby(["query_id", "model"])["sample"].nunique().sum())
    else:
        generated, samples = 0, 0
    gen_seconds = sum(m.get("seconds", 0.0) for m in shard_metas)
    gen_tokens = sum(m.get("generated_tokens", 0) for m in shard_metas)
    # what generating each static tier on its own would cost (adaptive tiers are labelled, not rolled out)
    naive = naive_tokens(df, [t for p in plans for t in p.tiers if not t.adaptive]) if len(df) else 0.0
    by_model: dict[str, list[float]] = {}
    for m in shard_metas:
        acc = by_model.setdefault(m.get("model"), [0.0, 0.0])
        acc[0] += m.get("generated_tokens", 0)
        acc[1] += m.get("seconds", 0.0)
    return {
        "queries": int(df["query_id"].nunique()) if len(df) else 0,
        "samples": samples,
        "generated_tokens": generated,
        "naive_tokens": round(naive, 1),
        "naive_over_generated": round(naive / generated, 3) if generated else None,
        "tokens_per_second": round(gen_tokens / gen_seconds, 1) if gen_seconds else None,
        # per model: the bundle's first latency estimate for serving (pipelines/export.py)
        "tokens_per_second_by_model": {m: round(t / sec, 1) for m, (t, sec) in sorted(by_model.items())
                                       if m is not None and sec},
        "generation_seconds": round(gen_seconds, 2),
        "backend": ",".join(sorted({p.config.backend for p in plans})),
        "model": ",".join(p.model for p in plans),
        "budgets": {p.model: list(p.budgets) for p in plans},
        "wall_seconds": round(wall, 2),
    }


def rollout(params: Params, run=NULL_RUN, *, backend_factory: Callable | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run the rollout stage; returns (and writes) ``metrics/rollout.json``."""
    import pandas as pd

    t_start = time.perf_counter()
    if params.data.outcomes:
        return _skipped(params, run, "data.outcomes imports a precomputed outcome table; nothing to generate")
    if backend_factory is None:
        from pipelines.backends import load_backend as backend_factory
    plans = plan_rollout(params)
    queries = sorted(artifacts.read_queries(params.prepare.out), key=lambda q: q.query_id)
    if params.rollout.max_queries is not None:
        queries = queries[: params.rollout.max_queries]
    qids = {q.query_id for q in queries}
    run.log_params({"queries": len(queries)})
    frames, metas = [], []
    for plan in plans:
        d = artifacts.open_model_dir(params.rollout.out, plan.model, fingerprint_spec(plan, params))
        done = artifacts.done_queries(d)
        todo = [q for q in queries if q.query_id not in done]
        log.info("rollout %s: %d queries, %d already done, %d to go", plan.model, len(queries),
                 len(queries) - len(todo), len(todo))
        if params.rollout.executor == "ray":
            from pipelines.rollout.ray_executor import rollout_ray

            rollout_ray(plan, todo, params, d, progress=progress)
        else:
            from pipelines.rollout.local import rollout_local

            rollout_local(plan, todo, params, d, backend_factory, progress=progress)
        frames.append(artifacts.read_records(d, qids))
        metas.extend(artifacts.shard_meta(p) for p in artifacts.shard_files(d)
                     if artifacts.shard_query_ids(p) & qids)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    missing = qids - set(df["query_id"]) if len(df) else qids
    if missing:
        raise RuntimeError(f"{len(missing)} queries have no rollout records after the stage ran")
    metrics = rollout_metrics(df, plans, metas, time.perf_counter() - t_start)
    artifacts.write_json(params.rollout.metrics, metrics)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.log_artifact(params.rollout.metrics)
    return metrics


def _skipped(params: Params, run, why: str) -> dict[str, Any]:
    """Metrics of a rollout that had nothing to do (same keys, zero counts)."""
    metrics = {"queries": 0, "samples": 0, "generated_tokens": 0, "naive_tokens": 0.0, "naive_over_generated": None,
               "tokens_per_second": None, "tokens_per_second_by_model": {}, "generation_seconds": 0.0, "backend": None, "model": None,
               "budgets": {}, "wall_seconds": 0.0, "skipped": why}
    artifacts.write_json(params.rollout.metrics, metrics)
    Path(params.rollout.out).mkdir(parents=True, exist_ok=True)
    log.info("rollout skipped: %s", why)
    run.set_tags({"skipped": why})
    run.log_params({"outcomes_table": params.data.outcomes})
    run.log_metrics({"queries": 0, "generated_tokens": 0})
    run.log_artifact(params.rollout.metrics)
    return metrics
