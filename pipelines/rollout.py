"""The rollout stage: one pass of a real LLM labels every tier of the grid.

For each model in the tier grid, every query gets ``n_max`` samples at the model's largest
budget; every smaller budget a sample did not finish within gets a forced answer from the
truncated sample (budget forcing), generated on the cached prefix. Each (query, sample,
budget) becomes one record with the extracted answer, whether it is correct and the tokens
that budget spends. Width tiers are estimated later from subsets of the samples.

Work is written in atomic shards of a few whole queries, so a crash loses at most the shard
in flight and a rerun does only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines.backends.base import OnePassRequest, OnePassResult, SamplingConfig
from pipelines.config import ModelConfig, Params
from pipelines.queries import Query
from router.tiers import Tier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """What one model must generate: the budgets and sample count its tiers need."""

    model: str
    config: ModelConfig
    budgets: tuple[int, ...]  # ascending, unique; the last is the one-pass max_tokens
    n: int  # samples per query (n_max)
    tiers: tuple[Tier, ...]


def plan_rollout(params: Params) -> list[ModelPlan]:
    """Group the tier grid by model into one-pass plans; check the rollout section."""
    tiers = params.tier_list()
    if not tiers:
        raise ValueError("params declare no tiers: add a `tiers.grid` (see README)")
    if params.rollout.executor not in ("local", "ray"):
        raise ValueError(f"unknown rollout.executor {params.rollout.executor!r}; choose one of ['local', 'ray']")
    if params.rollout.shard_size < 1:
        raise ValueError("rollout.shard_size must be >= 1")
    plans = []
    for model in sorted({t.model for t in tiers}):
        mt = tuple(t for t in tiers if t.model == model)
        kmax = max(t.samples for t in mt)
        n = params.rollout.n_max or kmax
        if n < kmax:
            raise ValueError(f"rollout.n_max={n} is below the largest tier sample count {kmax} of model {model!r}")
        plans.append(ModelPlan(model, params.model(model), tuple(sorted({t.budget for t in mt})), n, mt))
    return plans


def sampling_of(params: Params) -> SamplingConfig:
    r = params.rollout
    return SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          force_temperature=r.force_temperature)


def query_seed(seed: int, query_id: str) -> int:
    """Per-query seed: a query's samples do not depend on order, batching or worker."""
    return int(hashlib.sha256(f"{seed}:{query_id}".encode()).hexdigest()[:8], 16) % (2**31 - 1024)


def fingerprint_spec(plan: ModelPlan, params: Params) -> dict[str, Any]:
    """Everything that determines a sample: if any of it changes, old shards are invalid."""
    r = params.rollout
    return {
        "model": plan.model,
        "model_config": asdict(plan.config),
        "budgets": list(plan.budgets),
        "n": plan.n,
        "sampling": asdict(sampling_of(params)),
        "force_suffix": r.force_suffix,
        "direct_prefix": r.direct_prefix,
        "answer_tokens": r.answer_tokens,
        "system_prompt": r.system_prompt,
        "seed": params.seed,
    }


def build_requests(plan: ModelPlan, queries: list[Query], params: Params) -> list[OnePassRequest]:
    from pipelines.prompts import render_prompt

    r = params.rollout
    return [
        OnePassRequest(
            key=q.query_id,
            prompt=render_prompt(plan.config.template, r.system_prompt, q.text),
            n=plan.n,
            budgets=plan.budgets,
            seed=query_seed(params.seed, q.query_id),
            force_suffix=r.force_suffix,
            direct_prefix=r.direct_prefix,
            answer_tokens=r.answer_tokens,
        )
        for q in queries
    ]


def result_records(plan: ModelPlan, query: Query, result: OnePassResult, request: OnePassRequest) -> list[dict]:
    """One record per (sample, budget): the answer that budget yields and what it costs."""
    from pipelines.verifiers import score
    from router.vote import vote_key

    cache: dict[str, tuple[str | None, bool]] = {}

    def judged(text: str) -> tuple[str | None, bool]:
        # forced answers repeat a lot ("The final answer is 12."); verify each text once
        if text not in cache:
            cache[text] = score(query, text)
        return cache[text]

    bmax = plan.budgets[-1]
    records = []
    for s in result.samples:
        own = judged(s.text)
        for b in plan.budgets:
            if s.needs_forcing(b):
                fa = s.forced.get(b)
                if fa is None:
                    raise RuntimeError(f"backend returned no forced answer for query {query.query_id} "
                                       f"sample {s.index} budget {b}")
                prefix = request.direct_prefix if b == 0 else request.force_suffix
                answer, correct = judged(prefix + fa.text)
                reasoning, forced_tokens, answer_text = min(s.n_tokens, b), fa.n_tokens, fa.text
            else:
                answer, correct = own
                reasoning, forced_tokens, answer_text = s.n_tokens, 0, None
            records.append({
                "query_id": query.query_id,
                "model": plan.model,
                "sample": s.index,
                "seed": s.seed,
                "budget": b,
                "answer": answer,
                "vote_key": vote_key(answer),
                "correct": bool(correct),
                "tokens": reasoning + forced_tokens,  # what this budget spends on this sample
                "reasoning_tokens": reasoning,
                "forced": s.needs_forcing(b),
                "forced_tokens": forced_tokens,
                "finished": s.finished,
                "answer_text": answer_text,
                # the full completion once per sample, for audits and re-verification
                "completion": s.text if b == bmax else None,
                "prompt_tokens": result.prompt_tokens,
            })
    return records


