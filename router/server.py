"""A small HTTP server for the router, on the standard library only.

The runtime's base install has no web framework, so this is ``http.server`` with a thread per
request. Endpoints:

    POST /route        {"text": "...", caps...}        -> Decision JSON
    POST /route_batch  {"texts": ["...", ...], caps...} -> {"decisions": [...]}
    GET  /health                                        -> {"status": "ok", "bundle": ..., "tiers": n}
    GET  /metrics                                       -> Prometheus text format

Caps are ``max_budget``, ``max_samples`` (integers), ``max_cost``, ``max_latency`` (finite
numbers) and ``models`` (a list of model names), validated by ``router.caps.Caps``. Client
mistakes get a 4xx with ``{"error": ...}``: a body over the limit 413 (decided from
Content-Length, before reading), no Content-Length 411, bad JSON, wrong types or unknown keys
400, unknown paths 404. A request the router fails on (a bug, not the client's fault) is logged
with its traceback and answered with ``Router.fallback`` (the fallback tier, reason
``fallback:error``), so client input never produces a 500.

It binds 127.0.0.1 by default: put a real proxy in front of it before exposing it.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: ~500 GSM8K-sized questions per batch
DEFAULT_MAX_BATCH = 1024  # texts per /route_batch: bounds the work one request can ask for
# seconds: each bucket covers one featurized query (ms) up to a large batch (s)
# a refused body is drained (read and dropped) up to this many times the limit, for at most
# this long, so ordinary clients see the 413 rather than a broken pipe
DRAIN_FACTOR = 16
DRAIN_SECONDS = 2.0
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ClientError(Exception):
    """A request the client got wrong: becomes an HTTP 4xx with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decision_dict(d) -> dict[str, Any]:
    """A Decision as strict JSON: NaN (fallbacks have no prediction) becomes null."""
    out = d.to_dict()
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out


