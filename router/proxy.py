"""``python -m router proxy``: an OpenAI-compatible endpoint that routes every request and
executes the chosen tier on an OpenAI-compatible upstream, exactly as the labels assumed.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

A client sends ``model: "router"`` to be routed among every tier, or a bundle model's name to be
routed among that model's tiers. The proxy routes on the last user turn (``router.chat``),
renders the conversation with the model's template, runs the decision with
``router.executor.execute`` on the model's upstream (``router.upstream``: tier (B, k) = k seeded
requests at ``max_tokens=B``, forced answers for cut samples, majority vote) and answers in the
OpenAI schema: the winning sample as the message, ``usage`` summed over every upstream call, the
decision in ``x-router-*`` headers and a ``router`` object. Every routed request appends one
record to the decision log (``router.decision_log``). The README's "Serve it" section documents
overrides, streaming, the log's fields and the fault behaviour; this module is the code.

Standard library only (``http.server`` with a thread per connection, HTTP/1.1 keep-alive), like
``router.server``, whose body limits and metrics it shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Callable

from router.caps import Caps
from router.chat import Conversation, parse_messages
from router.decision import Decision
from router.execution import SEED_LIMIT, require
from router.server import DEFAULT_MAX_BODY, BodyHandler, ClientError, Prometheus, parse_json
from router.upstream import OpenAIUpstream, UpstreamError

log = logging.getLogger(__name__)

ROUTER_MODEL = "router"
# request seconds, per tier: one forced answer (~0.05 s) up to long reasoning with votes (minutes)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
MIN_SPEED_TOKENS = 8  # executions shorter than this say more about prompt processing than speed

# the overrides a request may carry in its body (the OpenAI client's ``extra_body``) or headers
OVERRIDES = ("max_budget", "max_samples", "max_cost", "max_latency", "max_latency_ms", "models", "lambda")
HEADER_PREFIX = "x-router-"
# OpenAI fields the proxy accepts and does not use: the bundle's sampling settings are what the
# labels assumed. Reported back in ``router.ignored``
IGNORED = ("temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty", "repetition_penalty",
           "logit_bias", "logprobs", "top_logprobs", "stop", "user", "metadata", "store", "service_tier",
           "parallel_tool_calls", "min_p", "reasoning_effort")
COMMON = ("model", "stream", "stream_options", "seed", "n", "max_tokens") + OVERRIDES + IGNORED
FIELDS = {"chat": COMMON + ("messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
                            "functions", "function_call"),
          "completions": COMMON + ("prompt", "echo", "suffix", "best_of")}
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
GET_ENDPOINTS = ("/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ProxyConfig:
    """How the proxy reaches its upstreams, what it falls back to, and where it logs."""

    upstreams: dict  # bundle model name -> base URL (up to and including /v1)
    upstream_models: dict = field(default_factory=dict)  # bundle model -> the upstream's name (default: asked)
    fallback_tier: str | None = None  # executed when the chosen tier's upstream fails; None: 502
    retries: int = 2  # more tries per upstream call on a passing failure (backoff 0.1 s, doubling)
    upstream_timeout: float = 120.0  # seconds per upstream call without a byte: a stalled upstream fails
    upstream_concurrency: int = 64  # calls in flight per upstream; more wait for a free connection
    max_body: int = DEFAULT_MAX_BODY
    decision_log: str | None = "logs/decisions.jsonl"  # None: no log
    log_text: bool = False  # write the routed text and the answer into the log
    log_max_bytes: int = 64 << 20
    log_keep: int = 0  # rotated files kept (0: all)
    log_fsync: str = "record"  # record | none (router.decision_log)
    drain_seconds: float = 30.0  # on shutdown, how long in-flight requests may take to finish
    speed_alpha: float = 0.2  # weight of a new observation in each upstream's speed average (EWMA)
    # epsilon-greedy exploration rate (router.policy.explore_choice), seeded by the request id;
    # None: the bundle's policy.explore (0 unless exported with one)
    explore: float | None = None
    drift_report: str | None = None  # a `pipelines drift` report whose figures /metrics exports as gauges


class RequestError(ClientError):
    """A client mistake, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(status, message)
        self.param, self.code, self.type = param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Request:
    """One parsed OpenAI request."""

    kind: str  # chat | completions
    conversation: Conversation
    caps: Caps
    lam: float | None
    seed: int | None
    stream: bool
    include_usage: bool
    model: str  # what the client asked for: "router" or a bundle model
    ignored: list[str]


