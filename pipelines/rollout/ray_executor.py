"""Rollouts on a Ray cluster: chunks of whole queries spread over actors that each hold a backend.

``rollout.executor: ray`` runs the same unit of work as the local executor
(:func:`pipelines.rollout.work.rollout_chunk` on ``rollout.shard_size`` queries) on a pool of Ray
actors, one loaded backend per actor: llama.cpp actors reserve CPUs, vLLM actors one GPU each
(one engine per GPU). The output contract is the local executor's: the same content-addressed
shards, so ``metrics/rollout.json``, resume after a crash and per-query seeds carry over.

Why actors driven from here rather than ``ray.data`` ``map_batches``: the bookkeeping unit is a
chunk of whole queries that becomes one shard. Ray Data re-batches rows into blocks of its own
choosing, reserves CPUs for its own operators (awkward on a 2-CPU node) and hands results back
as a stream of blocks with no chunk identity; with actors the driver always knows which chunk
is where, so "retry what was lost, never write anything twice" is a few lines of plain code.

Exactly once: the driver is the only writer. A worker returns a chunk's records (a few hundred
small rows) and the driver writes the shard, so a worker that dies can never leave a partial
or orphan shard, and this works on clusters whose nodes do not share the driver's disk. Each
chunk is pending, in flight or written, never two of these. A worker that dies mid-chunk is
restarted by Ray and the call retried (``max_restarts`` / ``max_task_retries``); a worker that
stays dead has its chunk resubmitted here to a live one. Even a repeated write would be
harmless: shard names are content-addressed and samples depend only on the query's seed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from router.generation import RolloutError
from pipelines.config import Params, RolloutConfig
from pipelines.queries import Query
from pipelines.rollout.work import ModelPlan, chunks, rollout_chunk

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'difficulty-router[ray]'"
# Ray restarts a crashed actor (reloading its model) and re-runs the call it was executing
# this many times; past that the actor is dead for good and its chunk goes to another actor
MAX_RESTARTS = 3
# a chunk whose actor died for good this many times is probably what kills them (OOM): stop
MAX_CHUNK_ATTEMPTS = 3
GPU_BACKENDS = ("vllm",)
# shipped to the workers when this module starts or joins Ray itself (a few hundred KB)
CODE_PACKAGES = ("pipelines", "router")
WAIT_LOG_SECONDS = 60.0  # how often to say that no worker has started yet


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RolloutError(f"rollout.executor 'ray' needs Ray, which is not installed ({e}); {INSTALL_HINT}") from e
    return ray


def worker_resources(backend: str, r: RolloutConfig) -> dict[str, float]:
    """What one actor reserves: CPUs for llama.cpp threads, a whole GPU for a vLLM engine."""
    gpus = r.ray_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if backend in GPU_BACKENDS else 0.0
    if r.ray_cpus_per_worker <= 0 or gpus < 0:
        raise ValueError(f"rollout.ray_cpus_per_worker must be > 0 and ray_gpus_per_worker >= 0, "
                         f"got {r.ray_cpus_per_worker} and {gpus}")
    return {"num_cpus": float(r.ray_cpus_per_worker), "num_gpus": float(gpus)}


def _code_dirs() -> list[str]:
    import importlib

    return [str(Path(importlib.import_module(p).__file__).parent) for p in CODE_PACKAGES]


def init_ray(r: RolloutConfig, **init_kwargs) -> bool:
    """Join ``r.ray_address`` or start a local Ray instance; False if Ray was already up.

    The workers get this checkout's ``pipelines`` and ``router`` as job-level ``py_modules``
    (small; a ``working_dir`` would upload the whole repository with its data), so they run
    the driver's code whether or not the package is installed on the nodes. Their third-party
    dependencies (llama-cpp-python, vLLM) must be installed there.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "log_to_driver": False,  # workers' llama.cpp/vLLM chatter; errors still arrive as exceptions
        "logging_level": logging.WARNING,
        "runtime_env": {"py_modules": _code_dirs(), "excludes": ["__pycache__", "*.pyc"]},
    }
    if r.ray_address:
        kwargs["address"] = r.ray_address
    else:
        # Ray 2.60 turns token auth on by default and writes a token under $HOME at init;
        # a private local instance needs neither. Usage stats would phone home.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs)
    ray.init(**kwargs)
    return True


