"""The OpenAI-compatible routing proxy with real components: the official `openai` client talks to
the proxy, which fronts llama-cpp-python's server (SmolLM2); answers equal router.executor's for
the same seeds; overrides, headers, usage, streaming, a 32-client load test with a complete
decision log, an upstream killed mid-request, bad input, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from router import Router
from router.bundle import BundleError
from router.decision_log import read_records
from router.executor import execute
from router.proxy import ProxyConfig
from router.upstream import OpenAIUpstream
from tests.router.bundle_fixture import PROXY_TIERS, build_bundle, proxy_execution, session_proxy_bundle
from tests.upstreams import free_port, llama_server, needs_llama_server
from tests.traffic import start_proxy

pytestmark = [pytest.mark.slow, needs_llama_server]
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
EXECUTION = proxy_execution()
QUESTION = "What is 17 + 25?"


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A static-embedding bundle (the fastest featurizer) whose two models are both SmolLM2."""
    return session_proxy_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with llama_server(tmp_path_factory.mktemp("llama") / "server.log") as (base, _):
        # the first request after start-up takes a different path through the prompt cache
        OpenAIUpstream(base).complete({"prompt": "Hi", "max_tokens": 2, "seed": 1})
        yield base


@pytest.fixture(scope="module")
def router(bundle):
    r = Router.load(bundle.path)
    r.route("warm up")
    return r


@pytest.fixture(scope="module")
def proxy(router, upstream, tmp_path_factory):
    log = tmp_path_factory.mktemp("decisions") / "decisions.jsonl"
    srv = start_proxy(router, ProxyConfig(upstreams={"small": upstream, "big": upstream}, decision_log=str(log)))
    yield srv
    srv.drain(10)


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def records(srv) -> list[dict]:
    return list(read_records(srv.proxy.log.path))


# ---------------------------------------------------------------- the OpenAI schema


def test_chat_completion_is_a_normal_openai_response_with_the_decision(proxy, router):
    raw = client(proxy).chat.completions.with_raw_response.create(model="router", messages=chat(QUESTION))
    out = raw.parse()
    r = out.model_extra["router"]
    d = router.route(QUESTION)
    assert (r["tier"], r["budget"], r["samples"], r["reason"]) == (d.tier, d.budget, d.samples, d.reason)
    assert r["p_correct"] == pytest.approx(d.p_correct) and r["propensity"] == 1.0
    assert out.object == "chat.completion" and out.model == d.model
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    h = raw.headers
    assert (h["x-router-tier"], h["x-router-model"], h["x-router-budget"], h["x-router-samples"]) == \
        (d.tier, d.model, str(d.budget), str(d.samples))
    assert h["x-router-request-id"] == r["request_id"] and out.id.endswith(r["request_id"])
    # usage: summed over every upstream call (each sample and forced answer re-sends its prompt)
    u = out.usage
    assert u.prompt_tokens > 50 and u.completion_tokens >= r["tokens"] >= 1
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    rec = next(x for x in records(proxy) if x["request_id"] == r["request_id"])
    assert rec["chosen"] == d.tier and rec["tokens"] == r["tokens"] and rec["usage"]["calls"] >= 1


def test_answers_equal_the_executor_for_the_same_seeds(proxy, router, upstream):
    """The proxy executes through router.executor: same decision, same seeds, same samples."""
    engine = OpenAIUpstream(upstream, template="chatml")
    c = client(proxy)
    cases = [({"max_samples": 3, "max_budget": 16, "models": ["small"], "lambda": 0.0}, 7),  # k=3 with votes
             ({"max_budget": 0}, 11),  # the direct answer: forced straight after the prompt
             ({"models": ["big"]}, None)]  # no seed: derived from the prompt on both sides
    seen = set()
    for caps, seed in cases:
        extra = {**caps, **({"seed": seed} if seed is not None else {})}
        out = c.chat.completions.create(model="router", messages=chat(QUESTION), extra_body=extra)
        r = out.model_extra["router"]
        lam = caps.get("lambda")
        d = router.route(QUESTION, lam, **{k: v for k, v in caps.items() if k != "lambda"})
        assert r["tier"] == d.tier
        want = execute(d, engine, QUESTION, execution=router.execution(d.model), seed=seed)
        assert (out.choices[0].message.content, r["answer"], r["votes"], r["tokens"], r["seed"]) == \
            (want["content"], want["answer"], want["votes"], want["tokens"], want["seed"])
        seen.add((d.budget, d.samples))
    assert {(16, 3), (0, 1)} <= seen
    # the completions endpoint renders a single string exactly like a one-turn chat
    comp = c.completions.create(model="router", prompt=QUESTION, extra_body={"max_budget": 0, "seed": 11})
    assert comp.choices[0].text == want_direct(router, engine)


