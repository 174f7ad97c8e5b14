"""An OpenAI-compatible upstream (``vllm serve``, llama.cpp's server, ...): the HTTP engine the
proxy executes decisions on, and that the pipeline's ``openai`` backend delegates to.

Standard library only (``http.client``), so the runtime's base install stays small: a pool of
keep-alive connections per upstream, a thread pool for the samples of one request, bounded
retries. Every completion goes through the legacy ``/completions`` endpoint on raw prompt text,
because budget forcing continues a prefix the chat endpoint cannot express.

The one-pass steps (``sample``, ``force``) follow ``router.generation``'s rules:

1. every sample as its own request ``n=1, seed=seed + i``, ``max_tokens`` = the largest budget.
   Not one request with ``n``: vLLM gives child i seed + i, other servers reuse one random stream
   across the n choices and llama-cpp-python ignores ``n`` altogether, so only separate requests
   make sample i depend on (prompt, seed + i) alone on every server: the proxy, the executor and
   the rollout then draw the same samples for the same seed, in any order, at any concurrency;
2. every forced answer: ``prompt`` = prompt + the sample cut at B + the forcing text,
   ``max_tokens`` = answer_tokens, ``force_temperature``, seed ``mix_seed(seed, i, B)``, stopping
   at a newline and the template's stop strings. A server with prefix caching serves the shared
   prefix from its KV cache.

Token strings. Cutting a sample at a budget B below its ``max_tokens`` needs the text of its
first B tokens, which only ``logprobs`` reports; the rollout (many budgets in one pass) asks for
them (``token_strings=True``). Executing a decision needs one budget: a sample is cut exactly at
its ``max_tokens`` = B, where its whole text is the cut text, so the runtime does not ask for
logprobs (``token_strings=False``): llama-cpp-python's server computes them in Python and was
~6x slower with them (3.5 s vs 0.6 s for 16 tokens, measured on this machine). Token counts are
then the server's ``usage.completion_tokens`` (which counts the token that carried a stop string,
one more than the rollout's kept tokens when a sample ends on a stop string rather than EOS).

Caveat: the forced-answer prompt is sent as text, so the server re-tokenizes prompt + cut
completion + suffix; at a token boundary that BPE would merge differently the conditioning can
differ by a token from the ids the sample actually had (the in-process llama.cpp and vLLM
backends work on ids).

No network at import or construction: connections open on the first request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from router.generation import (
    Completion,
    ForcedAnswer,
    ForceJob,
    OnePass,
    OnePassRequest,
    OnePassResult,
    RolloutError,
    SamplingConfig,
    run_one_pass,
)
from router.prompts import answer_stops, check_template, completion_stops

RETRY_BACKOFF = 0.1  # seconds before the first retry; doubles per retry
# errors worth another try: the server restarted, timed out, or answered something unreadable.
# A 4xx stays a 4xx: the same request would be refused again
RETRYABLE = ("connect", "timeout", "garbage", "server")
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)


def _no_delay(cls):
    """``cls`` (an ``http.client`` connection class) with TCP_NODELAY: http.client sends a request's
    headers and body in two writes, which Nagle's algorithm may hold for the peer's delayed ACK."""

    class NoDelay(cls):
        def connect(self):
            super().connect()
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    return NoDelay


_HTTP, _HTTPS = _no_delay(http.client.HTTPConnection), _no_delay(http.client.HTTPSConnection)


class UpstreamError(RolloutError):
    """An upstream call failed. ``kind``: connect | timeout | server (5xx, 429) | client (other
    4xx) | garbage (not an OpenAI completion) | closed; ``status``: the HTTP status, if any."""

    def __init__(self, message: str, kind: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


class ConnectionPool:
    """Keep-alive HTTP connections to one server, at most ``max_connections`` in use at once."""

    def __init__(self, base_url: str, timeout: float, max_connections: int):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.prefix = u.path.rstrip("/")
        self._cls = _HTTPS if u.scheme == "https" else _HTTP
        self._host, self._port = u.hostname, u.port
        self.timeout = float(timeout)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(int(max_connections))
        self.closed = False

    def _get(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._cls(self._host, self._port, timeout=self.timeout), False

    def _put(self, conn) -> None:
        with self._lock:
            if not self.closed:
                self._idle.append(conn)
                return
        conn.close()

    def open(self, method: str, path: str, body: bytes | None, headers: dict[str, str]):
        """Send a request; returns ``(connection, response)`` with the body unread. The caller
        reads it and hands both to ``release``. Raises ``UpstreamError`` (connect, timeout)."""
        url = self.base_url + path
        if self.closed:
            raise UpstreamError(f"upstream {self.base_url} is closed", "closed")
        if not self._slots.acquire(timeout=self.timeout):
            raise UpstreamError(f"{url}: no free connection within {self.timeout:g} s", "timeout")
        for attempt in range(2):
            conn, reused = self._get()
            try:
                conn.request(method, self.prefix + path, body=body, headers=headers)
                return conn, conn.getresponse()
            except _STALE as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: one fresh try
                self._slots.release()
                raise UpstreamError(f"{url}: connection lost: {type(e).__name__}: {e}", "connect") from e
            except TimeoutError as e:
                conn.close()
                self._slots.release()
                raise UpstreamError(f"{url}: timed out after {self.timeout:g} s", "timeout") from e
            except OSError as e:
                conn.close()
                self._slots.release()
                raise UpstreamError(f"{url}: request failed: {type(e).__name__}: {e}", "connect") from e
            except http.client.HTTPException as e:  # not HTTP at all (a bad status line, huge headers)
                conn.close()
                self._slots.release()
                raise UpstreamError(f"{url}: not an HTTP answer: {type(e).__name__}: {e}", "garbage") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self, conn, resp, ok: bool) -> None:
        """Return a connection whose response was read to the end (else close it)."""
        try:
            if ok and not resp.will_close and resp.isclosed():
                self._put(conn)
            else:
                conn.close()
        finally:
            self._slots.release()

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        """One whole request: ``(status, body)``."""
        conn, resp = self.open(method, path, body, headers)
        ok = False
        try:
            data = resp.read()
            ok = True
            return resp.status, data
        except TimeoutError as e:
            raise UpstreamError(f"{self.base_url}{path}: timed out after {self.timeout:g} s", "timeout") from e
        except (OSError, http.client.HTTPException) as e:
            raise UpstreamError(f"{self.base_url}{path}: connection lost while reading: {type(e).__name__}: {e}",
                                "connect") from e
        finally:
            self.release(conn, resp, ok)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def _kept_tokens(tokens: list[str], text: str) -> int:
    """How many leading token strings it takes to cover ``text`` (tokens past a stop excluded)."""
    if not text:
        return 0
    total = 0
    for k, t in enumerate(tokens, 1):
        total += len(t)
        if total >= len(text):
            return k
    return len(tokens)


def _status_kind(status: int) -> str:
    return "server" if status >= 500 or status == 429 else "client"


class OpenAIUpstream:
    """One model behind an OpenAI-compatible server, as a one-pass engine.

    ``model``: the server's name for it (None: asked from ``GET /models`` on first use, which
    works when the server serves one model). ``template``: the prompt template of the model
    (its stop strings end completions). Thread-safe.
    """

    name = "openai"

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0, max_concurrency: int = 4, retries: int = 2, extra_body: dict | None = None,
                 template: str = "raw", token_strings: bool = False):
        if int(max_concurrency) < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if float(timeout) <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.pool = ConnectionPool(base_url, float(timeout), int(max_concurrency))
        self.base_url = self.pool.base_url
        self.url = self.base_url + "/completions"
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.max_concurrency = int(max_concurrency)
        self.retries = int(retries)
        self.extra_body = dict(extra_body or {})
        self.template = check_template(template)
        self.token_strings = bool(token_strings)
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.errors: dict[str, int] = {}  # failed calls by kind, retried or not (the proxy's metric)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ HTTP

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def served_model(self) -> str:
        """The model name requests carry: ``model``, else the one model ``GET /models`` lists."""
        if self.model is not None:
            return self.model
        status, data = self.pool.request("GET", "/models", None, self._headers)
        try:
            ids = [m["id"] for m in json.loads(data)["data"]] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            ids = None
        if ids is None:
            raise UpstreamError(f"{self.base_url}/models answered HTTP {status}: {data[:200]!r}", "garbage", status)
        if len(ids) != 1:
            raise UpstreamError(f"{self.base_url} serves {len(ids)} models {ids[:10]}; name one "
                                f"(proxy: --upstream-model NAME=SERVED)", "client")
        self.model = str(ids[0])
        return self.model

    def _payload(self, body: dict) -> bytes:
        return json.dumps({"model": self.served_model(), **self.extra_body, **body}).encode()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with up to ``retries`` more tries on retryable errors (backoff 0.1 s, doubling)."""
        for attempt in range(self.retries + 1):
            if self._closed:
                raise UpstreamError(f"upstream {self.base_url} is closed", "closed")
            try:
                return fn()
            except UpstreamError as e:
                self._count_error(e.kind)
                if not e.retryable or attempt == self.retries:
                    raise
                time.sleep(RETRY_BACKOFF * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def complete(self, body: dict) -> dict:
        """POST one completion (with retries); ``{"text", "tokens", "finish_reason", "usage"}``
        (``tokens``: the token strings, if ``logprobs`` was asked)."""

        def once() -> dict:
            status, data = self.pool.request("POST", "/completions", self._payload(body), self._headers)
            text = data[:500].decode("utf-8", "replace")
            if status >= 400:
                raise UpstreamError(f"openai backend: {self.url} answered HTTP {status}: {text}", _status_kind(status),
                                    status)
            try:
                out = json.loads(data)
                choice = out["choices"][0]
                result = {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"),
                          "usage": out.get("usage") or {}, "tokens": None}
                if not isinstance(result["text"], str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise UpstreamError(f"openai backend: {self.url} returned no completion choice: {text}",
                                    "garbage", status) from e
            if body.get("logprobs"):
                tokens = (choice.get("logprobs") or {}).get("tokens")
                if not isinstance(tokens, list):
                    raise UpstreamError(
                        f"openai backend: {self.url} returned no logprobs.tokens; the backend needs a server "
                        f"that honours logprobs on /completions (llama-cpp-python: logits_all=True)", "garbage", status)
                result["tokens"] = [t or "" for t in tokens]
            return result

        return self._call(once)

    def stream(self, body: dict) -> Iterator[dict]:
        """POST one streamed completion (``stream: true``); yields ``{"text", "finish_reason",
        "usage"}`` per server event. Retries only before the first event arrives."""
        payload = self._payload({**body, "stream": True})
        conn, resp = self._call(lambda: self._open_stream(payload))
        ok = False
        try:
            while True:
                try:
                    line = resp.readline()
                except TimeoutError as e:
                    raise UpstreamError(f"{self.url}: stream stalled for {self.pool.timeout:g} s", "timeout") from e
                except (OSError, http.client.HTTPException) as e:
                    raise UpstreamError(f"{self.url}: stream broke: {type(e).__name__}: {e}", "connect") from e
                if not line:
                    raise UpstreamError(f"{self.url}: stream ended without [DONE]", "connect")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    resp.read()
                    ok = True
                    return
                try:
                    event = json.loads(data)
                    choices = event.get("choices") or []
                    choice = choices[0] if choices else {}
                    yield {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"),
                           "usage": event.get("usage")}
                except (ValueError, AttributeError, TypeError) as e:
                    raise UpstreamError(f"{self.url}: unreadable stream event {data[:200]!r}", "garbage") from e
        except UpstreamError as e:
            self._count_error(e.kind)
            raise
        finally:
            self.pool.release(conn, resp, ok)

    def _open_stream(self, payload: bytes):
        conn, resp = self.pool.open("POST", "/completions", payload, self._headers)
        if resp.status >= 400:
            try:
                text = resp.read()[:500].decode("utf-8", "replace")
            finally:
                self.pool.release(conn, resp, True)
            raise UpstreamError(f"openai backend: {self.url} answered HTTP {resp.status}: {text}",
                                _status_kind(resp.status), resp.status)
        return conn, resp

    def body(self, prompt: str, max_tokens: int, temperature: float, sampling: SamplingConfig,
             seed: int, stop: tuple[str, ...]) -> dict:
        """The completion request this engine sends (``model`` is added when it is sent)."""
        body = {"prompt": prompt, "n": 1, "max_tokens": int(max_tokens), "temperature": float(temperature),
                "top_p": float(sampling.top_p), "seed": int(seed), "stream": False}
        if self.token_strings:
            body["logprobs"] = 1
        if stop:
            body["stop"] = list(stop)
        if sampling.top_k and sampling.top_k > 0:  # plain OpenAI rejects top_k: send it only when set
            body["top_k"] = int(sampling.top_k)
        return body

    def _map(self, fn, items: list) -> list:
        """``fn`` over ``items``, up to ``max_concurrency`` at once, results in order (one item: inline)."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="upstream")
        return list(self._executor.map(fn, items))

    # ------------------------------------------------------------------ the one-pass steps

    def _check_budgets(self, run: OnePass) -> None:
        if self.token_strings:
            return
        for r in run.requests:
            if any(0 < b < r.max_tokens for b in r.budgets):
                raise ValueError(f"request {r.key!r}: budgets {r.budgets} cut samples below max_tokens, which "
                                 f"needs token strings (token_strings=True)")

    def sample(self, run: OnePass) -> None:
        """Every sample of every request as its own request seeded ``seed + i``."""
        self._check_budgets(run)
        s = run.sampling
        jobs = [(q, i) for q, r in enumerate(run.requests) for i in range(r.n)]

        def one(job) -> None:
            q, i = job
            r = run.requests[q]
            seed = run.sample_seed(q, i)
            if r.max_tokens == 0:
                if not self.token_strings:  # nothing to sample; the forced answer is the only call
                    run.put(q, i, Completion("", [], False, count=0))
                    return
                # max_tokens=0 means "no limit" to some servers: one token, ignored, tells the
                # prompt's token count
                out = self.complete(self.body(r.prompt, 1, 0.0, s, seed, ()))
                run.add_usage(q, out["usage"])
                run.put(q, i, Completion("", [], False))
                if i == 0:
                    run.prompt_tokens[q] = int(out["usage"].get("prompt_tokens") or 0)
                return
            out = self.complete(self.body(r.prompt, r.max_tokens, s.temperature, s, seed, run.stops))
            run.add_usage(q, out["usage"])
            run.put(q, i, self._completion(out, r.max_tokens))
            if i == 0:
                run.prompt_tokens[q] = int(out["usage"].get("prompt_tokens") or 0)

        self._map(one, jobs)

    def _completion(self, out: dict, max_tokens: int) -> Completion:
        finished = out["finish_reason"] == "stop"
        if out["tokens"] is None:  # one budget: the server's count, the whole text
            n = max_tokens if not finished else min(int(out["usage"].get("completion_tokens") or 0), max_tokens)
            return Completion(out["text"], [], finished, count=n)
        tokens = out["tokens"]
        n = min(_kept_tokens(tokens, out["text"]) if finished else len(tokens), max_tokens)
        return Completion(out["text"], tokens[:n], finished)

    @staticmethod
    def cut_text(c: Completion, budget: int) -> str:
        """The text of completion ``c``'s first ``budget`` tokens."""
        if budget == 0:
            return ""
        if c.count is not None:  # no token strings: only a cut at the completion's end is known
            if budget < c.n_tokens:
                raise RolloutError(f"cannot cut a completion of {c.n_tokens} tokens at {budget} without token strings")
            return c.text
        return "".join(c.tokens[:budget])

    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        """Every forced answer as its own request on prompt + the cut sample + forcing text."""
        s = run.sampling

        def one(job: ForceJob) -> ForcedAnswer:
            r = run.requests[job.request]
            c = run.completions[job.request][job.sample]
            prefix = r.prompt + self.cut_text(c, job.budget) + r.forcing_text(job.budget)
            out = self.complete(self.body(prefix, r.answer_tokens, s.force_temperature, s, job.seed, run.answer_stops))
            run.add_usage(job.request, out["usage"])
            if job.budget == 0 and job.sample == 0 and not run.prompt_tokens[job.request]:
                run.prompt_tokens[job.request] = int(out["usage"].get("prompt_tokens") or 0)
            return self._answer(out, r.answer_tokens)

        return self._map(one, jobs)

    def _answer(self, out: dict, answer_tokens: int) -> ForcedAnswer:
        if out["tokens"] is None:
            return ForcedAnswer(text=out["text"], n_tokens=min(int(out["usage"].get("completion_tokens") or 0),
                                                               answer_tokens))
        return ForcedAnswer(text=out["text"], n_tokens=min(_kept_tokens(out["tokens"], out["text"]), answer_tokens))

    def one_pass(self, requests: list[OnePassRequest], sampling: SamplingConfig) -> list[OnePassResult]:
        """Roll out (or execute) every request; results in request order."""
        return run_one_pass(self, requests, sampling, completion_stops(self.template, sampling.stop),
                            answer_stops(self.template)).results()

    def stream_one(self, request: OnePassRequest, sampling: SamplingConfig,
                   on_text: Callable[[str], None]) -> OnePassResult:
        """Execute a one-sample request at one budget, passing text to ``on_text`` as it arrives:
        the sample, then (if it was cut) the forcing text and the forced answer. The same seeds,
        stops and forcing rule as ``one_pass``, so the same result."""
        if request.n != 1 or len(request.budgets) != 1:
            raise ValueError("stream_one executes one sample at one budget")
        run = OnePass([request], sampling, completion_stops(self.template, sampling.stop), answer_stops(self.template))
        B = request.max_tokens
        if B == 0:
            completion = Completion("", [], False, count=0)
        else:
            body = self.body(request.prompt, B, sampling.temperature, sampling, run.sample_seed(0, 0), run.stops)
            body.pop("logprobs", None)
            completion = self._stream_into(run, body, B, on_text, sample=True)
        run.put(0, 0, completion)
        for job in run.missing_answers():
            on_text(request.forcing_text(job.budget))
            prefix = request.prompt + completion.text + request.forcing_text(job.budget)
            body = self.body(prefix, request.answer_tokens, sampling.force_temperature, sampling, job.seed,
                              run.answer_stops)
            body.pop("logprobs", None)
            answer = self._stream_into(run, body, request.answer_tokens, on_text, sample=False)
            completion.forced[job.budget] = ForcedAnswer(answer.text, answer.n_tokens)
        return run.results()[0]

    def _stream_into(self, run: OnePass, body: dict, max_tokens: int, on_text, *, sample: bool) -> Completion:
        parts, finish, usage, events = [], None, None, 0
        for ev in self.stream({**body, "stream_options": {"include_usage": True}}):
            if ev["text"]:
                parts.append(ev["text"])
                on_text(ev["text"])
                events += 1
            finish = ev["finish_reason"] or finish
            usage = ev["usage"] or usage
        text = "".join(parts)
        finished = finish == "stop"
        # the server's count if it sent usage; else one event per token (llama.cpp, vLLM stream so)
        n = int(usage.get("completion_tokens") or 0) if usage else events
        n = max_tokens if not finished and sample else min(n, max_tokens)
        run.add_usage(0, usage or {"completion_tokens": n})
        if sample and usage:
            run.prompt_tokens[0] = int(usage.get("prompt_tokens") or 0)
        return Completion(text, [], finished, count=n)

    def close(self) -> None:
        """Close the connections and the sample threads. Safe to call twice."""
        self._closed = True
        self.pool.close()
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False)