# ---------------------------------------------------------------- metrics


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text exposition format."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self.decisions: dict[tuple[str, str], int] = {}
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]

    def decided(self, decisions) -> None:
        with self._lock:
            for d in decisions:
                key = (d.tier, d.reason)
                self.decisions[key] = self.decisions.get(key, 0) + 1

    def observe(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            h = self.latency.setdefault(endpoint, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def request(self, endpoint: str, code: int) -> None:
        with self._lock:
            key = (endpoint, int(code))
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP router_decisions_total Routing decisions by chosen tier and reason.",
                     "# TYPE router_decisions_total counter"]
            for (tier, reason), n in sorted(self.decisions.items()):
                lines.append(f'router_decisions_total{{tier="{_label(tier)}",reason="{_label(reason)}"}} {n}')
            lines += ["# HELP router_route_latency_seconds Time the router took per request (featurize, "
                      "predict, decide).", "# TYPE router_route_latency_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                e = _label(ep)
                # buckets are cumulative already: observe() counts into every bucket >= the value
                for b, n in zip(self.buckets, h):
                    lines.append(f'router_route_latency_seconds_bucket{{endpoint="{e}",le="{b:g}"}} {n}')
                lines.append(f'router_route_latency_seconds_bucket{{endpoint="{e}",le="+Inf"}} {h[-1]}')
                lines.append(f'router_route_latency_seconds_sum{{endpoint="{e}"}} {h[-2]!r}')
                lines.append(f'router_route_latency_seconds_count{{endpoint="{e}"}} {h[-1]}')
            lines += ["# HELP router_requests_total HTTP requests by endpoint and status code.",
                      "# TYPE router_requests_total counter"]
            for (ep, code), n in sorted(self.requests.items()):
                lines.append(f'router_requests_total{{endpoint="{_label(ep)}",code="{code}"}} {n}')
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- request parsing


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ClientError(400, f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ClientError(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def parse_caps(data: dict[str, Any], allowed_keys: tuple[str, ...]):
    """The ``Caps`` of a request body; ``allowed_keys`` are the other valid keys."""
    from router.caps import Caps

    try:
        return Caps.from_mapping(data, ignore=allowed_keys)
    except ValueError as e:
        raise ClientError(400, str(e)) from e


# ---------------------------------------------------------------- server


class RouterServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` holding the router, the limits and the metrics."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: bursts of concurrent clients queue, not fail

    def __init__(self, address, router, max_body: int = DEFAULT_MAX_BODY, max_batch: int = DEFAULT_MAX_BATCH):
        self.router = router
        self.max_body = int(max_body)
        self.max_batch = int(max_batch)
        self.metrics = Metrics()
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        # a client that hung up mid-response, a socket timeout: log it, never print to stderr
        log.warning("error while serving %s", client_address, exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: RouterServer
    server_version = "difficulty-router"
    timeout = 30  # seconds a client may take to send its request: a slow client cannot pin a thread
    _unread = 0  # bytes of a refused body still on the wire

    # -------------------------------------------------------------- plumbing

    def _refuse_body(self) -> None:
        """The body will not be read: close after the response, and drain what follows."""
        self.close_connection = True
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if self.headers.get("Transfer-Encoding"):
            n = self.server.max_body
        self._unread = max(0, min(n, DRAIN_FACTOR * self.server.max_body))

    def finish(self):
        super().finish()
        if self._unread:
            self._linger()

    def _linger(self) -> None:
        # Closing a socket with unread input sends a reset, and a client still writing its
        # body then fails with a broken pipe instead of reading our 413. So: end our side,
        # discard (never buffer) what is in flight for a bounded time and size, then close.
        conn, left = self.connection, self._unread
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            conn.shutdown(socket.SHUT_WR)
            while left > 0 and time.monotonic() < deadline:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(min(1 << 16, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, content_type: str, endpoint: str) -> None:
        # counted before the bytes go out: a client that has its answer sees it in /metrics
        self.server.metrics.request(endpoint, code)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, endpoint: str) -> None:
        body = json.dumps(obj, allow_nan=False).encode("utf-8")
        self._send(code, body, "application/json", endpoint)

    def _error(self, code: int, message: str, endpoint: str) -> None:
        self._json(code, {"error": message}, endpoint)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self._refuse_body()
            raise ClientError(411, "chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise ClientError(411, "Content-Length required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ClientError(400, f"bad Content-Length {raw[:40]!r}") from None
        if n > self.server.max_body:
            self._refuse_body()  # decided from the header: the body is never read
            raise ClientError(413, f"body of {n} bytes exceeds the limit of {self.server.max_body} bytes")
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise ClientError(400, f"body ended after {len(body)} of {n} bytes")
        return body

    # -------------------------------------------------------------- methods

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/health":
            r = self.server.router
            self._json(200, {"status": "ok", "bundle": str(r.path), "tiers": len(r.tiers),
                             "encoder": r.featurizer.encoder_name}, path)
        elif path == "/metrics":
            self._send(200, self.server.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8", path)
        elif path in ("/route", "/route_batch"):
            self._error(405, f"use POST for {path}", path)
        else:
            self._error(404, f"no such endpoint {path[:100]!r}; try /route, /route_batch, /health, /metrics",
                        "other")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/route", "/route_batch"):
            self._refuse_body()
            if path in ("/health", "/metrics"):
                self._error(405, f"use GET for {path}", path)
            else:
                self._error(404, f"no such endpoint {path[:100]!r}; POST to /route or /route_batch", "other")
            return
        try:
            data = parse_json(self._read_body())
            if path == "/route":
                text = data.get("text")
                if not isinstance(text, str):
                    raise ClientError(400, 'body needs "text": a string')
                texts = [text]
                caps = parse_caps(data, ("text",))
            else:
                texts = data.get("texts")
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise ClientError(400, 'body needs "texts": a list of strings')
                if len(texts) > self.server.max_batch:
                    raise ClientError(400, f"{len(texts)} texts exceed the batch limit of {self.server.max_batch}")
                caps = parse_caps(data, ("texts",))
        except ClientError as e:
            self._error(e.status, str(e), path)
            return
        decisions = self._route(texts, caps, path)
        if path == "/route":
            self._json(200, decision_dict(decisions[0]), path)
        else:
            self._json(200, {"decisions": [decision_dict(d) for d in decisions]}, path)

    def _route(self, texts: list[str], caps, endpoint: str):
        router = self.server.router
        t0 = time.perf_counter()
        try:
            decisions = router.route_batch(texts, caps=caps) if texts else []
        except Exception:
            # the router promises not to raise on any text; if it does, that is our bug, not
            # the client's: log it and send the safe tier rather than a 500
            log.exception("route failed on %d text(s); answering with the fallback tier", len(texts))
            decisions = [router.fallback(caps, reason="fallback:error")] * len(texts)
        self.server.metrics.observe(endpoint, time.perf_counter() - t0)
        self.server.metrics.decided(decisions)
        return decisions


def make_server(router, host: str = "127.0.0.1", port: int = 8080, max_body: int = DEFAULT_MAX_BODY,
                max_batch: int = DEFAULT_MAX_BATCH) -> RouterServer:
    """A bound, not yet serving server (port 0 picks a free port: see ``server.url``)."""
    return RouterServer((host, port), router, max_body=max_body, max_batch=max_batch)


def serve(router, host: str = "127.0.0.1", port: int = 8080, max_body: int = DEFAULT_MAX_BODY,
          max_batch: int = DEFAULT_MAX_BATCH, ready=None) -> None:
    """Serve until interrupted. ``router`` is a ``Router`` or a bundle path.

    The encoder is loaded before the port opens, so the first request does not pay for it.
    """
    if not hasattr(router, "route_batch"):
        from router.runtime import Router

        router = Router.load(router)
    router.route("warm up")
    server = make_server(router, host, port, max_body, max_batch)
    log.info("router serving %s on %s", router.path, server.url)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
