"""A small HTTP server for the router, on the standard library only.

The runtime's base install has no web framework, so this is ``http.server`` with a thread per
request. Endpoints:

    POST /route        {"text": "...", caps...}        -> Decision JSON
    POST /route_batch  {"texts": ["...", ...], caps...} -> {"decisions": [...]}
    GET  /health                                        -> {"status": "ok", "bundle": ..., "tiers": n}
    GET  /metrics                                       -> Prometheus text format

Caps are ``max_budget``, ``max_samples`` (integers), ``max_cost``, ``max_latency``,
``max_latency_ms`` (finite numbers) and ``models`` (a list of model names), validated by
``router.caps.Caps``. Client
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


class Prometheus:
    """Counters, gauges and histograms with labels, rendered in Prometheus' text exposition
    format; thread-safe. Metrics render in the order they were declared, label sets sorted."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {}
        self._data: dict[str, dict[tuple, Any]] = {}
        self._collect: dict[str, Any] = {}  # name -> callable giving {labels: value} at render time

    def declare(self, name: str, kind: str, help_: str, labels: tuple[str, ...] = (), buckets=None, collect=None):
        """Declare ``name`` (``counter``, ``gauge`` or ``histogram``); ``collect``: a function
        returning ``{label values: value}`` read at render time instead of stored values."""
        self._meta[name] = (kind, help_, tuple(labels), tuple(buckets) if buckets else None)
        self._data[name] = {}
        if collect is not None:
            self._collect[name] = collect
        return self

    def inc(self, name: str, labels: tuple = (), by: float = 1) -> None:
        with self._lock:
            d = self._data[name]
            d[labels] = d.get(labels, 0) + by

    def set(self, name: str, labels: tuple = (), value: float = 0.0) -> None:
        with self._lock:
            self._data[name][labels] = value

    def observe(self, name: str, labels: tuple, value: float) -> None:
        buckets = self._meta[name][3]
        with self._lock:
            h = self._data[name].setdefault(labels, [0] * len(buckets) + [0.0, 0])
            for i, b in enumerate(buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, labels: tuple = ()):
        with self._lock:
            return self._data[name].get(labels)

    def render(self) -> str:
        lines = []
        for name, (kind, help_, names, buckets) in self._meta.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            if name in self._collect:
                data = dict(self._collect[name]())
            else:
                with self._lock:
                    data = {k: (list(v) if isinstance(v, list) else v) for k, v in self._data[name].items()}
            for labels, v in sorted(data.items()):
                lab = ",".join(f'{n}="{_label(x)}"' for n, x in zip(names, labels))
                if kind != "histogram":
                    lines.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")
                    continue
                # buckets are cumulative already: observe() counts into every bucket >= the value
                sep = "," if lab else ""
                for b, n in zip(buckets, v):
                    lines.append(f'{name}_bucket{{{lab}{sep}le="{b:g}"}} {n}')
                lines.append(f'{name}_bucket{{{lab}{sep}le="+Inf"}} {v[-1]}')
                lines.append(f"{name}_sum{{{lab}}} {v[-2]!r}" if lab else f"{name}_sum {v[-2]!r}")
                lines.append(f"{name}_count{{{lab}}} {v[-1]}" if lab else f"{name}_count {v[-1]}")
        return "\n".join(lines) + "\n"


class Metrics:
    """The decision server's metrics: decisions per tier, route latency, requests by code."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.prom = Prometheus()
        self.prom.declare("router_decisions_total", "counter", "Routing decisions by chosen tier and reason.",
                          ("tier", "reason"))
        self.prom.declare("router_route_latency_seconds", "histogram",
                          "Time the router took per request (featurize, predict, decide).", ("endpoint",), buckets)
        self.prom.declare("router_requests_total", "counter", "HTTP requests by endpoint and status code.",
                          ("endpoint", "code"))

    def decided(self, decisions) -> None:
        for d in decisions:
            self.prom.inc("router_decisions_total", (d.tier, d.reason))

    def observe(self, endpoint: str, seconds: float) -> None:
        self.prom.observe("router_route_latency_seconds", (endpoint,), seconds)

    def request(self, endpoint: str, code: int) -> None:
        self.prom.inc("router_requests_total", (endpoint, str(int(code))))

    def render(self) -> str:
        return self.prom.render()


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


def parse_caps(data: dict[str, Any], allowed_keys: tuple[str, ...], router=None):
    """The ``Caps`` of a request body; ``allowed_keys`` are the other valid keys. With a
    ``router``, caps it cannot apply (``max_latency_ms`` without measured speeds) are a 400 too."""
    from router.caps import Caps

    try:
        caps = Caps.from_mapping(data, ignore=allowed_keys)
        return router.check_caps(caps) if router is not None else caps
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


class BodyHandler(BaseHTTPRequestHandler):
    """Reading a bounded JSON body and answering it: what the decision server and the proxy share.

    The server must have ``max_body`` and ``metrics`` (with ``request(endpoint, code)``);
    subclasses say how an error looks (``_error``)."""

    timeout = 30  # seconds a client may take to send its request: a slow client cannot pin a thread
    # TCP_NODELAY: headers and body go out in two writes, and Nagle's algorithm would hold the
    # second until the client's delayed ACK (~40 ms on Linux; measured on keep-alive connections)
    disable_nagle_algorithm = True
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

    def _send(self, code: int, body: bytes, content_type: str, endpoint: str, headers=None) -> None:
        # counted before the bytes go out: a client that has its answer sees it in /metrics
        self.server.metrics.request(endpoint, code)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # headers and body in one write (end_headers would send them in two): one syscall, and
        # nothing for Nagle's algorithm to hold back
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def _json(self, code: int, obj: Any, endpoint: str, headers=None) -> None:
        body = json.dumps(obj, allow_nan=False).encode("utf-8")
        self._send(code, body, "application/json", endpoint, headers)

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


class Handler(BodyHandler):
    server: RouterServer
    server_version = "difficulty-router"

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
                caps = parse_caps(data, ("text",), self.server.router)
            else:
                texts = data.get("texts")
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise ClientError(400, 'body needs "texts": a list of strings')
                if len(texts) > self.server.max_batch:
                    raise ClientError(400, f"{len(texts)} texts exceed the batch limit of {self.server.max_batch}")
                caps = parse_caps(data, ("texts",), self.server.router)
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
