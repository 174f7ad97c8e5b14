"""The local executor: one backend in this process, its batch kept full across shards.

All queries still to do go to the backend as one stream (``Backend.one_pass_stream``); each
query's result arrives the moment its last sample ends, and every ``rollout.shard_size``
finished queries are written as one atomic shard. So the batch never drains at a shard boundary
(on llama.cpp a new query's samples start as soon as sequences free up), while shards stay whole
queries: a crash loses at most the finished queries not yet written plus those in flight.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipelines import artifacts
from pipelines.config import Params
from pipelines.queries import Query
from pipelines.rollout.work import ModelPlan, build_requests, result_records
from router.generation import SamplingConfig


def rollout_local(plan: ModelPlan, todo: list[Query], params: Params, out_dir: Path,
                  backend_factory: Callable, progress: bool = True) -> dict:
    """Run ``todo`` on one local backend, one atomic shard per ``shard_size`` finished queries."""
    from tqdm import tqdm

    stats = {"seconds": 0.0, "generated_tokens": 0}
    if not todo:
        return stats
    requests = build_requests(plan, todo, params)
    by_key = {r.key: r for r in requests}
    size = params.rollout.shard_size
    done: list = []
    clock = [time.perf_counter()]
    backend = backend_factory(plan.model, plan.config)
    bar = tqdm(total=len(todo), desc=f"rollout {plan.model}", unit="q", disable=not progress)

    def flush() -> None:
        if not done:
            return
        records = [rec for res in done for rec in result_records(plan, res, by_key[res.key])]
        now = time.perf_counter()
        # the time since the last shard: generation and bookkeeping of these queries' share of the batch
        meta = {"seconds": now - clock[0], "generated_tokens": sum(r.generated_tokens for r in done),
                "prompt_tokens": sum(r.prompt_tokens for r in done), "queries": len(done), "model": plan.model}
        artifacts.write_shard(out_dir, records, meta)
        clock[0] = time.perf_counter()
        stats["seconds"] += meta["seconds"]
        stats["generated_tokens"] += meta["generated_tokens"]
        bar.update(len(done))
        bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(stats['seconds'], 1e-9):.0f}")
        done.clear()

    def on_result(result) -> None:
        done.append(result)
        if len(done) >= size:
            flush()

    try:
        backend.one_pass_stream(requests, SamplingConfig.of(params.rollout), on_result, chunk=size)
        flush()
    finally:
        bar.close()
        backend.close()
    return stats
