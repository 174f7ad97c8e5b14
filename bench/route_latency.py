"""Router latency, throughput, import time and memory, per encoder, each in a fresh process.

    python -m bench.route_latency [--bundle models/router] [--static-bundle DIR] [--queries FILE] [--n 300]

Without ``--bundle`` it builds the synthetic test bundle (``tests/router/bundle_fixture.py``)
in a temporary folder; without ``--static-bundle``, the same synthetic bundle trained on the
distilled static embedding (``featurize.embedding: all-MiniLM-L6-v2-static``). ``--queries`` is
a text file (one query per line) or JSONL with a ``question`` or ``text`` field (e.g. GSM8K's
test.jsonl); the default is the bundle fixture's short arithmetic questions. Prints one JSON
object and writes it to ``bench/results/route_latency.json`` (``--no-write``: print only):

- ``route_ms``: one query end to end (``Router.route``: featurize, predict, decide), p50/p99;
  ``featurize_ms`` / ``predict_ms`` / ``decide_ms`` split it up. The torch-free ONNX encoder
  runs pinned to one core (1 intra-op thread); sentence-transformers runs as it comes
  (torch's default threads, all cores), and again pinned to the ONNX run's core. The static
  encoder (numpy + tokenizers) runs pinned to one core on the static bundle.
- ``batch256_qps``: ``route_batch`` of 256 texts, queries per second (best of 3).
- ``import_router_ms``: ``import router`` in a fresh interpreter (median of 5).
- ``rss_mb``: resident memory after ``Router.load`` and after the encoder is loaded.

Targets: decision-only p50 < 0.2 ms; torch-free end-to-end p50 < 5 ms on one core (met by the
static encoder; the contextual ONNX encoder is reported beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")  # pragma: no cover - not Linux


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")  # pragma: no cover


def _pct(samples_s: list[float]) -> dict[str, float]:
    xs = sorted(samples_s)
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] * 1e3  # noqa: E731
    return {"p50": round(q(0.50), 4), "p99": round(q(0.99), 4), "mean": round(statistics.fmean(xs) * 1e3, 4)}


def read_queries(path: str | None) -> list[str]:
    if path is None:
        from tests.router.bundle_fixture import synthetic_queries

        return synthetic_queries(120)[0]
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            line = row.get("question") or row.get("text") or ""
        out.append(line)
    return out


# ---------------------------------------------------------------- worker (fresh process)


def worker(bundle: str, encoder: str, queries_path: str | None, n: int, cpus: list[int] | None) -> dict:
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))  # before onnxruntime/torch size their thread pools
    import numpy as np

    from router import Router

    queries = read_queries(queries_path)
    t0 = time.perf_counter()
    r = Router.load(bundle, encoder=encoder)
    rss_load = _rss_mb()
    r.route(queries[0])  # builds the encoder
    load_s = time.perf_counter() - t0
    rss_enc = _rss_mb()
    for q in queries[:20]:  # warm up: first runs allocate
        r.route(q)

    route, feat, pred, dec = [], [], [], []
    for i in range(n):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        r.route(q)
        route.append(time.perf_counter() - t)
    for i in range(n):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        X = r.featurizer.transform([q])
        t1 = time.perf_counter()
        r.success.predict(X), r.cost.predict(X)
        t2 = time.perf_counter()
        feat.append(t1 - t)
        pred.append(t2 - t1)
    _, P, C = r.predict(queries)
    rows = [(P[j], C[j]) for j in range(len(P))]
    for i in range(max(n, 10_000)):
        p, c = rows[i % len(rows)]
        t = time.perf_counter()
        r.decide(p, c)
        dec.append(time.perf_counter() - t)

    batch = [queries[i % len(queries)] for i in range(256)]
    qps = []
    for _ in range(3):
        t = time.perf_counter()
        r.route_batch(batch)
        qps.append(256 / (time.perf_counter() - t))

    out = {
        "encoder": r.featurizer.encoder_name,
        "cpus": sorted(os.sched_getaffinity(0)),
        "load_and_first_route_s": round(load_s, 3),
        "route_ms": _pct(route),
        "featurize_ms": _pct(feat),
        "predict_ms": _pct(pred),
        "decide_ms": _pct(dec),
        "batch256_qps": round(max(qps), 1),
        "rss_mb": {"after_load": rss_load, "with_encoder": rss_enc, "peak": _peak_mb()},
    }
    enc = r.featurizer.encoder
    if hasattr(enc, "tokenizer") and hasattr(enc.tokenizer, "encode_batch"):
        lens = [len(e.ids) for e in enc.tokenizer.encode_batch(queries)]
        out["query_word_pieces_mean"] = round(float(np.mean(lens)), 1)
    if encoder == "sentence-transformers":
        import torch

        out["torch_threads"] = torch.get_num_threads()
    return out


# ---------------------------------------------------------------- parent


def import_time_ms(runs: int = 5) -> dict:
    code = "import time; t = time.perf_counter(); import router; print(time.perf_counter() - t)"
    xs = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
        xs.append(float(out.stdout) * 1e3)
    return {"median": round(statistics.median(xs), 2), "runs": [round(x, 2) for x in xs]}


def run_worker(bundle: str, encoder: str, queries: str | None, n: int, cpus: str | None) -> dict:
    cmd = [sys.executable, "-m", "bench.route_latency", "--worker", encoder, "--bundle", bundle, "--n", str(n)]
    if queries:
        cmd += ["--queries", queries]
    if cpus:
        cmd += ["--cpus", cpus]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {encoder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: build the synthetic test bundle)")
    ap.add_argument("--static-bundle", default=None,
                    help="bundle trained on static embeddings (default: build the synthetic one)")
    ap.add_argument("--queries", default=None, help="text file, one query per line, or JSONL with question/text")
    ap.add_argument("--n", type=int, default=300, help="timed single-query routes per encoder")
    ap.add_argument("--no-write", dest="write", action="store_false",
                    help="print only; do not write bench/results/route_latency.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpus", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
        print(json.dumps(worker(args.bundle, args.worker, args.queries, args.n, cpus)))
        return

    tmp = tempfile.TemporaryDirectory(prefix="route-latency-")
    bundle, static_bundle = args.bundle, args.static_bundle
    if bundle is None or static_bundle is None:
        from tests.router.bundle_fixture import make_bundle

        if bundle is None:
            bundle = str(make_bundle(Path(tmp.name) / "contextual", onnx=True))
        if static_bundle is None:
            static_bundle = str(make_bundle(Path(tmp.name) / "static", static=True))
    try:
        from bench.results_io import start, write_result

        started = start()
        load0 = os.getloadavg()
        result = {
            "bundle": bundle,
            "queries": args.queries or "synthetic arithmetic (tests/router/bundle_fixture.py)",
            "cpu_count": os.cpu_count(),
            "import_router_ms": import_time_ms(),
            "static_1core": run_worker(static_bundle, "static", args.queries, args.n, "0"),
            "onnx_1core": run_worker(bundle, "onnx", args.queries, args.n, "0"),
            "sentence_transformers": run_worker(bundle, "sentence-transformers", args.queries, args.n, None),
            # the same torch encoder on the ONNX run's one core: separates torch vs ONNX Runtime
            # from how many cores each had
            "sentence_transformers_1core": run_worker(bundle, "sentence-transformers", args.queries, args.n, "0"),
            "loadavg_1min": {"start": round(load0[0], 2), "end": round(os.getloadavg()[0], 2)},
        }
        on, st = result["onnx_1core"], result["static_1core"]
        result["targets"] = {
            "decide_p50_under_0.2ms": on["decide_ms"]["p50"] < 0.2,
            "torch_free_route_p50_under_5ms_one_core": st["route_ms"]["p50"] < 5.0,
            "onnx_route_p50_under_5ms_one_core": on["route_ms"]["p50"] < 5.0,
        }
        print(json.dumps(result, indent=2))
        if args.write:
            print(f"wrote {write_result('route_latency', result, started)}", file=sys.stderr)
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
