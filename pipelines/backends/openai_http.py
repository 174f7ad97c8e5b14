"""OpenAI-compatible HTTP backend: one-pass rollouts through a server's legacy ``/completions``.

Works with any server that speaks the OpenAI *completions* API on raw prompt text and returns
``logprobs.tokens`` (vLLM's ``vllm serve``, llama.cpp's ``llama-server``, llama-cpp-python's
``python -m llama_cpp.server``, ...). The engine is the runtime's (``router.upstream``: the proxy
executes decisions with the same code, so seeds, forcing and token counts agree); this backend
gives it the pipeline's options and asks it for token strings (``logprobs``), which cutting a
sample at every smaller budget of a one-pass rollout needs:

1. every sample of every request: ``prompt`` = the rendered prompt, ``max_tokens`` = the largest
   budget, ``logprobs: 1`` so the response lists the generated token strings. The text a sample
   had after B tokens is the concatenation of its first B token strings;
2. every forced answer: ``prompt`` = prompt + that truncated text + force suffix (the direct
   prefix at B = 0), ``max_tokens`` = answer_tokens, ``force_temperature``, stopping at a newline
   and the template's stop strings.

Seeds: sample i is its own request with ``n=1, seed=seed + i`` (why: ``router.upstream``). Forced
answers use the shared seed rule (``mix_seed(seed, i, B)``). Whether a seeded request is
reproducible is up to the server (llama.cpp and vLLM are, up to floating-point effects of
batching).

Token counts follow the other backends: ``n_tokens`` counts the tokens that contribute text
before a stop string (servers also return the token that carried the stop), so
``needs_forcing`` means the same everywhere. ``finished`` is ``finish_reason == "stop"``.

Thread-safe for reads; one ``one_pass`` at a time is the intended use. No network at import time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.backends.base import Backend, ForcedAnswer, ForceJob, OnePass, RolloutError
from router.upstream import OpenAIUpstream, _kept_tokens  # noqa: F401 - _kept_tokens: tested here


@dataclass(frozen=True)
class OpenAIOptions:
    """``ModelConfig.options`` for the OpenAI-compatible HTTP backend (unknown keys fail)."""

    base_url: str = "http://127.0.0.1:8000/v1"  # up to and including /v1
    api_key: str | None = None  # None = $OPENAI_API_KEY, or "none" (local servers ignore it)
    model: str | None = None  # the server's model name; None = ModelConfig.path
    timeout: float = 300.0  # seconds per HTTP request
    max_concurrency: int = 4  # requests in flight at once
    # more tries of a request that failed for a passing reason (connection lost, 5xx, timeout,
    # unreadable answer); a seeded request retried draws the same sample
    retries: int = 2
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
        if int(opts.retries) < 0:
            raise ValueError(f"openai options: retries must be >= 0, got {opts.retries}")
        if not isinstance(opts.extra_body, dict):
            raise ValueError(f"openai options: extra_body must be a mapping, got {type(opts.extra_body).__name__}")
        return opts


class OpenAIBackend(Backend):
    """A model served behind an OpenAI-compatible ``/completions`` endpoint."""

    name = "openai"
    options_type = OpenAIOptions  # what ModelConfig.options must fit (unknown keys fail)

    def __init__(self, model_id: str, config):
        super().__init__(model_id, config)  # options, template, stop strings
        o = self.options
        self.engine = OpenAIUpstream(
            o.base_url, model=o.model or getattr(config, "path", None) or model_id, api_key=o.api_key,
            timeout=o.timeout, max_concurrency=o.max_concurrency, retries=o.retries, extra_body=o.extra_body,
            template=self.template, token_strings=True)
        self.server_model = self.engine.model
        self.api_key = self.engine.api_key
        self.url = self.engine.url

    def _check_open(self) -> None:
        if self.engine.closed:
            raise RolloutError("the openai backend is closed")

    def sample(self, run: OnePass) -> None:
        self.engine.sample(run)

    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        return self.engine.force(run, jobs)

    def close(self) -> None:
        """Close the HTTP connection pool. Safe to call twice."""
        self.engine.close()