def generated_tokens_of(result: OnePassResult) -> int:
    return sum(s.n_tokens + sum(f.n_tokens for f in s.forced.values()) for s in result.samples)


def rollout_chunk(backend, plan: ModelPlan, queries: list[Query], params: Params) -> tuple[list[dict], dict]:
    """Roll out a few whole queries: the unit of work of every executor (local, Ray)."""
    requests = build_requests(plan, queries, params)
    t0 = time.perf_counter()
    results = backend.one_pass(requests, sampling_of(params))
    if [r.key for r in results] != [q.query_id for q in queries]:
        raise RuntimeError("backend returned results out of request order")
    records = []
    for q, req, res in zip(queries, requests, results):
        records.extend(result_records(plan, q, res, req))
    # timed through verification, so tokens/s is the stage's, bookkeeping included
    seconds = time.perf_counter() - t0
    meta = {
        "seconds": seconds,
        "generated_tokens": sum(generated_tokens_of(r) for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "queries": len(queries),
        "model": plan.model,
    }
    return records, meta


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def rollout_local(plan: ModelPlan, todo: list[Query], params: Params, out_dir: Path,
                  backend_factory: Callable, progress: bool = True) -> dict:
    """Run ``todo`` on one local backend, one atomic shard per chunk."""
    from tqdm import tqdm

    from pipelines.shards import write_shard

    stats = {"seconds": 0.0, "generated_tokens": 0}
    if not todo:
        return stats
    backend = backend_factory(plan.model, plan.config)
    try:
        bar = tqdm(total=len(todo), desc=f"rollout {plan.model}", unit="q", disable=not progress)
        for chunk in chunks(todo, params.rollout.shard_size):
            records, meta = rollout_chunk(backend, plan, chunk, params)
            write_shard(out_dir, records, meta)
            stats["seconds"] += meta["seconds"]
            stats["generated_tokens"] += meta["generated_tokens"]
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(stats['seconds'], 1e-9):.0f}")
        bar.close()
    finally:
        backend.close()
    return stats


def naive_tokens(df, tiers: Iterable[Tier]) -> float:
    """Generated tokens if every tier were generated separately from these same samples.

    A separate run of tier (B, k) draws k samples at max_tokens=B, forcing the answer of a
    cut one: per query k * mean over samples of what budget B spends.
    """
    per_budget = df.groupby(["model", "budget", "query_id"])["tokens"].mean().groupby(["model", "budget"]).sum()
    total = 0.0
    for t in tiers:
        total += t.samples * float(per_budget.get((t.model, t.budget), 0.0))
    return total


def rollout_metrics(df, plans: list[ModelPlan], shard_metas: list[dict], wall: float) -> dict[str, Any]:
    """The contract keys of ``metrics/rollout.json`` plus per-budget solve rates."""
    bmax = {p.model: p.budgets[-1] for p in plans}
    if len(df):
        at_max = df[df["budget"] == df["model"].map(bmax)]
        generated = int(at_max["reasoning_tokens"].sum() + df["forced_tokens"].sum())
        samples = int(df.groupby(["query_id", "model"])["sample"].nunique().sum())
    else:
        generated, samples = 0, 0
    gen_seconds = sum(m.get("seconds", 0.0) for m in shard_metas)
    gen_tokens = sum(m.get("generated_tokens", 0) for m in shard_metas)
    naive = naive_tokens(df, [t for p in plans for t in p.tiers]) if len(df) else 0.0
    acc = {}
    if len(df):
        for (model, b), g in df.groupby(["model", "budget"]):
            acc[f"{model}-b{b}"] = round(float(g["correct"].mean()), 4)
    return {
        "queries": int(df["query_id"].nunique()) if len(df) else 0,
        "samples": samples,
        "generated_tokens": generated,
        "naive_tokens": round(naive, 1),
        "naive_over_generated": round(naive / generated, 3) if generated else None,
        "tokens_per_second": round(gen_tokens / gen_seconds, 1) if gen_seconds else None,
        "generation_seconds": round(gen_seconds, 2),
        "backend": ",".join(sorted({p.config.backend for p in plans})),
        "model": ",".join(p.model for p in plans),
        "wall_seconds": round(wall, 2),
        "single_sample_accuracy": acc,
    }


