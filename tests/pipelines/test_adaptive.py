"""Adaptive-tier labels (pipelines/adaptive.py) against brute force over every arrival order."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from pipelines.adaptive import Samples, Stage, cascade, vote_until
from pipelines.estimators import majority_vote_accuracy


def make(keys_by_level, tokens_by_level, reasoning_by_level=None, forced_by_level=None, correct=("4",)):
    n = len(next(iter(keys_by_level.values())))
    return Samples(n=n, correct_keys=set(correct), keys=keys_by_level, tokens=tokens_by_level,
                   reasoning=reasoning_by_level or tokens_by_level,
                   forced=forced_by_level or {lv: [False] * n for lv in keys_by_level})


def brute_vote_until(keys, tokens, correct, agree, k, step):
    """Every full permutation of the n samples; the rule written out plainly."""
    acc = cost = lat = 0.0
    perms = list(itertools.permutations(range(len(keys))))
    for order in perms:
        drawn, c, latency, answer = [], 0.0, 0.0, None
        while len(drawn) < k and answer is None:
            batch = order[len(drawn): min(k, len(drawn) + step)]
            drawn += batch
            c += sum(tokens[i] for i in batch)
            latency += max(tokens[i] for i in batch)
            counts = Counter()
            for i in drawn:
                if keys[i] is not None:
                    counts[keys[i]] += 1
                    if counts[keys[i]] >= agree and answer is None:
                        answer = keys[i]
        if answer is not None:
            a = float(answer in correct)
        else:
            counts = Counter(keys[i] for i in drawn if keys[i] is not None)
            if not counts:
                a = 0.0
            else:
                top = max(counts.values())
                leaders = [key for key, v in counts.items() if v == top]
                a = sum(key in correct for key in leaders) / len(leaders)
        acc, cost, lat = acc + a, cost + c, lat + latency
    return acc / len(perms), cost / len(perms), lat / len(perms)


@pytest.mark.parametrize("seed", range(12))
def test_vote_until_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    keys = [rng.choice(["4", "5", "6", None]) for _ in range(n)]
    tokens = [float(rng.randint(2, 40)) for _ in range(n)]
    k = rng.randint(2, n)
    agree = rng.randint(2, k)
    step = rng.randint(1, k)
    s = make({64: keys}, {64: tokens})
    got = vote_until(s, 64, agree, k, step)
    want = brute_vote_until(keys, tokens, {"4"}, agree, k, step)
    assert got.exact
    assert (got.p_correct, got.cost_tokens, got.latency_tokens) == pytest.approx(want, abs=1e-12)


def test_vote_until_drawing_all_at_once_with_full_agreement_is_the_static_vote():
    keys = ["4", "4", "5", None, "4", "5"]
    s = make({8: keys}, {8: [10.0] * 6})
    for k in (2, 3, 4, 6):
        got = vote_until(s, 8, agree=k, k=k, step=k)
        assert got.p_correct == pytest.approx(majority_vote_accuracy(keys, [x == "4" for x in keys], k), abs=1e-12)
        assert got.cost_tokens == pytest.approx(10.0 * k)


def test_vote_until_stops_early_and_saves_tokens_when_answers_agree():
    agreeing = make({8: ["4"] * 6}, {8: [10.0] * 6})
    out = vote_until(agreeing, 8, agree=2, k=6)
    assert out.p_correct == 1.0 and out.cost_tokens == 20.0 and out.latency_tokens == 20.0
    parallel = vote_until(agreeing, 8, agree=2, k=6, step=2)
    assert parallel.cost_tokens == 20.0 and parallel.latency_tokens == 10.0  # one step of two in parallel


def test_monte_carlo_is_close_to_exact():
    rng = random.Random(3)
    keys = [rng.choice(["4", "5", None]) for _ in range(7)]
    s = make({8: keys}, {8: [float(rng.randint(1, 30)) for _ in range(7)]})
    exact = vote_until(s, 8, 2, 7)
    mc = vote_until(s, 8, 2, 7, exact_limit=10, mc_draws=4000, seed=1)
    assert exact.exact and not mc.exact and mc.draws == 4000
    assert abs(mc.p_correct - exact.p_correct) < 4 * 0.5 / 4000 ** 0.5
    assert mc.cost_tokens == pytest.approx(exact.cost_tokens, rel=0.05)


def brute_cascade(stages, levels, correct):
    """Full permutations of the samples; stage j uses the first k_j; reuse written out plainly."""
    n = len(next(iter(levels.values()))["keys"])
    acc = tokens_total = lat = 0.0
    perms = list(itertools.permutations(range(n)))
    for order in perms:
        generated = {}
        for j, (level, k) in enumerate(stages):
            lv = levels[level]
            idx = order[:k]
            new = []
            for i in idx:
                before = generated.get(i, 0.0)
                new.append(max(0.0, lv["reasoning"][i] - before) + (lv["tokens"][i] - lv["reasoning"][i]))
                generated[i] = max(before, lv["reasoning"][i])
            tokens_total += sum(new)
            lat += max(new)
            keys = [lv["keys"][i] for i in idx]
            forced = [lv["forced"][i] for i in idx]
            sure = (keys[0] is not None and (level == 0 or not forced[0])) if k == 1 else (
                keys[0] is not None and all(x == keys[0] for x in keys))
            if sure or j == len(stages) - 1:
                counts = Counter(x for x in keys if x is not None)
                if counts:
                    top = max(counts.values())
                    leaders = [x for x, v in counts.items() if v == top]
                    acc += sum(x in correct for x in leaders) / len(leaders)
                break
    return acc / len(perms), tokens_total / len(perms), lat / len(perms)


@pytest.mark.parametrize("seed", range(10))
def test_cascade_equals_brute_force_with_prefix_reuse(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(3, 5)
    levels = {}
    full = [rng.randint(5, 60) for _ in range(n)]  # each sample's own length
    finished = [rng.random() < 0.6 for _ in range(n)]
    for b in (0, 16, 64):
        forced = [not (finished[i] and full[i] <= b) for i in range(n)]
        reasoning = [float(min(full[i], b)) if forced[i] else float(full[i]) for i in range(n)]
        tokens = [reasoning[i] + (3.0 if forced[i] else 0.0) for i in range(n)]
        keys = [rng.choice(["4", "5", None]) if forced[i] else rng.choice(["4", "4", "5"]) for i in range(n)]
        levels[b] = {"keys": keys, "tokens": tokens, "reasoning": reasoning, "forced": forced}
    s = make({b: v["keys"] for b, v in levels.items()}, {b: v["tokens"] for b, v in levels.items()},
             {b: v["reasoning"] for b, v in levels.items()}, {b: v["forced"] for b, v in levels.items()})
    chain = [(0, 1), (16, 1), (64, min(3, n))]
    got = cascade([Stage("m", b, k, budget=b) for b, k in chain], {"m": s})
    want = brute_cascade(chain, levels, {"4"})
    assert (got.p_correct, got.cost_tokens, got.latency_tokens) == pytest.approx(want, abs=1e-9)


def test_a_one_stage_cascade_is_the_static_tier_and_prices_apply():
    keys = ["4", "5", "4", "4"]
    s = make({8: keys}, {8: [12.0, 8.0, 10.0, 6.0]})
    out = cascade([Stage("m", 8, 3, price=2.0)], {"m": s})
    assert out.p_correct == pytest.approx(majority_vote_accuracy(keys, [k == "4" for k in keys], 3))
    assert out.cost_tokens == pytest.approx(3 * 9.0) and out.cost == pytest.approx(2 * 3 * 9.0)


def test_a_cascade_over_two_models_pays_both_only_when_the_first_is_unsure():
    small = make({0: ["4", "4"]}, {0: [2.0, 2.0]}, forced_by_level={0: [False, False]})
    big = make({0: ["4", "5"]}, {0: [50.0, 50.0]})
    sure = cascade([Stage("s", 0, 1, budget=0), Stage("b", 0, 1, price=10.0, budget=0)], {"s": small, "b": big})
    assert sure.p_correct == 1.0 and sure.cost == 2.0  # a direct answer was given: no escalation
    unsure_small = make({0: ["4", None]}, {0: [2.0, 2.0]}, forced_by_level={0: [True, True]})
    out = cascade([Stage("s", 0, 1, budget=0), Stage("b", 0, 1, price=10.0, budget=0)],
                  {"s": unsure_small, "b": big})
    # half the orders give the small model's answer "4"; the other half give none and pay the big one
    assert out.cost == pytest.approx(2.0 + 0.5 * 10 * 50.0) and out.p_correct == pytest.approx(0.5 + 0.5 * 0.5)
