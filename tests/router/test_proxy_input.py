"""The proxy's answers to bad input and failing upstreams, against a scripted upstream: OpenAI-style
4xx errors and never a 500 for client mistakes; bounded retries then the fallback tier or a 502;
a stream cut mid-way; the decision log's fields; draining."""

from __future__ import annotations

import http.client
import json

import pytest

from router import Router
from router.decision_log import read_records
from router.proxy import ProxyConfig
from tests.fakes import FakeOpenAIServer
from tests.router.bundle_fixture import PROXY_TIERS, build_bundle, proxy_execution, session_proxy_bundle
from tests.traffic import start_proxy

MAX_BODY = 32 * 1024
Q = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    r = Router.load(session_proxy_bundle(tmp_path_factory).path)
    r.route("warm up")
    return r


@pytest.fixture
def fake():
    with FakeOpenAIServer() as f:
        yield f


def start(router, fake_url, tmp_path, **kw):
    cfg = {"upstreams": {"small": fake_url, "big": fake_url}, "max_body": MAX_BODY, "retries": 1,
           "decision_log": str(tmp_path / "d.jsonl"), **kw}
    return start_proxy(router, ProxyConfig(**cfg))


@pytest.fixture
def proxy(router, fake, tmp_path):
    srv = start(router, fake.url, tmp_path)
    yield srv
    srv.drain(5)


def call(srv, method, path, body=None, headers=None, raw: bytes | None = None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            return resp.status, json.loads(text), dict(resp.headers)
        except ValueError:
            return resp.status, text, dict(resp.headers)
    finally:
        conn.close()


def is_openai_error(body) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                                                      "code"}


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1]", 400, None),
    ({"messages": Q}, 400, "model"),
    ({"model": "gpt-4", "messages": Q}, 404, "model"),
    ({"model": "router"}, 400, "messages"),
    ({"model": "router", "messages": []}, 400, "messages"),
    ({"model": "router", "messages": "hi"}, 400, "messages"),
    ({"model": "router", "messages": [{"role": "user", "content": 42}]}, 400, "messages"),
    ({"model": "router", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"model": "router", "messages": Q + [{"role": "assistant", "content": "4"}]}, 400, "messages"),
    ({"model": "router", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "router", "messages": Q, "n": 3}, 400, "n"),
    ({"model": "router", "messages": Q, "stream": "yes"}, 400, "stream"),
    ({"model": "router", "messages": Q, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "router", "messages": Q, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "router", "messages": Q, "max_budget": True}, 400, "max_budget"),
    ({"model": "router", "messages": Q, "max_cost": float("nan")}, 400, None),
    ({"model": "router", "messages": Q, "seed": -1}, 400, "seed"),
    ({"model": "router", "messages": Q, "max_tokens": "many"}, 400, "max_tokens"),
])
def test_bad_chat_requests_get_openai_style_4xx(proxy, fake, body, status, param):
    got, resp, _ = call(proxy, "POST", "/v1/chat/completions", raw=body if isinstance(body, bytes) else None,
                        body=None if isinstance(body, bytes) else body)
    assert got == status and is_openai_error(resp), resp
    assert resp["error"]["type"] == "invalid_request_error" and "Traceback" not in resp["error"]["message"]
    if param:
        assert resp["error"]["param"] == param
    assert fake.calls == []  # refused before anything reached the upstream