class RolloutWorker:
    """One Ray actor: a loaded backend that rolls out chunks. Made remote in :func:`rollout_ray`."""

    def __init__(self, plan: ModelPlan, params: Params, cpus: float):
        from pipelines.backends import load_backend

        config = plan.config
        if config.backend == "llamacpp" and config.options.get("n_threads") is None:
            # os.cpu_count() is the node's cores, not this actor's share of them
            config = replace(config, options={**config.options, "n_threads": max(1, int(cpus))})
        if config.backend == "vllm":
            # the engine in this process, not vLLM's default engine-core + worker processes per
            # LLM: the actor is what Ray reserves, restarts and kills, and on a CPU node its
            # threads follow the reservation (Ray sets OMP_NUM_THREADS) where vLLM's own binding
            # pinned every actor's engine to the same first core. Set on the cluster to override
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.plan, self.params = plan, params
        self.backend = load_backend(plan.model, config)

    def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def run(self, queries: list[Query]) -> tuple[list[dict], dict, dict]:
        records, meta = rollout_chunk(self.backend, self.plan, queries, self.params)
        info = self.info()
        return records, {**meta, "executor": "ray", "node": info["node"]}, info


@dataclass
class WorkerSlot:
    """The driver's view of one actor."""

    index: int
    handle: Any  # the actor handle
    pid: int | None = None  # of the actor process (changes when Ray restarts it)
    node: str | None = None


def rollout_ray(plan: ModelPlan, todo: list[Query], params: Params, out_dir: Path, progress: bool = True,
                *, on_submit: Callable[[WorkerSlot, list[Query]], None] | None = None) -> dict:
    """Run ``todo`` on Ray actors, one atomic shard per chunk, written by this process.

    ``on_submit(worker, chunk)`` is called after each chunk is handed to a worker (tests use it
    to kill workers mid-chunk). Returns the local executor's stats plus ``wall_seconds``,
    ``workers``, ``worker_restarts`` (seen as a new pid) and ``workers_lost``.
    """
    stats: dict[str, Any] = {"seconds": 0.0, "generated_tokens": 0, "wall_seconds": 0.0, "workers": 0,
                             "worker_restarts": 0, "workers_lost": 0}
    if not todo:
        return stats
    ray = import_ray()
    r = params.rollout
    res = worker_resources(plan.config.backend, r)
    started = init_ray(r)
    workers: list[WorkerSlot] = []
    try:
        work = list(chunks(todo, r.shard_size))
        n = _n_workers(ray, r, res, len(work))
        remote = ray.remote(RolloutWorker).options(
            **res, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, scheduling_strategy="SPREAD",
            runtime_env=_actor_runtime_env(ray, started),
        )
        workers = [WorkerSlot(i, remote.remote(plan, params, res["num_cpus"])) for i in range(n)]
        stats["workers"] = n
        log.info("rollout %s on Ray: %d queries in %d chunks over %d workers (%g CPU, %g GPU each)",
                 plan.model, len(todo), len(work), n, res["num_cpus"], res["num_gpus"])
        _drive(ray, workers, work, out_dir, stats, progress, plan.model, on_submit)
    finally:
        for w in workers:
            ray.kill(w.handle)  # frees the model and the reservation now, not at shutdown
        if started:
            ray.shutdown()
    return stats


