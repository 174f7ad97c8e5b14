"""Subset estimators of width tiers checked against brute-force enumeration and simulation."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.estimators import (
    expected_subset_max,
    expected_subset_sum,
    majority_vote_accuracy,
)


def brute_force_vote(keys, correct, k):
    """Independent reference: enumerate every k-subset and every tie-break exactly."""
    good = {key for key, c in zip(keys, correct) if c and key is not None}
    n = len(keys)
    total = Fraction(0)
    for idx in itertools.combinations(range(n), k):
        votes = Counter(keys[i] for i in idx if keys[i] is not None)
        if not votes:
            continue
        top = max(votes.values())
        leaders = [a for a, c in votes.items() if c == top]
        total += Fraction(sum(a in good for a in leaders), len(leaders))
    return float(total / math.comb(n, k))


answers = st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=9)


@settings(max_examples=300, deadline=None)
@given(answers, st.data())
def test_matches_brute_force(keys, data):
    correct = [a == "1" for a in keys]
    k = data.draw(st.integers(1, len(keys)))
    assert majority_vote_accuracy(keys, correct, k) == pytest.approx(brute_force_vote(keys, correct, k), abs=1e-12)


def test_known_values():
    # 2 of 3 samples right: a 3-vote is right iff the majority is right
    assert majority_vote_accuracy(["a", "a", "b"], [True, True, False], 3) == 1.0
    # 1 right, 1 wrong, k=2: a tie, the uniform tie-break is right half of the time
    assert majority_vote_accuracy(["a", "b"], [True, False], 2) == 0.5
    assert majority_vote_accuracy(["a", "b", "c"], [False, False, False], 2) == 0.0
    assert majority_vote_accuracy([None, None, "a"], [False, False, True], 1) == pytest.approx(1 / 3)
    # missing answers do not vote: {None, a} elects a
    assert majority_vote_accuracy([None, "a"], [False, True], 2) == 1.0


def test_monte_carlo_path_close_to_exact():
    rng = random.Random(3)
    keys = [rng.choice(["1", "2", "3", "4"]) for _ in range(16)]
    correct = [k == "1" for k in keys]
    exact = majority_vote_accuracy(keys, correct, 7)
    mc = majority_vote_accuracy(keys, correct, 7, exact_limit=10, mc_draws=20_000, seed=1)
    assert mc == pytest.approx(exact, abs=0.02)
    # fixed seed: the Monte Carlo estimate is reproducible
    assert mc == majority_vote_accuracy(keys, correct, 7, exact_limit=10, mc_draws=20_000, seed=1)


def test_unbiased_against_simulated_runs():
    """The subset average equals what independent k-sample runs would score on average."""
    rng = random.Random(0)
    # the model answers "1" (right) w.p. 0.45, "2" w.p. 0.35, "3" w.p. 0.2
    def draw():
        u = rng.random()
        return "1" if u < 0.45 else ("2" if u < 0.8 else "3")

    k, n, queries = 5, 12, 400
    est, sim = 0.0, 0.0
    for _ in range(queries):
        keys = [draw() for _ in range(n)]
        est += majority_vote_accuracy(keys, [a == "1" for a in keys], k)
        run = [draw() for _ in range(k)]
        sim += brute_force_vote(run, [a == "1" for a in run], k)
    # the estimator has far lower variance than the simulation; both target the same mean
    assert est / queries == pytest.approx(sim / queries, abs=0.06)


def test_bad_arguments():
    with pytest.raises(ValueError):
        majority_vote_accuracy(["a"], [True], 2)
    with pytest.raises(ValueError):
        majority_vote_accuracy(["a", "b"], [True], 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=8), st.data())
def test_subset_max_and_sum_match_enumeration(values, data):
    k = data.draw(st.integers(1, len(values)))
    subsets = list(itertools.combinations(values, k))
    assert expected_subset_max(values, k) == pytest.approx(sum(max(s) for s in subsets) / len(subsets))
    assert expected_subset_sum(values, k) == pytest.approx(sum(sum(s) for s in subsets) / len(subsets))