def test_bad_completions_requests_and_http_mistakes(proxy):
    for body in ({"model": "router", "prompt": [1, 2, 3]}, {"model": "router", "prompt": ["a", "b"]},
                 {"model": "router", "prompt": "x", "echo": True}, {"model": "router", "prompt": "x", "best_of": 2}):
        status, resp, _ = call(proxy, "POST", "/v1/completions", body)
        assert status == 400 and is_openai_error(resp), body
    status, resp, _ = call(proxy, "POST", "/v1/completions", raw=b"x" * (MAX_BODY + 1))
    assert status == 413 and is_openai_error(resp)
    assert call(proxy, "GET", "/v1/chat/completions")[0] == 405
    assert call(proxy, "POST", "/health", {})[0] == 405
    status, resp, _ = call(proxy, "GET", "/nope")
    assert status == 404 and is_openai_error(resp)
    status, models, _ = call(proxy, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["router", "big", "small"]
    status, health, _ = call(proxy, "GET", "/health")
    assert health["status"] == "ok" and set(health["upstreams"]) == {"small", "big"}


def test_a_good_request_and_its_log_record(proxy, fake, router):
    status, resp, headers = call(proxy, "POST", "/v1/chat/completions",
                                 {"model": "router", "messages": Q, "seed": 3, "max_samples": 1, "user": "u1"})
    assert status == 200 and resp["choices"][0]["message"]["content"]
    r = resp["router"]
    assert r["ignored"] == ["user"] and r["seed"] == 3 and r["labelled_prompt"] is True
    assert headers["x-router-tier"] == r["tier"] and headers["Content-Type"] == "application/json"
    (rec,) = read_records(proxy.proxy.log.path)
    assert rec["request_id"] == r["request_id"] and rec["bundle"]["sha256"] == router.bundle_sha256
    assert rec["chosen"] == r["tier"] and rec["propensity"] == 1.0 and rec["caps"] == {"max_samples": 1}
    assert {a["tier"] for a in rec["allowed"]} == {t.name for t in router.tiers if t.samples <= 1}
    for a in rec["allowed"]:
        assert a["utility"] == pytest.approx(a["p_correct"] - rec["lambda"] * a["cost"])
    assert len(rec["features_sha256"]) == 16 and rec["featurizer"]["encoder"] == "static"
    assert rec["tokens"] == r["tokens"] and rec["usage"]["calls"] == len(fake.calls)
    assert rec["latency_ms"]["total"] >= rec["latency_ms"]["upstream"] > 0
    assert "text" not in rec and "answer" not in rec  # no prompt text unless --log-text
    # a client system message and an earlier turn: context, not routed on, and not the labels' prompt
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}] + Q
    status, resp2, _ = call(proxy, "POST", "/v1/chat/completions", {"model": "router", "messages": conv, "seed": 3,
                                                                     "max_samples": 1})
    assert resp2["router"]["tier"] == r["tier"] and resp2["router"]["labelled_prompt"] is False
    assert "Be brief." in fake.calls[-1]["prompt"] and "Hello." in fake.calls[-1]["prompt"]
    rec2 = list(read_records(proxy.proxy.log.path))[-1]
    assert rec2["features_sha256"] == rec["features_sha256"]  # the same last turn: the same features


def test_log_text_writes_the_text_and_the_answer(router, fake, tmp_path):
    srv = start(router, fake.url, tmp_path, log_text=True)
    try:
        call(srv, "POST", "/v1/completions", {"model": "small", "prompt": "What is 2 + 2?"})
        (rec,) = read_records(tmp_path / "d.jsonl")
        assert rec["text"] == "What is 2 + 2?" and rec["answer"] == "4"
    finally:
        srv.drain(5)


@pytest.mark.parametrize("script,error", [(["garbage"] * 2, "no completion choice"), (["500"] * 2, "HTTP 500")])
def test_a_failing_upstream_gets_a_502_or_the_fallback_tier(router, tmp_path, script, error):
    with FakeOpenAIServer(script) as bad:
        srv = start(router, bad.url, tmp_path)
        try:
            body = {"model": "router", "messages": Q, "max_samples": 1, "max_budget": 16}
            status, resp, headers = call(srv, "POST", "/v1/chat/completions", body)
            assert status == 502 and is_openai_error(resp) and error in resp["error"]["message"]
            assert resp["error"]["type"] == "upstream_error" and headers["x-router-tier"]
            assert len(bad.calls) == 2  # one try and one retry (retries=1)
            (rec,) = read_records(tmp_path / "d.jsonl")
            assert rec["status"] == 502 and rec["upstream"]["status"] == "error" and rec["tokens"] is None
            assert call(srv, "GET", "/health")[0] == 200
        finally:
            srv.drain(5)
    # the small model's upstream fails; big's answers: the configured fallback tier takes over
    with FakeOpenAIServer(["500"] * 2) as bad, FakeOpenAIServer() as good:
        srv = start_proxy(router, ProxyConfig(upstreams={"small": bad.url, "big": good.url}, retries=1,
                                              fallback_tier="big-b12-k1", decision_log=None))
        try:
            status, resp, headers = call(srv, "POST", "/v1/chat/completions",
                                         {"model": "router", "messages": Q, "models": ["small"]})
            assert status == 200 and resp["router"]["tier"] == "big-b12-k1"
            assert resp["router"]["reason"] == "fallback:upstream-error"
            assert headers["x-router-fallback-from"] == resp["router"]["fallback_from"]
        finally:
            srv.drain(5)


