"""The backend base class: forcing decision, seed rules, capacity error, result assembly, the registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipelines.backends import BACKENDS, backend_class
from pipelines.backends.base import (
    Backend,
    Completion,
    ForcedAnswer,
    OnePass,
    OnePassRequest,
    RolloutError,
    SamplingConfig,
    mix_seed,
    seed32,
)
from pipelines.config import ModelConfig


@dataclass(frozen=True)
class ToyOptions:
    width: int = 2

    @classmethod
    def from_dict(cls, options):
        from pipelines.config import build

        return build(cls, options, "toy options")


class Toy(Backend):
    """Completions of ``length[key]`` words; a fused engine if ``in_place``: it forces the
    largest budget itself while sampling, as the llama.cpp scheduler forces all of them."""

    name = "toy"
    options_type = ToyOptions

    def __init__(self, config=None, length=None, in_place=False, finish=True):
        super().__init__("toy", config)
        self.length = length or {}
        self.in_place = in_place
        self.finish = finish
        self.forced_jobs = []

    def sample(self, run):
        # put samples in reverse order: assembly must still follow request and sample order
        for q in reversed(range(len(run.requests))):
            r = run.requests[q]
            run.prompt_tokens[q] = len(r.prompt)
            for i in reversed(range(r.n)):
                n = min(self.length.get(r.key, 3) + i, r.max_tokens)
                finished = self.finish and n < r.max_tokens
                c = Completion(f"{r.key}/{i}", [f"t{k}" for k in range(n)], finished)
                if self.in_place:
                    for b in run.budgets_to_force(q, finished, n)[-1:]:
                        c.forced[b] = ForcedAnswer(f"in place {run.force_seed(q, i, b)}", 1)
                run.put(q, i, c)

    def force(self, run, jobs):
        self.forced_jobs += jobs
        return [ForcedAnswer(f"forced {j.seed}", 2) for j in jobs]


def req(key="a", n=2, budgets=(0, 2, 8), seed=10, **kw):
    return OnePassRequest(key=key, prompt=f"prompt of {key}", n=n, budgets=budgets, seed=seed, **kw)


# ---------------------------------------------------------------- seeds


def test_forced_answer_seeds_are_the_values_rollouts_were_made_with():
    # pinned: changing the rule changes every stored rollout's forced answers
    assert mix_seed(0, 0, 0) == 1099207315
    assert mix_seed(7, 2, 16) == 2876819761
    assert mix_seed(107, 1, 4) == 2023522352
    assert mix_seed(2**33 + 5, 3, 4096) == 2161032158
    assert len({mix_seed(7, i, b) for i in range(4) for b in (0, 4, 8, 16)}) == 16


def test_engine_seeds_are_32_bit_and_never_llama_cpps_random_seed():
    assert seed32(5) == 5 and seed32(2**32 + 5) == 5
    assert seed32(0xFFFFFFFF) == 0  # llama.cpp reads 0xFFFFFFFF as "pick a random seed"
    # the hash of (2428571561, 0, 0) is 0xFFFFFFFF before the guard (the hash inverted by hand)
    assert mix_seed(2428571561, 0, 0) == 0 and mix_seed(2428571561, 1, 0) != 0


# ---------------------------------------------------------------- the one-pass template


def test_results_follow_request_order_with_seeds_and_the_forcing_rule():
    toy = Toy(length={"a": 3, "b": 9})
    res = toy.one_pass([req("a"), req("b", n=3, seed=50)], SamplingConfig())
    assert [r.key for r in res] == ["a", "b"]
    assert [r.prompt_tokens for r in res] == [len("prompt of a"), len("prompt of b")]
    a, b = res
    assert [s.index for s in a.samples] == [0, 1] and [s.seed for s in b.samples] == [50, 51, 52]
    # a: 3 and 4 tokens, finished, so forced at 0 and 2 only; b: cut at 8, forced everywhere
    assert [(s.n_tokens, s.finished, sorted(s.forced)) for s in a.samples] == [(3, True, [0, 2]), (4, True, [0, 2])]
    assert all(sorted(s.forced) == [0, 2, 8] and not s.finished for s in b.samples)
    assert b.samples[2].forced[8] == ForcedAnswer(f"forced {mix_seed(50, 2, 8)}", 2)
    # force is asked in request, sample, budget order
    order = [(j.request, j.sample, j.budget) for j in toy.forced_jobs]
    assert order[:5] == [(0, 0, 0), (0, 0, 2), (0, 1, 0), (0, 1, 2), (1, 0, 0)]
    assert toy.last_completion_tokens_[("b", 1)] == [f"t{k}" for k in range(8)]


def test_a_fused_engine_is_not_asked_again_for_answers_it_forced_in_place():
    toy = Toy(length={"a": 20}, in_place=True)
    (r,) = toy.one_pass([req("a")], SamplingConfig())
    assert sorted(r.samples[0].forced) == [0, 2, 8]
    assert r.samples[1].forced[8].text == f"in place {mix_seed(10, 1, 8)}"
    assert {j.budget for j in toy.forced_jobs} == {0, 2}


def test_generate_samples_without_forcing():
    toy = Toy(length={"generate": 20})
    assert toy.generate("p", n=2, max_tokens=5, seed=3, temperature=0.5) == [("generate/0", 5, False),
                                                                               ("generate/1", 5, False)]
    assert toy.last_completion_tokens_[("generate", 1)] == [f"t{k}" for k in range(5)]
    assert toy.forced_jobs == []
    with pytest.raises(ValueError, match="n >= 1"):
        toy.generate("p", n=0, max_tokens=5, seed=3, temperature=0.5)


def test_bad_requests_fail_before_the_engine_runs():
    toy = Toy()
    with pytest.raises(ValueError, match="ascending"):
        toy.one_pass([req(budgets=(8, 2))], SamplingConfig())
    with pytest.raises(ValueError, match="prompt is empty"):
        toy.one_pass([OnePassRequest("e", "", 1, (0,), 1)], SamplingConfig())


def test_a_missing_sample_or_answer_count_is_a_rollout_error():
    class Lazy(Toy):
        def sample(self, run):
            super().sample(run)
            run.completions[0][1] = None

    with pytest.raises(RolloutError, match="no sample 1"):
        Lazy().one_pass([req()], SamplingConfig())

    class Short(Toy):
        def force(self, run, jobs):
            return super().force(run, jobs)[:-1]

    with pytest.raises(RolloutError, match="forced answers for"):
        Short().one_pass([req()], SamplingConfig())


def test_options_template_and_stop_strings():
    toy = Toy(ModelConfig(template="chatml", options={"width": 5}))
    assert toy.options == ToyOptions(width=5)
    assert toy.stops(SamplingConfig(stop=("<|im_end|>", "", "e"))) == ("<|im_end|>", "<|im_start|>", "e")
    assert toy.answer_stops == ("\n", "<|im_end|>", "<|im_start|>")
    assert Toy(ModelConfig(template="fewshot")).answer_stops == ("\n", "\nQuestion:", "\n\n\n")
    with pytest.raises(ValueError, match="widht"):
        Toy(ModelConfig(options={"widht": 5}))


# ---------------------------------------------------------------- capacity


def test_sequence_tokens_cover_the_costliest_forced_answer():
    run = OnePass([req(budgets=(0, 2, 8), answer_tokens=12)], SamplingConfig(), (), ())
    count = {"The final answer is": 4, "\nThe final answer is": 5}.__getitem__
    # prompt 10 + max(8, 0 + 4 + 12, 2 + 5 + 12, 8 + 5 + 12)
    assert run.sequence_tokens(0, 10, count) == 10 + 25
    samples_only = OnePass([req(budgets=(0, 2, 8))], SamplingConfig(), (), (), force=False)
    assert samples_only.sequence_tokens(0, 10, count) == 18
    with pytest.raises(ValueError, match="prompt is empty"):
        run.sequence_tokens(0, 0, count)


def test_capacity_error_names_the_need_the_room_and_the_option():
    run = OnePass([req(budgets=(0, 64))], SamplingConfig(), (), ())
    run.check_capacity(0, 10, 90, 90, room="max_model_len", option="max_model_len")  # fits exactly
    with pytest.raises(RolloutError, match=r"needs 91 tokens for one sequence .* max_model_len holds 90; "
                                           r"raise options\.max_model_len"):
        run.check_capacity(0, 10, 91, 90, room="max_model_len", option="max_model_len")
    # 4 samples share the prompt: 10 + 4 x 80
    with pytest.raises(RolloutError, match=r"needs 330 tokens for 4 samples sharing the prompt \(prompt 10 \+ 4 x 80"):
        run.check_capacity(0, 10, 90, 300, room="the shared cache (n_ctx)", option="n_ctx", parallel=4)


# ---------------------------------------------------------------- the registry


def test_registry_names_unknown_and_missing_backends(monkeypatch):
    assert "llamacpp" in BACKENDS and sorted(BACKENDS) == ["llamacpp", "openai", "vllm"]
    with pytest.raises(ValueError, match=r"unknown backend 'vlm'; choose one of \['llamacpp', 'openai', 'vllm'\]"):
        backend_class("vlm")
    monkeypatch.setitem(BACKENDS.entries, "ghost", "no_such_engine_module:Ghost")
    with pytest.raises(RolloutError, match="backend 'ghost' needs an optional dependency.*no_such_engine_module"):
        backend_class("ghost")
    assert backend_class("openai").name == "openai"