def _number(name: str, v: Any, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                           name)
    if not math.isfinite(v):
        raise RequestError(400, f"{name} must be finite", name)
    return v


def _header_overrides(headers) -> dict[str, Any]:
    """``x-router-max-budget: 64`` etc. as override values (``x-router-models``: comma-separated)."""
    out = {}
    for name in OVERRIDES:
        raw = headers.get(HEADER_PREFIX + name.replace("_", "-"))
        if raw is None:
            continue
        if name == "models":
            out[name] = [m.strip() for m in raw.split(",") if m.strip()]
            continue
        try:
            out[name] = int(raw) if name in ("max_budget", "max_samples") else float(raw)
        except ValueError:
            raise RequestError(400, f"header {HEADER_PREFIX}{name.replace('_', '-')}: {raw[:40]!r} is not a "
                               f"{'whole ' if name in ('max_budget', 'max_samples') else ''}number", name) from None
    return out


def parse_request(kind: str, body: dict, headers, models: list[str]) -> Request:
    """Validate an OpenAI request body (and the override headers); ``RequestError`` on any mistake."""
    unknown = sorted(set(body) - set(FIELDS[kind]))
    if unknown:
        raise RequestError(400, f"unknown parameter(s) {unknown}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, 'model must be a string: "router", or one of the bundle\'s models ' + str(models),
                           "model")
    if model != ROUTER_MODEL and model not in models:
        raise RequestError(404, f"model {model!r} does not exist here; use {ROUTER_MODEL!r} or one of {models}",
                           "model", "model_not_found")
    if kind == "chat":
        for name in ("tools", "functions"):
            if body.get(name):
                raise RequestError(400, f"{name} are not supported by the router proxy", name)
        rf = body.get("response_format")
        if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
            raise RequestError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
        try:
            conversation = parse_messages(body.get("messages"))
        except ValueError as e:
            raise RequestError(400, str(e), "messages") from e
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt must be a string (one prompt per request)", "prompt")
        for name, default in (("echo", False), ("suffix", None), ("best_of", 1)):
            if body.get(name) not in (default, None):
                raise RequestError(400, f"{name} is not supported by the router proxy", name)
        conversation = Conversation.of_text(prompt)
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, "n must be 1: the router answers with one (voted) choice", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(400, "stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "stream_options must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None:
        _number("seed", seed, integer=True)
        if not 0 <= seed < SEED_LIMIT:
            raise RequestError(400, f"seed must be in [0, {SEED_LIMIT})", "seed")
    # overrides: body (extra_body) or headers, not both for the same one
    given = {k: body[k] for k in OVERRIDES if body.get(k) is not None}
    from_headers = _header_overrides(headers)
    both = sorted(set(given) & set(from_headers))
    if both:
        raise RequestError(400, f"override(s) {both} given both in the body and as {HEADER_PREFIX}* headers", both[0])
    given.update(from_headers)
    lam = given.pop("lambda", None)
    if lam is not None and (_number("lambda", lam) < 0):
        raise RequestError(400, "lambda must be >= 0", "lambda")
    names = given.get("models")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(m, str) for m in names):
            raise RequestError(400, "models must be a list of model names", "models")
        bad = sorted(set(names) - set(models))
        if bad:
            raise RequestError(400, f"unknown model(s) {bad} in models; the bundle has {models}", "models")
    if model != ROUTER_MODEL:  # a model name routes among that model's tiers only
        given["models"] = [m for m in (names if names is not None else [model]) if m == model]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:  # caps the reasoning budget; the forced answer's few tokens come on top
        _number("max_tokens", max_tokens, integer=True)
        given["max_budget"] = min(max_tokens, given.get("max_budget", max_tokens))
    try:
        caps = Caps.from_mapping(given)
    except ValueError as e:
        raise RequestError(400, str(e), str(e).split()[0]) from e
    return Request(kind, conversation, caps, None if lam is None else float(lam), seed, bool(stream),
                   bool(opts.get("include_usage")), model, sorted(k for k in IGNORED if body.get(k) is not None))


# ---------------------------------------------------------------- the proxy


