"""OpenAI-compatible HTTP backend: one-pass rollouts through a server's legacy ``/completions``.

Works with any server that speaks the OpenAI *completions* API on raw prompt text and returns
``logprobs.tokens`` (vLLM's ``vllm serve``, llama.cpp's ``llama-server``, llama-cpp-python's
``python -m llama_cpp.server``, ...). The base class's ``one_pass`` in two phases of requests:

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
the base class's seed rule (``mix_seed(seed, i, B)``). The random streams themselves
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

from pipelines.backends.base import Backend, Completion, ForcedAnswer, ForceJob, OnePass, RolloutError, SamplingConfig


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
        super().__init__(model_id, config)  # options, template, stop strings
        self.server_model = self.options.model or getattr(config, "path", None) or model_id
        self.api_key = self.options.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.url = self.options.base_url.rstrip("/") + "/completions"
        self._client = None
        self._closed = False

    # ------------------------------------------------------------------ HTTP

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutError("the openai backend is closed")

    def _http(self):
        self._check_open()
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

    def _map(self, fn, items: list) -> list:
        """``fn`` over ``items`` with up to ``max_concurrency`` requests in flight, results in order."""
        with ThreadPoolExecutor(max_workers=int(self.options.max_concurrency)) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ the Backend steps

    def sample(self, run: OnePass) -> None:
        """Every sample of every request as its own request seeded ``seed + i``."""
        self._http()
        s = run.sampling
        jobs = [(q, i) for q, r in enumerate(run.requests) for i in range(r.n)]

        def one(job) -> tuple[Completion, int | None]:
            q, i = job
            r = run.requests[q]
            seed = run.sample_seed(q, i)
            if r.max_tokens == 0:
                # nothing to sample (max_tokens=0 means "no limit" to some servers); one token,
                # ignored, tells the prompt's token count
                out = self._complete(self._body(r.prompt, 1, 0.0, s, seed, ()))
                return Completion("", [], False), out["usage"].get("prompt_tokens")
            out = self._complete(self._body(r.prompt, r.max_tokens, s.temperature, s, seed, run.stops))
            finished = out["finish_reason"] == "stop"
            tokens = out["tokens"]
            n_tok = min(_kept_tokens(tokens, out["text"]) if finished else len(tokens), r.max_tokens)
            return Completion(out["text"], tokens[:n_tok], finished), out["usage"].get("prompt_tokens")

        for (q, i), (completion, prompt_tokens) in zip(jobs, self._map(one, jobs)):
            run.put(q, i, completion)
            if i == 0:
                run.prompt_tokens[q] = int(prompt_tokens or 0)

    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        """Every forced answer as its own request on prompt + the first B token strings + forcing text."""
        s = run.sampling

        def one(job: ForceJob) -> ForcedAnswer:
            r = run.requests[job.request]
            tokens = run.completions[job.request][job.sample].tokens
            prefix = r.prompt + "".join(tokens[: job.budget]) + r.forcing_text(job.budget)
            out = self._complete(self._body(prefix, r.answer_tokens, s.force_temperature, s, job.seed,
                                            run.answer_stops))
            n_tok = min(_kept_tokens(out["tokens"], out["text"]), r.answer_tokens)
            return ForcedAnswer(text=out["text"], n_tokens=n_tok)

        return self._map(one, jobs)

    def close(self) -> None:
        """Close the HTTP connection pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._client.close()
            self._client = None