def want_direct(router, engine) -> str:
    d = router.route(QUESTION, max_budget=0)
    return execute(d, engine, QUESTION, execution=router.execution(d.model), seed=11)["content"]


def test_overrides_in_the_body_and_in_headers(proxy):
    c = client(proxy)

    def tier(**kw):
        raw = c.chat.completions.with_raw_response.create(messages=chat(QUESTION), **{"model": "router", **kw})
        return raw.parse().model_extra["router"], raw.headers

    r, _ = tier(extra_body={"max_budget": 0})
    assert r["budget"] == 0
    r, _ = tier(extra_headers={"x-router-max-samples": "1", "x-router-models": "big"})
    assert (r["samples"], r["model"]) == (1, "big")
    r, _ = tier(model="big")  # a model name routes among that model's tiers only
    assert r["model"] == "big"
    r, _ = tier(extra_body={"lambda": 1e6})  # cost is all that counts: the cheapest tier
    assert r["tier"] == "small-b0-k1"
    r, _ = tier(extra_body={"max_latency_ms": 0.001})  # no tier is that fast
    assert r["reason"] == "fallback:no-tier-within-caps"
    r, _ = tier(max_tokens=8, temperature=1.5)  # max_tokens caps the budget; sampling is the bundle's
    assert r["budget"] <= 8 and r["ignored"] == ["temperature"]
    for bad in ({"max_budget": "64"}, {"max_samples": 1.5}, {"models": ["nope"]}, {"lambda": -1}, {"n": 2},
                {"seed": "x"}):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="router", messages=chat(QUESTION), extra_body=bad)
    with pytest.raises(openai.BadRequestError, match="both"):
        c.chat.completions.create(model="router", messages=chat(QUESTION), extra_body={"max_budget": 8},
                                  extra_headers={"x-router-max-budget": "8"})
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=chat(QUESTION))
    assert e.value.body["code"] == "model_not_found"


def test_streaming_one_sample_live_and_several_buffered(proxy):
    c = client(proxy)
    for caps in ({"max_samples": 1, "max_budget": 16, "lambda": 0.0}, {"max_samples": 3, "lambda": 0.0}):
        body = {**caps, "seed": 5}
        whole = c.chat.completions.create(model="router", messages=chat(QUESTION), extra_body=body)
        with c.chat.completions.with_streaming_response.create(
                model="router", messages=chat(QUESTION), extra_body=body, stream=True,
                stream_options={"include_usage": True}) as raw:
            assert raw.headers["x-router-tier"] == whole.model_extra["router"]["tier"]
            chunks = list(raw.parse())
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content
        final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason == "stop"]
        assert len(final) == 1 and final[0].model_extra["router"]["tier"] == whole.model_extra["router"]["tier"]
        assert chunks[-1].usage.completion_tokens >= 1  # the usage chunk the client asked for
        # one sample streams as it is generated: more than one content chunk
        pieces = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)
        assert pieces > 1 if whole.model_extra["router"]["samples"] == 1 else pieces == 1
    comp = list(c.completions.create(model="router", prompt=QUESTION, stream=True,
                                     extra_body={"max_samples": 1, "max_budget": 0, "seed": 5}))
    assert "".join(ch.choices[0].text for ch in comp if ch.choices).startswith(EXECUTION.direct_prefix)


# ---------------------------------------------------------------- load


def test_32_concurrent_clients_no_5xx_and_one_log_record_each(proxy):
    n_clients, per_client = 32, 2
    before = len(records(proxy))

    def run(k: int) -> list[tuple[int, str]]:
        c = client(proxy)
        out = []
        for j in range(per_client):
            raw = c.chat.completions.with_raw_response.create(
                model="router", messages=chat(f"What is {k} + {j}?"), extra_body={"max_budget": 0})
            out.append((raw.status_code, raw.headers["x-router-request-id"]))
        return out

    with ThreadPoolExecutor(max_workers=n_clients) as pool:
        got = [x for part in pool.map(run, range(n_clients)) for x in part]
    assert [s for s, _ in got] == [200] * (n_clients * per_client)
    recs = records(proxy)[before:]
    assert len(recs) == n_clients * per_client
    assert sorted(r["request_id"] for r in recs) == sorted(rid for _, rid in got)
    assert all(r["status"] == 200 and r["upstream"]["status"] == "ok" and r["propensity"] == 1.0 for r in recs)
    text = _get(proxy.url, "/metrics")
    assert 'router_proxy_requests_total{endpoint="/v1/chat/completions",code="200"}' in text