def test_a_slow_upstream_times_out_into_a_502(router, tmp_path):
    with FakeOpenAIServer(["slow"] * 2, delay=1.0) as slow:
        srv = start(router, slow.url, tmp_path, upstream_timeout=0.2)
        try:
            status, resp, _ = call(srv, "POST", "/v1/chat/completions", {"model": "router", "messages": Q})
            assert status == 502 and "timed out" in resp["error"]["message"]
            status, text, _ = call(srv, "GET", "/metrics")
            assert 'router_proxy_upstream_errors_total{upstream="small",kind="timeout"} 2' in text \
                or 'router_proxy_upstream_errors_total{upstream="big",kind="timeout"} 2' in text
        finally:
            srv.drain(5)


def test_a_stream_cut_mid_way_ends_with_an_error_event(router, tmp_path):
    openai = pytest.importorskip("openai")
    with FakeOpenAIServer(["cut"]) as cut:
        srv = start(router, cut.url, tmp_path)
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            got = []
            with pytest.raises(openai.APIError, match="upstream failed"):
                for ch in c.chat.completions.create(model="router", messages=Q, stream=True,
                                                    extra_body={"max_samples": 1, "max_budget": 16}):
                    got.append(ch)
            assert got  # the text before the cut reached the client
            assert call(srv, "GET", "/health")[0] == 200
        finally:
            srv.drain(5)


def test_metrics_names(proxy):
    call(proxy, "POST", "/v1/chat/completions", {"model": "router", "messages": Q})
    status, text, _ = call(proxy, "GET", "/metrics")
    for name, kind in (("router_proxy_requests_total", "counter"), ("router_proxy_decisions_total", "counter"),
                       ("router_proxy_request_seconds", "histogram"), ("router_proxy_tokens_per_request", "histogram"),
                       ("router_proxy_upstream_errors_total", "counter"), ("router_proxy_fallbacks_total", "counter"),
                       ("router_proxy_route_seconds", "histogram"),
                       ("router_proxy_upstream_tokens_per_second", "gauge")):
        assert f"# TYPE {name} {kind}" in text
    assert 'router_proxy_request_seconds_bucket{tier="' in text


def test_max_latency_ms_without_measured_speed_is_a_400(fake, tmp_path):
    ex = proxy_execution(tokens_per_second=None)
    b = build_bundle(tmp_path / "b", n_queries=40, static=True, tiers=PROXY_TIERS, execution={"small": ex, "big": ex})
    srv = start(Router.load(b.path), fake.url, tmp_path)
    try:
        status, resp, _ = call(srv, "POST", "/v1/chat/completions", {"model": "router", "messages": Q,
                                                                     "max_latency_ms": 500})
        assert status == 400 and "measured speed" in resp["error"]["message"]
        # what the proxy observes becomes the speed (then an average: EWMA with weight 0.2)
        srv.proxy.observe_speed("small", 100, 1.0)
        srv.proxy.observe_speed("small", 400, 2.0)
        srv.proxy.observe_speed("big", 4, 1.0)  # too short to say anything about speed: ignored
        assert srv.router.tokens_per_second == {"small": pytest.approx(0.8 * 100 + 0.2 * 200)}
        srv.proxy.observe_speed("big", 50, 1.0)
        lat = srv.router.tier_latency_ms()
        status, resp, _ = call(srv, "POST", "/v1/chat/completions", {"model": "router", "messages": Q,
                                                                     "max_latency_ms": sorted(lat)[1]})
        assert status == 200 and resp["router"]["expected_latency_ms"] <= sorted(lat)[1] + 0.1
    finally:
        srv.drain(5)


def test_a_routing_failure_is_answered_with_the_fallback_tier(router, fake, tmp_path):
    broken = Router.load(router.path)

    def boom(*a, **kw):
        raise RuntimeError("simulated encoder crash")

    broken.route_detailed = boom
    srv = start(broken, fake.url, tmp_path)
    try:
        status, resp, _ = call(srv, "POST", "/v1/chat/completions", {"model": "router", "messages": Q})
        assert status == 200 and resp["router"]["reason"] == "fallback:error"
    finally:
        srv.drain(5)


def test_a_draining_proxy_refuses_new_requests(router, fake, tmp_path):
    srv = start(router, fake.url, tmp_path)
    srv.draining = True
    status, resp, headers = call(srv, "POST", "/v1/chat/completions", {"model": "router", "messages": Q})
    assert status == 503 and is_openai_error(resp) and headers.get("Connection") == "close"
    srv.draining = False
    srv.drain(5)
