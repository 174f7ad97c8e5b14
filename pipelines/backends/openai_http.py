"""OpenAI-compatible HTTP backend: one-pass rollouts through a server's legacy ``/completions``.

Works with any server that speaks the OpenAI *completions* API on raw prompt text and returns
``logprobs.tokens`` (vLLM's ``vllm serve``, llama.cpp's ``llama-server``, llama-cpp-python's
``python -m llama_cpp.server``, ...). Per ``one_pass``:

1. every sample of every request: ``prompt`` = the rendered prompt, ``max_tokens`` = the largest
   budget, ``logprobs: 1`` so the response lists the generated token strings. The text a sample
   had after B tokens is the concatenation of its first B token strings;
2. every forced answer: ``prompt`` = prompt + that truncated text + force suffix (the direct
   prefix at B = 0), ``max_tokens`` = answer_tokens, ``force_temperature``, stopping at a newline
   and the template's stop strings. A server with prefix caching serves the shared prefix from
   its KV cache.

Seeds: sample i is its own request with ``n=1, seed=seed + i`` (not one request with ``n`` and
``seed``). What a server does with ``n`` and one seed differs (vLLM gives child i ``seed + i``,
others reuse one RNG across the n choices, llama-cpp-python ignores ``n`` altogether), so only
separate requests make sample i depend on (prompt, seed + i) alone on every server: the same
query gives the same samples whatever else is in the call, in any order, at any concurrency, and
``SampleResult.seed`` means what it means for the llama.cpp and vLLM backends. Forced answers use
the llama.cpp backend's seed rule (``_mix_seed(seed, i, B)``). The random streams themselves
are the server's; whether a seeded request is reproducible is up to the server (llama.cpp and
vLLM are, up to floating-point effects of batching).

Token counts follow the other backends: ``n_tokens`` counts the tokens that contribute text
before a stop string (servers also return the token that carried the stop), so
``needs_forcing`` means the same everywhere. ``finished`` is ``finish_reason == "stop"``.

Caveat: the forced-answer prompt is sent as text, so the server re-tokenizes prompt + truncated
completion + suffix; at a token boundary that BPE would merge differently the conditioning can
differ by a token from the ids the sample actually had (the llama.cpp and vLLM backends work on
ids). Token strings of a multi-byte character split across tokens may come back lossy from
some servers; the truncated text is then what the server reported.

Thread-safe for reads; one ``one_pass`` at a time is the intended use. No network at import time.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipelines.backends.base import (
    Backend,
    ForcedAnswer,
    OnePassRequest,
    OnePassResult,
    RolloutError,
    SampleResult,
    SamplingConfig,
    check_request,
)
from pipelines.backends.llamacpp import _mix_seed  # one forced-answer seed rule for all backends
from pipelines.prompts import stop_strings


@dataclass(frozen=True)
class OpenAIOptions:
    """``ModelConfig.options`` for the OpenAI-compatible HTTP backend (unknown keys fail)."""

    base_url: str = "http://127.0.0.1:8000/v1"  # up to and including /v1
    api_key: str | None = None  # None = $OPENAI_API_KEY, or "none" (local servers ignore it)
    model: str | None = None  # the server's model name; None = ModelConfig.path
    timeout: float = 300.0  # seconds per HTTP request
    max_concurrency: int = 4  # requests in flight at once
    # merged into every request body, e.g. {"top_k": -1} or {"repetition_penalty": 1.0}; the
    # backend sends top_k only when SamplingConfig.top_k > 0 (plain OpenAI rejects it), so with
    # top_k=0 the server's own default applies (llama-cpp-python: 40, vLLM: disabled)
    extra_body: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: dict | None) -> "OpenAIOptions":
        from pipelines.config import build  # unknown keys fail with the valid ones listed

        opts = build(cls, options, "openai options")
        if not isinstance(opts.base_url, str) or not opts.base_url.startswith(("http://", "https://")):
            raise ValueError(f"openai options: base_url must be an http(s) URL, got {opts.base_url!r}")
        if int(opts.max_concurrency) < 1:
            raise ValueError(f"openai options: max_concurrency must be >= 1, got {opts.max_concurrency}")
        if float(opts.timeout) <= 0:
            raise ValueError(f"openai options: timeout must be > 0, got {opts.timeout}")
        if not isinstance(opts.extra_body, dict):
            raise ValueError(f"openai options: extra_body must be a mapping, got {type(opts.extra_body).__name__}")
        return opts


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


class OpenAIBackend(Backend):
    """A model served behind an OpenAI-compatible ``/completions`` endpoint."""

    name = "openai"
    options_type = OpenAIOptions  # what ModelConfig.options must fit (unknown keys fail)

    def __init__(self, model_id: str, config):
        super().__init__(model_id)
        self.config = config
        self.options = self.options_type.from_dict(getattr(config, "options", None))
        self.template = getattr(config, "template", "raw")
        self.server_model = self.options.model or getattr(config, "path", None) or model_id
        self.api_key = self.options.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.url = self.options.base_url.rstrip("/") + "/completions"
        self._stops = tuple(s for s in stop_strings(self.template) if s)
        #: completion token strings of the last one_pass, by (key, sample index)
        self.last_completion_tokens_: dict[tuple[str, int], list[str]] = {}
        self._client = None
        self._closed = False

    # ------------------------------------------------------------------ HTTP

    def _http(self):
        if self._closed:
            raise RolloutError("the openai backend is closed")
        if self._client is None:
            try:
                import httpx  # lazily: the pipeline's other stages must not need it
            except ImportError as e:  # pragma: no cover - httpx is a dependency
                raise RolloutError(f"the openai backend needs httpx ({e})") from e
            self._httpx = httpx
            self._client = httpx.Client(
                timeout=float(self.options.timeout),
                headers={"Authorization": f"Bearer {self.api_key}"},
                limits=httpx.Limits(max_connections=int(self.options.max_concurrency)),
            )
        return self._client

    def _complete(self, body: dict) -> dict:
        """POST one completion request; the single choice and usage, or a RolloutError."""
        client = self._http()
        httpx = self._httpx
        payload = {"model": self.server_model, **self.options.extra_body, **body}
        try:
            resp = client.post(self.url, json=payload)
        except httpx.HTTPError as e:
            raise RolloutError(f"openai backend: request to {self.url} failed: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            raise RolloutError(
                f"openai backend: {self.url} answered HTTP {resp.status_code}: {resp.text[:500]}"
            )
        try:
            data = resp.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RolloutError(f"openai backend: {self.url} returned no completion choice: {resp.text[:500]}") from e
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens")
        if tokens is None:
            raise RolloutError(
                f"openai backend: {self.url} returned no logprobs.tokens; the backend needs a server "
                f"that honours logprobs on /completions (llama-cpp-python: logits_all=True)"
            )
        return {
            "text": choice.get("text") or "",
            "tokens": [t or "" for t in tokens],
            "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage") or {},
        }

    def _body(self, prompt: str, max_tokens: int, temperature: float, sampling: SamplingConfig,
              seed: int, stop: tuple[str, ...]) -> dict:
        body = {
            "prompt": prompt,
            "n": 1,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_p": float(sampling.top_p),
            "seed": int(seed),
            "logprobs": 1,
            "stream": False,
        }
        if stop:
            body["stop"] = list(stop)
        if sampling.top_k and sampling.top_k > 0:
            body["top_k"] = int(sampling.top_k)
        return body

    # ------------------------------------------------------------------ public API

    def one_pass(self, requests: list[OnePassRequest], sampling: SamplingConfig) -> list[OnePassResult]:
        """Roll out every request at all its budgets; results are in request order."""
        for r in requests:
            check_request(r)
            if not r.prompt:
                raise ValueError(f"request {r.key!r}: the prompt is empty")
        self._http()
        stops = tuple(dict.fromkeys(self._stops + tuple(s for s in sampling.stop if s)))
        ans_stops = tuple(dict.fromkeys(("\n",) + self._stops))

        # 1. the samples, one request each (seed + i)
        jobs = [(qi, i) for qi, r in enumerate(requests) for i in range(r.n)]

        def sample(job):
            qi, i = job
            r = requests[qi]
            if r.max_tokens == 0:
                # nothing to sample (max_tokens=0 means "no limit" to some servers); one token,
                # ignored, tells the prompt's token count
                out = self._complete(self._body(r.prompt, 1, 0.0, sampling, r.seed + i, ()))
                return {"text": "", "tokens": [], "n_tokens": 0, "finished": False,
                        "prompt_tokens": out["usage"].get("prompt_tokens")}
            out = self._complete(self._body(r.prompt, r.max_tokens, sampling.temperature, sampling, r.seed + i, stops))
            finished = out["finish_reason"] == "stop"
            tokens = out["tokens"]
            n_tok = _kept_tokens(tokens, out["text"]) if finished else len(tokens)
            return {"text": out["text"], "tokens": tokens, "n_tokens": min(n_tok, r.max_tokens),
                    "finished": finished, "prompt_tokens": out["usage"].get("prompt_tokens")}

        with ThreadPoolExecutor(max_workers=int(self.options.max_concurrency)) as pool:
            samples = list(pool.map(sample, jobs))
            by_job = dict(zip(jobs, samples))

            # 2. the forced answers, at every budget a sample did not finish within
            forced_jobs = []
            for (qi, i), s in by_job.items():
                r = requests[qi]
                for b in r.budgets:
                    if not (s["finished"] and s["n_tokens"] <= b):
                        forced_jobs.append((qi, i, b))

            def force(job):
                qi, i, b = job
                r = requests[qi]
                s = by_job[(qi, i)]
                prefix = r.prompt + ("".join(s["tokens"][:b]) + r.force_suffix if b > 0 else r.direct_prefix)
                out = self._complete(self._body(prefix, r.answer_tokens, sampling.force_temperature, sampling,
                                                _mix_seed(r.seed, i, b), ans_stops))
                n_tok = min(_kept_tokens(out["tokens"], out["text"]), r.answer_tokens)
                return ForcedAnswer(text=out["text"], n_tokens=n_tok)

            answers = list(pool.map(force, forced_jobs))

        forced: dict[tuple[int, int], dict[int, ForcedAnswer]] = {}
        for (qi, i, b), a in zip(forced_jobs, answers):
            forced.setdefault((qi, i), {})[b] = a
        self.last_completion_tokens_ = {
            (requests[qi].key, i): s["tokens"][: s["n_tokens"]] for (qi, i), s in by_job.items()
        }
        results = []
        for qi, r in enumerate(requests):
            outs = [by_job[(qi, i)] for i in range(r.n)]
            results.append(OnePassResult(
                key=r.key,
                samples=tuple(
                    SampleResult(index=i, seed=r.seed + i, text=s["text"], n_tokens=s["n_tokens"],
                                 finished=s["finished"], forced=dict(sorted(forced.get((qi, i), {}).items())))
                    for i, s in enumerate(outs)
                ),
                prompt_tokens=int(outs[0]["prompt_tokens"] or 0),
            ))
        return results

    def close(self) -> None:
        """Close the HTTP connection pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._client.close()
            self._client = None
