"""Subset estimators: every width tier from one set of n samples.

Subsets of i.i.d. samples are i.i.d. samples, so the average over all k-subsets of the n
samples is an unbiased estimate of a k-sample tier, and a soft label rather than one coin
flip. The exact average enumerates subsets while there are few; past ``exact_limit`` a
fixed-seed Monte Carlo over subsets keeps the cost bounded.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import Sequence

from router.vote import vote_correct_fraction

EXACT_LIMIT = 20_000  # C(16, 8) = 12,870 is still exact; C(32, 16) is not
MC_DRAWS = 4_000


def majority_vote_accuracy(
    keys: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    *,
    exact_limit: int = EXACT_LIMIT,
    mc_draws: int = MC_DRAWS,
    seed: int = 0,
) -> float:
    """P(majority vote over k of these samples is correct), averaged over k-subsets.

    ``keys`` are vote keys (``router.vote.vote_key``) of the n samples' answers, ``correct``
    whether each is right. A key is correct if any sample with it was judged correct.
    """
    n = len(keys)
    if len(correct) != n:
        raise ValueError("keys and correct must have the same length")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    correct_keys = {key for key, c in zip(keys, correct) if c and key is not None}
    if not correct_keys:
        return 0.0
    if k == 1:
        # a lone sample is right iff it is right: no enumeration needed
        return sum(1 for key in keys if key in correct_keys) / n
    if _all_same(keys):
        return 1.0 if keys[0] in correct_keys else 0.0
    total = math.comb(n, k)
    if total <= exact_limit:
        acc = 0.0
        for idx in itertools.combinations(range(n), k):
            acc += vote_correct_fraction((keys[i] for i in idx), correct_keys)
        return acc / total
    rng = random.Random(seed)
    acc = 0.0
    for _ in range(mc_draws):
        idx = rng.sample(range(n), k)
        acc += vote_correct_fraction((keys[i] for i in idx), correct_keys)
    return acc / mc_draws


def _all_same(keys: Sequence[str | None]) -> bool:
    return len(Counter(keys)) == 1


def expected_subset_sum(values: Sequence[float], k: int) -> float:
    """E[sum of a random k-subset] = k * mean: the cost of k samples."""
    n = len(values)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    return k * sum(values) / n


def expected_subset_max(values: Sequence[float], k: int) -> float:
    """E[max of a random k-subset], exactly, by order statistics.

    Sorted ascending, the j-th smallest (1-based) is the max of C(j-1, k-1) of the C(n, k)
    subsets. This is a width tier's latency: its samples run in parallel.
    """
    n = len(values)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    v = sorted(values)
    total = math.comb(n, k)
    return sum(v[j - 1] * math.comb(j - 1, k - 1) for j in range(k, n + 1)) / total
