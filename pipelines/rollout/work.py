"""The unit of work of every rollout executor: a few whole queries of one model in one pass.

For each model in the tier grid, every query gets ``n_max`` samples at the model's largest
budget; every smaller budget a sample did not finish within gets a forced answer from the
truncated sample (budget forcing), generated on the cached prefix. Each (query, sample, budget)
becomes one record of what the model produced there and what it cost; nothing is scored here
(the label stage extracts and verifies answers), so a verifier change never needs a new rollout.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from pipelines.config import ModelConfig, Params
from pipelines.queries import Query
from router.generation import OnePassRequest, OnePassResult, SamplingConfig
from router.prompts import direct_prefix, render_prompt
from router.tiers import Tier


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
    # a cascade runs declared static tiers, which the plan covers already
    tiers = [t for t in tiers if t.kind != "cascade"]
    for model in sorted({t.model for t in tiers}):
        mt = tuple(t for t in tiers if t.model == model)
        kmax = max(t.samples for t in mt)
        n = params.rollout.n_max or kmax
        if n < kmax:
            raise ValueError(f"rollout.n_max={n} is below the largest tier sample count {kmax} of model {model!r}")
        plans.append(ModelPlan(model, params.model(model), tuple(sorted({t.budget for t in mt})), n, mt))
    return plans


def query_seed(seed: int, query_id: str) -> int:
    """Per-query seed: a query's samples do not depend on order, batching or worker."""
    return int(hashlib.sha256(f"{seed}:{query_id}".encode()).hexdigest()[:8], 16) % (2**31 - 1024)


def fingerprint_spec(plan: ModelPlan, params: Params) -> dict[str, Any]:
    """Everything that determines a sample: if any of it changes, old shards are invalid.

    The verifiers are not in it: records hold no scores, so a verifier change reuses them.
    """
    r = params.rollout
    return {
        "model": plan.model,
        "model_config": asdict(plan.config),
        "budgets": list(plan.budgets),
        "n": plan.n,
        "sampling": asdict(SamplingConfig.of(params.rollout)),
        "force_suffix": r.force_suffix,
        "direct_prefix": direct_prefix(plan.config.template, r.direct_prefix),
        "answer_tokens": r.answer_tokens,
        "system_prompt": r.system_prompt,
        "seed": params.seed,
    }


def build_requests(plan: ModelPlan, queries: list[Query], params: Params) -> list[OnePassRequest]:

    r = params.rollout
    return [
        OnePassRequest(
            key=q.query_id,
            prompt=render_prompt(plan.config.template, r.system_prompt, q.text),
            n=plan.n,
            budgets=plan.budgets,
            seed=query_seed(params.seed, q.query_id),
            force_suffix=r.force_suffix,
            direct_prefix=direct_prefix(plan.config.template, r.direct_prefix),
            answer_tokens=r.answer_tokens,
        )
        for q in queries
    ]


def result_records(plan: ModelPlan, result: OnePassResult, request: OnePassRequest) -> list[dict]:
    """One record per (sample, budget): what that budget yields and what it costs, unscored.

    ``answer_text`` is the forced answer (forcing text + continuation) where the sample was cut
    at the budget, else null: the sample's own ``completion`` (stored once, at the largest
    budget) is its answer there.
    """
    bmax = plan.budgets[-1]
    records = []
    for s in result.samples:
        for b in plan.budgets:
            text, tokens, forced = s.at_budget(b, request)
            records.append({
                "query_id": result.key,
                "model": plan.model,
                "sample": s.index,
                "seed": s.seed,
                "budget": b,
                "answer_text": text if forced else None,
                "tokens": tokens,  # what this budget spends on this sample
                "reasoning_tokens": min(s.n_tokens, b) if forced else s.n_tokens,
                "forced": forced,
                "forced_tokens": tokens - min(s.n_tokens, b) if forced else 0,
                "finished": s.finished,
                # the full completion once per sample, for scoring own answers and for audits
                "completion": s.text if b == bmax else None,
                "prompt_tokens": result.prompt_tokens,
            })
    return records


def rollout_chunk(backend, plan: ModelPlan, queries: list[Query], params: Params) -> tuple[list[dict], dict]:
    """Roll out a few whole queries: the unit of work of every executor (local, Ray)."""
    requests = build_requests(plan, queries, params)
    t0 = time.perf_counter()
    results = backend.one_pass(requests, SamplingConfig.of(params.rollout))
    if [r.key for r in results] != [q.query_id for q in queries]:
        raise RuntimeError("backend returned results out of request order")
    records = []
    for req, res in zip(requests, results):
        records.extend(result_records(plan, res, req))
    seconds = time.perf_counter() - t0  # through record assembly: the stage's rate, bookkeeping included
    meta = {
        "seconds": seconds,
        "generated_tokens": sum(r.generated_tokens for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "queries": len(queries),
        "model": plan.model,
    }
    return records, meta


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
