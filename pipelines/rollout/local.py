"""The local executor: one backend in this process, one atomic shard per chunk of queries."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipelines import artifacts
from pipelines.config import Params
from pipelines.queries import Query
from pipelines.rollout.work import ModelPlan, chunks, rollout_chunk


def rollout_local(plan: ModelPlan, todo: list[Query], params: Params, out_dir: Path,
                  backend_factory: Callable, progress: bool = True) -> dict:
    """Run ``todo`` on one local backend, one atomic shard per chunk."""
    from tqdm import tqdm

    stats = {"seconds": 0.0, "generated_tokens": 0}
    if not todo:
        return stats
    backend = backend_factory(plan.model, plan.config)
    try:
        bar = tqdm(total=len(todo), desc=f"rollout {plan.model}", unit="q", disable=not progress)
        for chunk in chunks(todo, params.rollout.shard_size):
            records, meta = rollout_chunk(backend, plan, chunk, params)
            artifacts.write_shard(out_dir, records, meta)
            stats["seconds"] += meta["seconds"]
            stats["generated_tokens"] += meta["generated_tokens"]
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(stats['seconds'], 1e-9):.0f}")
        bar.close()
    finally:
        backend.close()
    return stats