class Proxy:
    """The router, one engine per bundle model, the decision log and the metrics."""

    def __init__(self, router, config: ProxyConfig):
        self.router = router
        self.config = config
        self.models = sorted({t.model for t in router.tiers})
        require(router.executions, self.models, str(router.path / "manifest.json"))
        missing = sorted(set(self.models) - set(config.upstreams))
        extra = sorted(set(config.upstreams) - set(self.models))
        if missing or extra:
            raise ValueError(f"one --upstream per bundle model: the bundle has {self.models}"
                             + (f"; missing {missing}" if missing else "") + (f"; not in the bundle {extra}" if extra else ""))
        names = [t.name for t in router.tiers]
        if config.fallback_tier is not None and config.fallback_tier not in names:
            raise ValueError(f"fallback tier {config.fallback_tier!r} is not a tier of the bundle: {names}")
        self.engines = {m: OpenAIUpstream(config.upstreams[m], model=config.upstream_models.get(m),
                                          timeout=config.upstream_timeout, max_concurrency=config.upstream_concurrency,
                                          retries=config.retries, template=router.execution(m).template)
                        for m in self.models}
        self.fallback_index = names.index(config.fallback_tier) if config.fallback_tier else None
        self.explore = router.explore if config.explore is None else float(config.explore)
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {self.explore}")
        self.log = None
        if config.decision_log:
            from router.decision_log import DecisionLog

            self.log = DecisionLog(config.decision_log, config.log_max_bytes, config.log_keep, config.log_fsync)
        self.bundle_id = f"{router.manifest.get('name', 'bundle')}@{router.manifest.get('created', '?')}"
        self._speed_lock = threading.Lock()
        self.metrics = self._metrics()

    def _metrics(self) -> Prometheus:
        p = Prometheus()
        p.declare("router_proxy_requests_total", "counter", "HTTP requests by endpoint and status code.",
                  ("endpoint", "code"))
        p.declare("router_proxy_decisions_total", "counter", "Routing decisions by chosen tier and reason.",
                  ("tier", "reason"))
        p.declare("router_proxy_request_seconds", "histogram",
                  "Time from request to last byte, by executed tier (routing and upstream).", ("tier",), SECONDS_BUCKETS)
        p.declare("router_proxy_route_seconds", "histogram", "Time spent routing (featurize, predict, decide).",
                  (), (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
        p.declare("router_proxy_tokens_per_request", "histogram",
                  "Generated tokens per request (samples and forced answers), by executed tier.", ("tier",),
                  TOKEN_BUCKETS)
        p.declare("router_proxy_upstream_errors_total", "counter",
                  "Failed upstream calls by upstream and kind (connect, timeout, server, client, garbage), "
                  "retried or not.", ("upstream", "kind"),
                  collect=lambda: {(m, k): n for m, e in self.engines.items() for k, n in dict(e.errors).items()})
        p.declare("router_proxy_fallbacks_total", "counter", "Requests answered by the fallback tier after the "
                  "chosen tier's upstream failed, by the failed tier.", ("tier",))
        p.declare("router_proxy_upstream_tokens_per_second", "gauge",
                  "Each upstream's speed as the latency estimates use it (bundle measurement, then observed EWMA).",
                  ("upstream",), collect=lambda: {(m,): v for m, v in self.router.tokens_per_second.items()})
        from router.monitoring import DriftGauges

        DriftGauges(self.config.drift_report).declare(p)
        p.declare("router_proxy_explore_rate", "gauge", "The exploration rate decisions are drawn with "
                  "(decisions it diverted: router_proxy_decisions_total{reason=\"explore\"}).", (),
                  collect=lambda: {(): self.explore})
        return p

    # -------------------------------------------------------------- routing and execution

    def route(self, req: Request, rid: str):
        """The decision, never raising on text (``Router.route_detailed``, exploring with the
        request id as seed); falls back like the decision server if routing itself fails."""
        try:
            return self.router.route_detailed([req.conversation.routing_text], req.lam, caps=req.caps, keys=[rid],
                                              explore=self.explore)[0]
        except Exception:
            log.exception("routing failed; answering with the fallback tier")
            from router.runtime import Routed

            d = self.router.fallback(req.caps, reason="fallback:error")
            lam = self.router.lam if req.lam is None else req.lam
            return Routed(d, None, None, None, self.router.allowed(req.caps), lam)

    def execute(self, decision, req: Request, on_text: Callable[[str], None] | None = None) -> dict:
        """Run ``decision`` upstream: ``router.executor.execute`` (k > 1, or no streaming), or the
        same rules streamed for one sample. Raises ``UpstreamError``."""
        from router.executor import execute, summarize

        ex = self.router.execution(decision.model)
        engine = self.engines[decision.model]
        conv = req.conversation
        tier = self.router.tier_map.get(decision.tier)
        if tier is not None and tier.adaptive:  # buffered: the rule needs every step's answers
            models = {tier.model} | {self.router.tier_map[c].model for c in tier.chain}
            return execute(decision, {m: self.engines[m] for m in models}, list(conv.turns),
                           execution={m: self.router.execution(m) for m in models}, seed=req.seed,
                           system_extra=conv.system, tiers=self.router.tier_map)
        if on_text is None or decision.samples != 1:
            return execute(decision, engine, list(conv.turns), execution=ex, seed=req.seed, system_extra=conv.system)
        prompt = ex.prompt(list(conv.turns), conv.system)
        request = ex.request(prompt, decision.budget, 1, req.seed)
        return summarize(engine.stream_one(request, ex.sampling, on_text), request)

    def fallback_decision(self, failed):
        """The configured fallback tier as a decision, unless it is the tier that failed."""
        if self.fallback_index is None or self.router.tiers[self.fallback_index].name == failed.tier:
            return None
        t = self.router.tiers[self.fallback_index]
        return Decision(t.name, t.budget, t.samples, t.model, None, None, "fallback:upstream-error")

    def observe_speed(self, model: str, tokens: int, seconds: float) -> None:
        """Fold one execution's speed (latency tokens / upstream seconds) into the model's EWMA."""
        if tokens < MIN_SPEED_TOKENS or seconds <= 0:
            return
        rate = tokens / seconds
        with self._speed_lock:
            old = self.router.tokens_per_second.get(model)
            a = self.config.speed_alpha
            self.router.set_speed(model, rate if old is None else (1 - a) * old + a * rate)

    def features_digest(self, x) -> str | None:
        if x is None:
            return None
        import numpy as np

        return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]

    def record(self, *, rid: str, t_wall: float, req: Request, routed, executed, result: dict | None, status: int,
               upstream_status: str, error: str | None, route_s: float, upstream_s: float, total_s: float,
               endpoint: str) -> dict:
        """The decision-log record of one request (fields: README, "Decision log")."""
        d = routed.decision
        tiers = self.router.tiers
        lat_ms = self.router.tier_latency_ms()
        i = next(j for j, t in enumerate(tiers) if t.name == d.tier)
        rec = {
            "v": 1, "request_id": rid, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_wall))
            + f".{int(t_wall % 1 * 1000):03d}Z", "ts": round(t_wall, 3), "endpoint": endpoint,
            "requested_model": req.model, "bundle": {"id": self.bundle_id, "sha256": self.router.bundle_sha256},
            "featurizer": {**self.router.featurizer.spec.to_dict(), "encoder": self.router.featurizer.encoder_name},
            "features_sha256": self.features_digest(routed.features),
            "caps": req.caps.to_dict(), "lambda": routed.lam,
            "allowed": [{**u, "tier": tiers[u["tier"]].name} for u in routed.utilities()],
            "chosen": d.tier, "reason": d.reason, "propensity": routed.propensity, "explored": routed.explored,
            "explore": routed.explore, "greedy": None if routed.greedy is None else tiers[routed.greedy].name,
            "p_correct": d.p_correct,
            "expected_cost": d.expected_cost, "expected_latency_ms": None if lat_ms is None else round(lat_ms[i], 1),
            "executed": executed.tier,
            "tokens": None, "observed_cost": None, "latency_tokens": None, "usage": None,
            "latency_ms": {"total": round(total_s * 1e3, 3), "route": round(route_s * 1e3, 3),
                           "upstream": round(upstream_s * 1e3, 3)},
            "upstream": {"model": executed.model, "status": upstream_status, "error": error},
            "status": status, "stream": req.stream, "seed": None, "labelled_prompt": req.conversation.labelled_prompt,
        }
        if result is not None:
            price = next(t.cost_per_token for t in tiers if t.name == executed.tier)
            rec.update(tokens=result["tokens"], observed_cost=result["tokens"] * price,
                       latency_tokens=result["latency_tokens"], usage=result["usage"], seed=result["seed"])
        if self.config.log_text:
            rec["text"] = req.conversation.routing_text
            rec["answer"] = result["answer"] if result is not None else None
        return rec

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        if self.log is not None:
            self.log.close()