def _n_workers(ray, r: RolloutConfig, res: dict[str, float], n_chunks: int) -> int:
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    fits = int(cpus // res["num_cpus"])
    if res["num_gpus"] > 0:
        fits = min(fits, int(gpus // res["num_gpus"]))
    if r.ray_workers is not None:
        if r.ray_workers < 1:
            raise ValueError(f"rollout.ray_workers must be >= 1, got {r.ray_workers}")
        if r.ray_workers > fits:
            # an autoscaling cluster may still grow to fit them; a fixed one runs the ones that fit
            log.warning("rollout.ray_workers=%d but the cluster now holds %d such workers (%g CPU, %g GPU)",
                        r.ray_workers, fits, cpus, gpus)
        return min(r.ray_workers, n_chunks)
    if fits < 1:
        raise RolloutError(
            f"the Ray cluster has {cpus:g} CPU and {gpus:g} GPU; one rollout worker needs {res['num_cpus']:g} CPU "
            f"and {res['num_gpus']:g} GPU (rollout.ray_cpus_per_worker / rollout.ray_gpus_per_worker)"
        )
    return min(fits, n_chunks)


def _actor_runtime_env(ray, started: bool) -> dict | None:
    """Make ``pipelines`` importable on workers of a Ray session someone else started.

    ``init_ray`` ships the code with the job; a session started elsewhere (a notebook's own
    ``ray.init``) may not have, and per-actor ``py_modules`` cannot upload local folders. Then
    point the workers at this checkout, which works on a local instance or a shared filesystem.
    """
    if started or ray.get_runtime_context().runtime_env.get("py_modules"):
        return None
    root = str(Path(_code_dirs()[0]).parent)
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}


def _drive(ray, workers: list[WorkerSlot], work: list[list[Query]], out_dir: Path, stats: dict,
           progress: bool, model: str, on_submit) -> None:
    """Hand chunks to idle workers until every chunk's shard is written."""
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
    from tqdm import tqdm

    from pipelines.artifacts import write_shard

    pending = deque(range(len(work)))
    attempts = [0] * len(work)
    starting = {w.handle.info.remote(): w for w in workers}  # model loads happen here
    running: dict[Any, tuple[WorkerSlot, int]] = {}
    idle: list[WorkerSlot] = []
    alive = len(workers)
    bar = tqdm(total=sum(len(c) for c in work), desc=f"rollout {model} (ray)", unit="q", disable=not progress)
    t0 = time.perf_counter()

    def submit() -> None:
        w, ci = idle.pop(), pending.popleft()
        running[w.handle.run.remote(work[ci])] = (w, ci)
        if on_submit is not None:
            on_submit(w, work[ci])

    def lose(w: WorkerSlot, e: Exception) -> None:
        nonlocal alive
        alive -= 1
        stats["workers_lost"] += 1
        log.warning("Ray rollout worker %d (pid %s on %s) is dead: %s", w.index, w.pid, w.node,
                    (str(e).splitlines() or [""])[0])
        if alive == 0:
            raise RolloutError(f"every Ray rollout worker died; last error: {e}") from e

    try:
        while pending or running:
            while pending and idle:
                submit()
            refs = list(running) + list(starting)
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_LOG_SECONDS)
            if not ready:
                if not running:
                    log.warning("no Ray rollout worker has started after %.0f s; does the cluster have the "
                                "resources they reserve?", time.perf_counter() - t0)
                continue
            ref = ready[0]
            if ref in starting:
                w = starting.pop(ref)
                try:
                    info = ray.get(ref)
                except RayActorError as e:
                    if e.actor_init_failed:  # a bad model path or option fails on every worker alike
                        raise RolloutError(f"a Ray rollout worker could not load model {model!r}: {e}") from e
                    lose(w, e)
                    continue
                w.pid, w.node = info["pid"], info["node"]
                idle.append(w)
                continue
            w, ci = running.pop(ref)
            try:
                records, meta, info = ray.get(ref)
            except RayTaskError as e:  # the backend raised: deterministic, so not retried
                cause = getattr(e, "cause", None) or e
                qids = [q.query_id for q in work[ci]]
                raise RolloutError(f"rollout of queries {qids} failed on a Ray worker: {cause}") from e
            except RayActorError as e:
                # Ray's own restarts and retries are used up (or the actor is unreachable)
                attempts[ci] += 1
                if attempts[ci] >= MAX_CHUNK_ATTEMPTS:
                    qids = [q.query_id for q in work[ci]]
                    raise RolloutError(f"queries {qids} lost their Ray worker {attempts[ci]} times; "
                                       f"last error: {e}") from e
                pending.appendleft(ci)
                if isinstance(e, ActorDiedError):
                    lose(w, e)
                else:  # temporarily unavailable: it may come back, so keep it
                    idle.append(w)
                continue
            if w.pid is not None and info["pid"] != w.pid:
                stats["worker_restarts"] += 1
                log.warning("Ray restarted rollout worker %d (pid %s -> %s) and retried its chunk",
                            w.index, w.pid, info["pid"])
            w.pid, w.node = info["pid"], info["node"]
            # on disk before anything else can fail (a write is milliseconds, a chunk seconds)
            write_shard(out_dir, records, meta)
            idle.append(w)
            stats["seconds"] += meta["seconds"]
            stats["generated_tokens"] += meta["generated_tokens"]
            bar.update(len(work[ci]))
            wall = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(wall, 1e-9):.0f}", workers=alive)
    finally:
        bar.close()
        stats["wall_seconds"] = time.perf_counter() - t0