def _get(base: str, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.read().decode()


# ---------------------------------------------------------------- faults


def test_upstream_killed_mid_request(router, upstream, tmp_path):
    """The small model's upstream is frozen with a request in it, then killed: the client gets the
    fallback tier (on the other upstream); without a fallback tier, a 502; the proxy stays up."""
    with llama_server(tmp_path / "doomed.log") as (doomed, proc):
        srv = start_proxy(router, ProxyConfig(upstreams={"small": doomed, "big": upstream}, fallback_tier="big-b12-k1",
                                        retries=1, decision_log=str(tmp_path / "d.jsonl")))
        try:
            proc.send_signal(signal.SIGSTOP)  # the request gets in, no answer comes out
            c = client(srv)
            box = {}
            t = threading.Thread(target=lambda: box.update(out=c.chat.completions.with_raw_response.create(
                model="router", messages=chat(QUESTION), extra_body={"models": ["small"], "max_samples": 1})))
            t.start()
            time.sleep(1.0)
            proc.kill()
            t.join(timeout=60)
            raw = box["out"]
            r = raw.parse().model_extra["router"]
            assert raw.status_code == 200 and r["tier"] == "big-b12-k1" and r["fallback_from"].startswith("small")
            assert raw.headers["x-router-fallback-from"] == r["fallback_from"]
            rec = read_records(tmp_path / "d.jsonl").__next__()
            assert rec["upstream"]["status"] == "fallback" and rec["executed"] == "big-b12-k1"
            assert _get(srv.url, "/health")  # still up
            metrics = _get(srv.url, "/metrics")
            assert 'router_proxy_fallbacks_total{tier="' in metrics
            assert 'router_proxy_upstream_errors_total{upstream="small",kind="connect"}' in metrics
        finally:
            srv.drain(5)
    srv = start_proxy(router, ProxyConfig(upstreams={"small": doomed, "big": upstream}, retries=1, decision_log=None))
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client(srv).chat.completions.create(model="small", messages=chat(QUESTION))
        assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"
        assert json.loads(_get(srv.url, "/health"))["status"] == "ok"
    finally:
        srv.drain(5)


# ---------------------------------------------------------------- shutdown and the command line


def test_graceful_shutdown_drains_in_flight_requests(router, upstream, tmp_path):
    srv = start_proxy(router, ProxyConfig(upstreams={"small": upstream, "big": upstream},
                                    decision_log=str(tmp_path / "d.jsonl")))
    box = {}
    t = threading.Thread(target=lambda: box.update(out=client(srv).chat.completions.create(
        model="router", messages=chat(QUESTION), extra_body={"models": ["small"], "lambda": 0.0})))
    t.start()
    while srv.in_flight == 0:
        time.sleep(0.01)
    assert srv.drain(60) is True  # waits for the request in flight
    t.join(timeout=5)
    assert box["out"].choices[0].message.content and box["out"].model_extra["router"]["samples"] == 3
    assert len(list(read_records(tmp_path / "d.jsonl"))) == 1
    with pytest.raises(openai.APIConnectionError):  # no longer listening
        client(srv).chat.completions.create(model="router", messages=chat(QUESTION))


def test_cli_serves_and_exits_cleanly_on_sigterm(bundle, tmp_path):
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "router", "proxy", "--bundle", str(bundle.path), "--port", str(port),
           "--upstream", f"small={dead}", "--upstream", f"big={dead}", "--decision-log", str(tmp_path / "d.jsonl")]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                models = json.loads(_get(f"http://127.0.0.1:{port}", "/v1/models"))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["router", "big", "small"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # a bundle without execution settings: refused at start, naming what is missing
    old = build_bundle(tmp_path / "old", n_queries=40, static=True, tiers=PROXY_TIERS)
    out = subprocess.run(cmd[:5] + [str(old.path)] + cmd[6:], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no execution settings for model(s) ['big', 'small']" in out.stderr
    with pytest.raises(BundleError, match="execution.models"):
        Router.load(old.path).execution("small")
