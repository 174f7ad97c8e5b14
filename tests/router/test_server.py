"""HTTP server on loopback: endpoints, Prometheus metrics, 4xx for bad input, concurrent clients."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from router import Router
from router.server import make_server
from tests.router.bundle_fixture import session_bundle

MAX_BODY = 64 * 1024
TIMEOUT = 30  # seconds per request: generous for a loaded CI machine, finite so nothing hangs


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return session_bundle(tmp_path_factory)


def start(router, **kw):
    srv = make_server(router, "127.0.0.1", 0, max_body=MAX_BODY, **kw)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return srv, t


def stop(srv, t):
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)


@pytest.fixture(scope="module")
def router(built):
    r = Router.load(built.path)
    r.route("warm up")
    return r


@pytest.fixture(scope="module")
def server(router):
    srv, t = start(router)
    yield srv
    stop(srv, t)


def call(srv, method, path, body=None, headers=None):
    """(status, parsed JSON or text) over a fresh loopback connection."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(raw) if ctype.startswith("application/json") else raw.decode())
    finally:
        conn.close()


def raw_request(srv, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no Content-Length added) and read the status line and body."""
    with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    resp = b"".join(chunks)
    return int(resp.split(b" ", 2)[1]), resp.split(b"\r\n\r\n", 1)[1]


def metrics(srv) -> dict[str, float]:
    status, text = call(srv, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


# ---------------------------------------------------------------- endpoints


def test_health(server, built):
    status, body = call(server, "GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["tiers"] == 5 and body["bundle"] == str(built.path)


def test_route_returns_a_decision(server, router):
    status, d = call(server, "POST", "/route", {"text": "What is 17 * 23?"})
    assert status == 200
    assert set(d) == {"tier", "budget", "samples", "model", "p_correct", "expected_cost", "reason"}
    assert d == router.route("What is 17 * 23?").to_dict()


def test_route_with_caps_and_fallbacks(server, built):
    status, d = call(server, "POST", "/route", {"text": "What is 1234567 * 7654321?", "max_budget": 0})
    assert status == 200 and d["budget"] == 0
    status, d = call(server, "POST", "/route", {"text": "What is 12 + 30?", "models": ["big"], "max_cost": 1e9})
    assert status == 200 and d["model"] == "big"
    status, d = call(server, "POST", "/route", {"text": "", "max_latency": 10})
    assert status == 200 and d["reason"] == "fallback:empty-query" and d["p_correct"] is None  # null, not NaN
    status, d = call(server, "POST", "/route", {"text": "What is 2 + 2?", "max_budget": -1})
    assert status == 200 and d["reason"] == "fallback:no-tier-within-caps"


def test_route_batch_matches_single_routes(server):
    texts = ["What is 17 * 23?", "", "Tom has 1234567 apples and gives 3 away. How many are left?"]
    status, body = call(server, "POST", "/route_batch", {"texts": texts, "max_samples": 1})
    assert status == 200 and len(body["decisions"]) == 3
    for text, d in zip(texts, body["decisions"]):
        assert d == call(server, "POST", "/route", {"text": text, "max_samples": 1})[1]
    assert call(server, "POST", "/route_batch", {"texts": []}) == (200, {"decisions": []})


def test_metrics_count_decisions_requests_and_latency(server):
    before = metrics(server)
    _, d = call(server, "POST", "/route", {"text": "What is 40 + 2?"})
    call(server, "POST", "/route_batch", {"texts": ["What is 40 + 2?", "What is 40 + 2?"]})
    call(server, "POST", "/route", b"{not json")
    after = metrics(server)
    key = f'router_decisions_total{{tier="{d["tier"]}",reason="{d["reason"]}"}}'
    assert after[key] - before.get(key, 0) == 3
    assert after['router_requests_total{endpoint="/route",code="200"}'] - \
        before.get('router_requests_total{endpoint="/route",code="200"}', 0) == 1
    assert after['router_requests_total{endpoint="/route",code="400"}'] >= 1
    count = 'router_route_latency_seconds_count{endpoint="/route"}'
    assert after[count] - before.get(count, 0) == 1
    assert after['router_route_latency_seconds_sum{endpoint="/route"}'] > 0
    prefix = 'router_route_latency_seconds_bucket{endpoint="/route"'
    buckets = [(k, v) for k, v in after.items() if k.startswith(prefix)]
    assert buckets[-1][0].endswith('le="+Inf"}') and buckets[-1][1] == after[count]
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    _, text = call(server, "GET", "/metrics")
    for name, kind in (("router_decisions_total", "counter"), ("router_route_latency_seconds", "histogram"),
                       ("router_requests_total", "counter")):
        assert f"# TYPE {name} {kind}" in text
    assert re.search(r'^router_route_latency_seconds_bucket\{endpoint="/route",le="0.005"\} \d+$', text, re.M)


# ---------------------------------------------------------------- client errors


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"text": NaN}', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"[" * 50_000, "not valid JSON"),  # nesting deeper than the parser recurses
    ({"text": 42}, '"text"'),
    ({}, '"text"'),
    ({"text": "hi", "max_tokens": 3}, "unknown key"),
    ({"text": "hi", "max_budget": "64"}, "max_budget"),
    ({"text": "hi", "max_budget": True}, "max_budget"),
    ({"text": "hi", "max_samples": 1.5}, "max_samples"),
    ({"text": "hi", "max_cost": "cheap"}, "max_cost"),
    ({"text": "hi", "models": "big"}, "models"),
    ({"text": "hi", "models": [1]}, "models"),
])
def test_bad_route_bodies_get_400(server, body, fragment):
    status, resp = call(server, "POST", "/route", body)
    assert status == 400 and fragment in resp["error"]


def test_bad_batch_bodies_get_400(server):
    for body in ({"texts": "one"}, {"texts": ["a", 2]}, {"text": "a"}, {"texts": ["a"] * 1025}):
        status, resp = call(server, "POST", "/route_batch", body)
        assert status == 400 and "error" in resp


def test_oversized_body_is_refused_from_content_length(server):
    # the header alone decides: the server answers without waiting for 10 MB that never come
    status, body = raw_request(server, b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    assert status == 413 and b"exceeds" in body
    status, resp = call(server, "POST", "/route", {"text": "x" * MAX_BODY})
    assert status == 413
    status, resp = call(server, "POST", "/route", {"text": "x" * (MAX_BODY - 100)})
    assert status == 200 and resp["reason"] in ("utility:truncated", "fallback:out-of-distribution")


def test_missing_or_bad_content_length(server):
    status, _ = raw_request(server, b"POST /route HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411
    status, _ = raw_request(server, b"POST /route HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411
    status, _ = raw_request(server, b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status == 400


def test_unknown_paths_and_wrong_methods(server):
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "POST", "/nope", {"text": "x"})[0] == 404
    assert call(server, "GET", "/route")[0] == 405
    assert call(server, "POST", "/health", {})[0] == 405
    assert call(server, "GET", "/health")[0] == 200  # still serving after all of the above


def test_router_failure_is_logged_and_answered_with_the_fallback_tier(built, caplog):
    broken = Router.load(built.path)

    def boom(*a, **kw):
        raise RuntimeError("simulated encoder crash")

    broken.route_batch = boom
    srv, t = start(broken)
    try:
        status, d = call(srv, "POST", "/route", {"text": "What is 2 + 2?"})
        assert status == 200
        assert (d["tier"], d["reason"]) == (built.manifest["policy"]["fallback_tier"], "fallback:error")
        status, d = call(srv, "POST", "/route", {"text": "What is 2 + 2?", "models": ["small"], "max_budget": 0})
        assert (status, d["tier"]) == (200, built.manifest["policy"]["cheapest_tier"])
    finally:
        stop(srv, t)
    assert "simulated encoder crash" in caplog.text


# ---------------------------------------------------------------- concurrency


def test_concurrent_clients_all_get_answers(server, built):
    before = metrics(server).get('router_requests_total{endpoint="/route",code="200"}', 0)
    texts = built.texts[:25]

    def client(k):
        out = []
        for i, text in enumerate(texts):
            body = {"text": text} if (i + k) % 5 else {"text": text, "max_budget": 64}
            out.append(call(server, "POST", "/route", body)[0])
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = [s for got in pool.map(client, range(8), timeout=300) for s in got]
    assert statuses == [200] * 200
    after = metrics(server)['router_requests_total{endpoint="/route",code="200"}']
    assert after - before == 200
