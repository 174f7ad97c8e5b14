"""vLLM backend's sample/force steps on a stand-in engine: what it asks vLLM for (runs without vLLM)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from pipelines.backends.base import Backend, OnePassRequest, RolloutError, SamplingConfig, mix_seed
from pipelines.config import ModelConfig

EOS = 1


@dataclass
class Params:  # vllm.SamplingParams' fields that the backend sets
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list
    stop_token_ids: list
    skip_special_tokens: bool
    spaces_between_special_tokens: bool


class Tok:
    """One token per character; BOS = 2."""

    def encode(self, text, add_special_tokens=False):
        return ([2] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i > 2)


class Engine:
    """Completion i of a request: seed-dependent letters, EOS after (seed * 7 + prompt length) % 13."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        outs = []
        for p, sp in zip(prompts, params):
            res = []
            for i in range(sp.n):
                seed = sp.seed + i
                toks = [ord("a") + (seed + 3 * k) % 26 for k in range((seed * 7 + len(p["prompt_token_ids"])) % 13)]
                if len(toks) < sp.max_tokens:
                    res.append(types.SimpleNamespace(index=i, text="".join(map(chr, toks)), token_ids=toks + [EOS],
                                                     finish_reason="stop", stop_reason=None))
                else:
                    toks = toks[: sp.max_tokens]
                    res.append(types.SimpleNamespace(index=i, text="".join(map(chr, toks)), token_ids=toks,
                                                     finish_reason="length", stop_reason=None))
            outs.append(types.SimpleNamespace(outputs=res))
        return outs


@pytest.fixture
def stub(monkeypatch):
    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs, vllm.SamplingParams = inputs, Params
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    from pipelines.backends.vllm import VllmBackend

    b = VllmBackend.__new__(VllmBackend)  # the engine set-up is vLLM's; the steps are what is tested
    Backend.__init__(b, "m", ModelConfig(backend="vllm", template="chatml"))
    b._vllm, b._llm, b._tok, b._closed, b._stop_ids, b._max_len = vllm, Engine(), Tok(), False, (), 200
    return b


def test_samples_then_forced_answers_on_the_sample_token_prefixes(stub):
    reqs = [OnePassRequest(f"q{i}", f"prompt {i}", n=3, budgets=(0, 2, 9), seed=5 * i + 1) for i in range(3)]
    res = stub.one_pass(reqs, SamplingConfig())
    samples_call, force_call = stub._llm.calls
    # 1: one n-sample request per query, seeded with the query's seed (vLLM gives child i seed + i)
    assert [(p.n, p.seed, p.max_tokens) for p in samples_call[1]] == [(3, r.seed, 9) for r in reqs]
    assert samples_call[0] == [Tok().encode(r.prompt, add_special_tokens=True) for r in reqs]
    # 2: one request per forced answer: prompt ids + first B completion ids + forcing-text ids
    expected = []
    for r, out in zip(reqs, res):
        prompt = Tok().encode(r.prompt, add_special_tokens=True)
        for s in out.samples:
            ids = stub.last_completion_tokens_[(r.key, s.index)]
            assert len(ids) == s.n_tokens and EOS not in ids
            for b in sorted(s.forced):
                expected.append((prompt + ids[:b] + Tok().encode(r.forcing_text(b)), mix_seed(r.seed, s.index, b)))
    assert list(zip(force_call[0], [p.seed for p in force_call[1]])) == expected
    assert any(s.finished for r in res for s in r.samples) and any(not s.finished for r in res for s in r.samples)
    assert all(p.stop == ["\n", "<|im_end|>", "<|im_start|>"] and p.max_tokens == 12 for p in force_call[1])


def test_budget_zero_only_requests_sample_nothing(stub):
    (r,) = stub.one_pass([OnePassRequest("d", "direct", n=2, budgets=(0,), seed=3)], SamplingConfig())
    assert len(stub._llm.calls) == 1  # only the forced answers
    assert all(s.n_tokens == 0 and not s.finished and list(s.forced) == [0] for s in r.samples)


def test_greedy_samples_go_as_n_single_requests_and_generate_skips_forcing(stub):
    greedy = stub.generate("hello", n=2, max_tokens=30, seed=4, temperature=0.0)
    ((_, params),) = stub._llm.calls
    assert [p.n for p in params] == [1, 1] and greedy[0] == greedy[1]


def test_capacity_error_names_max_model_len(stub):
    with pytest.raises(RolloutError, match=r"needs 243 tokens .* holds 200; raise options\.max_model_len"):
        stub.one_pass([OnePassRequest("big", "p" * 150, 2, (0, 60), 1)], SamplingConfig())
    assert stub._llm.calls == []