def rollout(params: Params, *, backend_factory: Callable | None = None, progress: bool = True,
            params_file: str | None = None) -> dict[str, Any]:
    """Run the rollout stage; returns (and writes) ``metrics/rollout.json``."""
    from pipelines.backends import load_backend
    from pipelines.queries import read_queries
    from pipelines.shards import done_queries, open_model_dir, read_records, shard_files, shard_meta
    from pipelines.tracking import stage_run

    t_start = time.perf_counter()
    if params.data.outcomes:
        return _skipped(params, "data.outcomes imports a precomputed outcome table; nothing to generate")
    factory = backend_factory or load_backend
    plans = plan_rollout(params)
    queries = sorted(read_queries(params.prepare.out), key=lambda q: q.query_id)
    if params.rollout.max_queries is not None:
        queries = queries[: params.rollout.max_queries]
    qids = {q.query_id for q in queries}
    out_root = Path(params.rollout.out)

    with stage_run(params.mlflow, "rollout", params_file) as run:
        run.log_params({"rollout": asdict(params.rollout), "tiers": [t.to_dict() for t in params.tier_list()],
                        "models": {k: asdict(v) for k, v in params.models.items()}, "seed": params.seed,
                        "queries": len(queries)})
        frames, metas = [], []
        for plan in plans:
            d = open_model_dir(out_root, plan.model, fingerprint_spec(plan, params))
            done = done_queries(d)
            todo = [q for q in queries if q.query_id not in done]
            log.info("rollout %s: %d queries, %d already done, %d to go", plan.model, len(queries),
                     len(queries) - len(todo), len(todo))
            if params.rollout.executor == "ray":
                from pipelines.ray_executor import rollout_ray

                rollout_ray(plan, todo, params, d, progress=progress)
            else:
                rollout_local(plan, todo, params, d, factory, progress=progress)
            frames.append(read_records(d, qids))
            metas.extend(shard_meta(p) for p in shard_files(d) if _shard_has(p, qids))
        import pandas as pd

        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        missing = qids - set(df["query_id"]) if len(df) else qids
        if missing:
            raise RuntimeError(f"{len(missing)} queries have no rollout records after the stage ran")
        metrics = rollout_metrics(df, plans, metas, time.perf_counter() - t_start)
        out = Path(params.rollout.metrics)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_metrics({"single_sample_accuracy": metrics["single_sample_accuracy"]})
        run.log_artifact(out)
    return metrics


def _skipped(params: Params, why: str) -> dict[str, Any]:
    """Metrics of a rollout that had nothing to do (same keys, zero counts)."""
    metrics = {"queries": 0, "samples": 0, "generated_tokens": 0, "naive_tokens": 0.0, "naive_over_generated": None,
               "tokens_per_second": None, "generation_seconds": 0.0, "backend": None, "model": None,
               "wall_seconds": 0.0, "single_sample_accuracy": {}, "skipped": why}
    out = Path(params.rollout.metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    Path(params.rollout.out).mkdir(parents=True, exist_ok=True)
    log.info("rollout skipped: %s", why)
    from pipelines.tracking import stage_run

    with stage_run(params.mlflow, "rollout") as run:
        run.set_tags({"skipped": why})
        run.log_params({"outcomes_table": params.data.outcomes})
        run.log_metrics({"queries": 0, "generated_tokens": 0})
        run.log_artifact(out)
    return metrics


def _shard_has(path: Path, qids: set[str]) -> bool:
    import pyarrow.parquet as pq

    return bool(set(pq.read_table(path, columns=["query_id"]).column("query_id").to_pylist()) & qids)


def _plan_arguments(ap) -> None:
    ap.add_argument("--plan", action="store_true",
                    help="validate params and print what the rollout would generate, cost and take; generate nothing")
    ap.add_argument("--tokens-per-second", type=float, default=None, metavar="X",
                    help="with --plan: generation rate for the time estimate (default: the measured one, if any)")
    ap.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")


def main(argv=None) -> int:
    """``python -m pipelines.rollout [--params FILE] [--plan [--tokens-per-second X] [--json]]``."""
    from pipelines.config import load_params, stage_args

    args = stage_args("rollout: one pass of the LLM over every query at every budget", argv, _plan_arguments)
    if args.plan:
        from pipelines.plan import run_plan  # imports no backend engine: safe before a GPU is free

        return run_plan(args.params, args.tokens_per_second, as_json=args.json)
    if args.json or args.tokens_per_second is not None:
        raise SystemExit("rollout: --json and --tokens-per-second apply only with --plan")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = rollout(load_params(args.params), params_file=args.params)
    print(json.dumps({k: metrics[k] for k in ("queries", "samples", "generated_tokens", "naive_tokens",
                                              "tokens_per_second", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