# ---------------------------------------------------------------- HTTP


class _RequestCounter:
    def __init__(self, prom: Prometheus):
        self.prom = prom

    def request(self, endpoint: str, code: int) -> None:
        self.prom.inc("router_proxy_requests_total", (endpoint, str(int(code))))


class ProxyServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with the proxy, in-flight accounting and draining."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of concurrent clients queue, not fail

    def __init__(self, address, proxy: Proxy):
        self.proxy = proxy
        self.router = proxy.router
        self.max_body = proxy.config.max_body
        self.metrics = _RequestCounter(proxy.metrics)  # what BodyHandler counts responses with
        self.draining = False
        self.in_flight = 0
        self._flight = threading.Condition()
        super().__init__(address, ProxyHandler)

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            # keep-alive clients hang up idle connections all the time: not worth a traceback
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        log.warning("error while serving %s", client_address, exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def enter(self) -> bool:
        with self._flight:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._flight:
            self.in_flight -= 1
            self._flight.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout`` s, default the
        config's), close upstreams and the log. True if nothing was cut off. Call from a thread
        other than the one running ``serve_forever``."""
        timeout = self.proxy.config.drain_seconds if timeout is None else timeout
        with self._flight:
            self.draining = True
        self.shutdown()  # serve_forever returns; no new connections are accepted
        with self._flight:
            done = self._flight.wait_for(lambda: self.in_flight == 0, timeout=timeout)
        self.server_close()
        self.proxy.close()
        return done


class ProxyHandler(BodyHandler):
    server: ProxyServer
    server_version = "difficulty-router-proxy"
    protocol_version = "HTTP/1.1"  # keep-alive: what OpenAI clients use

    def _error(self, code: int, message: str, endpoint: str, param=None, err_code=None, type_=None) -> None:
        if type_ is None:
            type_ = "invalid_request_error" if code < 500 else "upstream_error"
        self._json(code, error_body(message, type_, param, err_code), endpoint)

    def _client_error(self, e: ClientError, endpoint: str) -> None:
        if isinstance(e, RequestError):
            self._error(e.status, str(e), endpoint, e.param, e.code, e.type)
        else:
            self._error(e.status, str(e), endpoint)

    # -------------------------------------------------------------- GET

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        proxy = self.server.proxy
        if path == "/health":
            r = proxy.router
            self._json(200, {"status": "draining" if self.server.draining else "ok", "bundle": str(r.path),
                             "bundle_sha256": r.bundle_sha256, "tiers": len(r.tiers),
                             "encoder": r.featurizer.encoder_name, "in_flight": self.server.in_flight,
                             "upstreams": {m: {"url": e.base_url, "tokens_per_second": r.tokens_per_second.get(m)}
                                           for m, e in proxy.engines.items()},
                             "decision_log": str(proxy.log.path) if proxy.log else None}, path)
        elif path == "/metrics":
            self._send(200, proxy.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8", path)
        elif path == "/v1/models":
            created = int(time.time())
            data = [{"id": m, "object": "model", "created": created, "owned_by": "difficulty-router"}
                    for m in [ROUTER_MODEL] + proxy.models]
            self._json(200, {"object": "list", "data": data}, path)
        elif path in ENDPOINTS:
            self._error(405, f"use POST for {path}", path)
        else:
            self._error(404, f"no such endpoint {path[:100]!r}; try {list(ENDPOINTS) + list(GET_ENDPOINTS)}", "other")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    # -------------------------------------------------------------- POST

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ENDPOINTS:
            self._refuse_body()
            if path in GET_ENDPOINTS:
                self._error(405, f"use GET for {path}", path)
            else:
                self._error(404, f"no such endpoint {path[:100]!r}; POST to {list(ENDPOINTS)}", "other")
            return
        if not self.server.enter():
            self._refuse_body()
            self._error(503, "the proxy is shutting down", path, type_="server_error")
            return
        try:
            self._post(path, ENDPOINTS[path])
        finally:
            self.server.leave()

    def _post(self, path: str, kind: str) -> None:
        proxy = self.server.proxy
        t0, t_wall = time.perf_counter(), time.time()
        try:
            req = parse_request(kind, parse_json(self._read_body()), self.headers, proxy.models)
            proxy.router.check_caps(req.caps)
        except ClientError as e:
            self._client_error(e, path)
            return
        except ValueError as e:  # caps this router cannot apply
            self._error(400, str(e), path, "max_latency_ms")
            return
        rid = uuid.uuid4().hex
        routed = proxy.route(req, rid)
        t_routed = time.perf_counter()
        proxy.metrics.observe("router_proxy_route_seconds", (), t_routed - t0)
        d = routed.decision
        proxy.metrics.inc("router_proxy_decisions_total", (d.tier, d.reason))
        ctx = _Exchange(self, req, rid, routed, path)
        executed, result, error, upstream_status, status = d, None, None, "ok", 502
        try:
            result = ctx.run(d)
        except UpstreamError as e:
            error, upstream_status = str(e), "error"
            fb = proxy.fallback_decision(d) if not ctx.sent else None
            if fb is not None:
                proxy.metrics.inc("router_proxy_fallbacks_total", (d.tier,))
                log.warning("upstream of %s failed (%s); answering with fallback tier %s", d.tier, e, fb.tier)
                executed, upstream_status = fb, "fallback"
                try:
                    result = ctx.run(fb)
                except UpstreamError as e2:
                    error, upstream_status = f"{e}; fallback {fb.tier}: {e2}", "error"
        except Exception as e:  # a bug of ours, not the client's or the upstream's: logged, answered 500
            log.exception("request %s failed", rid)
            error, upstream_status, status = f"internal error ({type(e).__name__}); see the proxy's log", "error", 500
        t_done = time.perf_counter()
        if result is not None:
            status = 200
            if upstream_status == "ok":  # a failed try's time says nothing about speed
                proxy.observe_speed(executed.model, result["latency_tokens"], ctx.upstream_seconds)
            proxy.metrics.observe("router_proxy_tokens_per_request", (executed.tier,), result["tokens"])
        rec = proxy.record(rid=rid, t_wall=t_wall, req=req, routed=routed, executed=executed, result=result,
                           status=status, upstream_status=upstream_status, error=error, route_s=t_routed - t0,
                           upstream_s=ctx.upstream_seconds, total_s=t_done - t0, endpoint=path)
        if proxy.log is not None:
            proxy.log.write(rec)  # before the client has its answer; fsynced by the log's own thread
        proxy.metrics.observe("router_proxy_request_seconds", (executed.tier,), t_done - t0)
        if result is None:
            message = f"upstream failed: {error}" if status == 502 else error
            kind, code = ("upstream_error", "upstream_unavailable") if status == 502 else ("server_error", None)
            if ctx.sent:
                ctx.stream_error(message, kind, code)
            else:
                self._json(status, error_body(message, kind, None, code), path, ctx.headers(executed))
        else:
            ctx.finish(executed, result)


class _Exchange:
    """One request's response: a JSON body, a live stream (one sample), or a buffered stream."""

    def __init__(self, handler: ProxyHandler, req: Request, rid: str, routed, endpoint: str):
        self.h, self.req, self.rid, self.routed, self.endpoint = handler, req, rid, routed, endpoint
        self.proxy = handler.server.proxy
        self.created = int(time.time())
        self.sent = False  # stream headers (and maybe text) have gone out: no fallback any more
        self.upstream_seconds = 0.0
        self._executed = None  # the decision being run (the chosen tier, then maybe the fallback tier)

    # -------------------------------------------------------------- the response pieces

    def headers(self, executed) -> dict[str, str]:
        d = self.routed.decision
        h = {"x-router-request-id": self.rid, "x-router-tier": executed.tier, "x-router-model": executed.model,
             "x-router-budget": str(executed.budget), "x-router-samples": str(executed.samples),
             "x-router-reason": executed.reason, "x-router-propensity": f"{self.routed.propensity:.6g}"}
        if executed.p_correct is not None:
            h["x-router-p-correct"] = f"{executed.p_correct:.6g}"
        if executed.expected_cost is not None:
            h["x-router-expected-cost"] = f"{executed.expected_cost:.6g}"
        if executed.tier != d.tier:
            h["x-router-fallback-from"] = d.tier
        return h

    def router_object(self, executed, result: dict) -> dict:
        d = self.routed.decision
        lat = self.proxy.router.tier_latency_ms()
        names = [t.name for t in self.proxy.router.tiers]
        return {"request_id": self.rid, "tier": executed.tier, "model": executed.model, "budget": executed.budget,
                "samples": executed.samples, "p_correct": executed.p_correct, "expected_cost": executed.expected_cost,
                "reason": executed.reason, "propensity": self.routed.propensity, "explored": self.routed.explored,
                "expected_latency_ms": None if lat is None else round(lat[names.index(executed.tier)], 1),
                "fallback_from": d.tier if executed.tier != d.tier else None,
                "answer": result["answer"], "votes": result["votes"], "tokens": result["tokens"],
                "latency_tokens": result["latency_tokens"], "seed": result["seed"],
                "labelled_prompt": self.req.conversation.labelled_prompt, "ignored": self.req.ignored,
                "bundle": self.proxy.bundle_id}

    def usage(self, result: dict) -> dict:
        u = result["usage"]
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def _id(self) -> str:
        return ("chatcmpl-" if self.req.kind == "chat" else "cmpl-") + self.rid

    def _chunk(self, model: str, text: str | None = None, finish=None, role=False, extra=None) -> dict:
        if self.req.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self._id(), "object": obj, "created": self.created, "model": model, "choices": [choice],
                **(extra or {})}

    # -------------------------------------------------------------- running

    def run(self, decision) -> dict:
        """Execute ``decision``; streams live when the request streams and the tier is one sample."""
        self._executed = decision
        live = self.req.stream and decision.samples == 1
        t = time.perf_counter()
        try:
            return self.proxy.execute(decision, self.req, self._on_text if live else None)
        finally:
            self.upstream_seconds += time.perf_counter() - t

    def _start_stream(self, executed) -> None:
        h = self.h
        h.server.metrics.request(self.endpoint, 200)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        for k, v in self.headers(executed).items():
            h.send_header(k, v)
        h.end_headers()
        self.sent = True
        if self.req.kind == "chat":
            self._event(self._chunk(executed.model, role=True))

    def _write(self, data: bytes) -> None:
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.h.wfile.flush()

    def _event(self, obj) -> None:
        self._write(b"data: " + json.dumps(obj, allow_nan=False).encode() + b"\n\n")

    def _on_text(self, text: str) -> None:
        if not text:
            return
        if not self.sent:  # headers go out with the first text: a failure before it can still fall back
            self._start_stream(self._executed)
        self._event(self._chunk(self._executed.model, text))

    def finish(self, executed, result: dict) -> None:
        h = self.h
        if not self.req.stream:
            if self.req.kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": result["content"]},
                          "finish_reason": "stop", "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": result["content"], "finish_reason": "stop", "logprobs": None}
                obj = "text_completion"
            body = {"id": self._id(), "object": obj, "created": self.created, "model": executed.model,
                    "choices": [choice], "usage": self.usage(result), "router": self.router_object(executed, result)}
            h._json(200, body, self.endpoint, self.headers(executed))
            return
        if not self.sent:  # a buffered stream (k > 1), or a live one that produced no text
            self._start_stream(executed)
            if executed.samples != 1 and result["content"]:
                self._event(self._chunk(executed.model, result["content"]))
        self._event(self._chunk(executed.model, finish="stop", extra={"router": self.router_object(executed, result)}))
        if self.req.include_usage:
            last = self._chunk(executed.model, extra={"usage": self.usage(result)})
            last["choices"] = []
            self._event(last)
        self._write(b"data: [DONE]\n\n")
        self._write(b"")  # the chunked body's end

    def stream_error(self, message: str, kind: str = "upstream_error", code: str | None = "upstream_unavailable") -> None:
        """The upstream failed after the stream started: an error event, then the end."""
        self._event(error_body(message, kind, None, code))
        self._write(b"data: [DONE]\n\n")
        self._write(b"")
        self.h.close_connection = True


def make_proxy_server(router, config: ProxyConfig, host: str = "127.0.0.1", port: int = 8080) -> ProxyServer:
    """A bound, not yet serving proxy (port 0 picks a free port: see ``server.url``)."""
    return ProxyServer((host, port), Proxy(router, config))


def serve_proxy(router, config: ProxyConfig, host: str = "127.0.0.1", port: int = 8080, ready=None) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests (``config.drain_seconds``)."""
    import signal

    router.route("warm up")  # the encoder loads before the port opens
    server = make_proxy_server(router, config, host, port)
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: draining in-flight requests (up to %g s)", signum, config.drain_seconds)
            threading.Thread(target=lambda: drained.append(server.drain()), daemon=True).start()

    drained: list[bool] = []
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("router proxy: bundle %s on %s; upstreams %s", router.path, server.url,
             {m: e.base_url for m, e in server.proxy.engines.items()})
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
        while stopping.is_set() and not drained:
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if not stopping.is_set():
            server.drain(0)
