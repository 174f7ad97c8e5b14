"""Labels of adaptive tiers from the one-pass samples, without generating anything new.

An adaptive tier's outcome on a query depends on the order in which its samples arrive. The n
samples the rollout drew for a query are i.i.d., so every ordering of them is an equally likely
way the tier's run could have gone: the label is the average over orderings of the rule's result
(``router.adaptive``): accuracy (a vote's tie split uniformly, as for static tiers), cost (tokens
generated, a prefix reused by a later cascade stage counted once) and latency (samples of one
step or stage run in parallel; steps and stages one after another). Exact over every ordering
while there are at most ``exact_limit`` of them, else a seeded Monte Carlo over ``mc_draws``
orderings (standard error at most 0.5 / sqrt(mc_draws) = 0.008 for accuracy, reported per row).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from router.adaptive import agreed, unsure, vote_until_steps
from router.vote import vote_correct_fraction

EXACT_LIMIT = 20_000  # orderings enumerated exactly (6 samples: 720)
MC_DRAWS = 4_000


@dataclass
class Samples:
    """One model's n samples of one query, at every level (budget, or a table's tier) labelled.

    ``keys[level][i]``: sample i's vote key there (None: no answer); ``tokens``: what the sample
    spends there (reasoning + forced answer); ``reasoning``: its reasoning tokens there (what a
    later, larger budget continues from); ``forced``: whether its answer there was forced.
    """

    n: int
    correct_keys: set = field(default_factory=set)
    keys: dict[Hashable, list] = field(default_factory=dict)
    tokens: dict[Hashable, list] = field(default_factory=dict)
    reasoning: dict[Hashable, list] = field(default_factory=dict)
    forced: dict[Hashable, list] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    p_correct: float
    cost_tokens: float  # expected tokens generated
    cost: float  # expected tokens x price
    latency_tokens: float  # expected tokens on the longest path (parallel within a step)
    exact: bool  # False: Monte Carlo over orderings
    draws: int  # orderings averaged


def _orderings(n_by_source: dict[Hashable, tuple[int, int]], exact_limit: int, mc_draws: int, seed: int):
    """Yield {source: ordering} maps: every ordering of each source's first-k draws, or a sample."""
    counts = {s: math.perm(n, k) for s, (n, k) in n_by_source.items()}
    total = math.prod(counts.values()) if counts else 1
    sources = list(n_by_source)
    if total <= exact_limit:
        per = [list(itertools.permutations(range(n_by_source[s][0]), n_by_source[s][1])) for s in sources]
        for combo in itertools.product(*per):
            yield dict(zip(sources, combo))
        return
    rng = random.Random(seed)
    for _ in range(mc_draws):
        yield {s: tuple(rng.sample(range(n_by_source[s][0]), n_by_source[s][1])) for s in sources}


def _average(results, n_by_source, exact_limit) -> Outcome:
    sums = [0.0, 0.0, 0.0, 0.0]
    draws = 0
    for r in results:  # (accuracy, tokens, cost, latency) of one ordering
        sums = [a + b for a, b in zip(sums, r)]
        draws += 1
    total = math.prod(math.perm(n, k) for n, k in n_by_source.values())
    acc, tokens, cost, lat = (x / draws for x in sums)
    return Outcome(acc, tokens, cost, lat, total <= exact_limit, draws)


def vote_until_run(s: Samples, level: Hashable, agree: int, k: int, step: int, order: Sequence[int],
                   price: float = 1.0) -> tuple[float, float, float, float]:
    """(accuracy, tokens, cost, latency) of one run of vote_until whose samples arrive in ``order``."""
    keys, tokens = s.keys[level], s.tokens[level]
    drawn_before, cost, lat = 0, 0.0, 0.0
    for drawn in vote_until_steps(k, step):
        batch = order[drawn_before:drawn]
        cost += sum(tokens[i] for i in batch)
        lat += max(tokens[i] for i in batch)
        drawn_before = drawn
        win = agreed([keys[i] for i in order[:drawn]], agree)
        if win is not None:
            return float(win in s.correct_keys), cost, price * cost, lat
    return vote_correct_fraction([keys[i] for i in order[:k]], s.correct_keys), cost, price * cost, lat


def vote_until(s: Samples, level: Hashable, agree: int, k: int, step: int = 1, *, price: float = 1.0,
               exact_limit: int = EXACT_LIMIT, mc_draws: int = MC_DRAWS, seed: int = 0) -> Outcome:
    """Expected outcome of drawing ``step`` samples at a time at ``level`` until ``agree`` answers
    agree, at most ``k`` (then a majority vote over the k): ``vote_until_run`` averaged over orders."""
    if not 1 <= k <= s.n:
        raise ValueError(f"vote_until needs 1 <= k <= n, got k={k}, n={s.n}")
    src = {"s": (s.n, k)}
    runs = (vote_until_run(s, level, agree, k, step, o["s"], price)
            for o in _orderings(src, exact_limit, mc_draws, seed))
    return _average(runs, src, exact_limit)


@dataclass(frozen=True)
class Stage:
    """One static tier of a cascade: ``k`` samples of ``source`` (a model's Samples) at ``level``."""

    source: Hashable
    level: Hashable
    k: int
    price: float = 1.0  # cost per token of the source's model
    budget: int = 1  # the stage's budget (0: direct answers, which are forced by definition)
    reuse: bool = True  # a later stage of the same source continues these samples' prefixes


def cascade_run(stages: Sequence[Stage], samples: dict[Hashable, Samples],
                orders: dict[Hashable, Sequence[int]]) -> tuple[float, float, float, float]:
    """(accuracy, tokens, cost, latency) of one run of the cascade whose samples arrive in ``orders``
    (one order per source). Sample i keeps its place across stages (the executor keeps its seed),
    so a later stage at a larger budget continues it: reasoning tokens already generated are not
    paid again; forced answers are."""
    generated: dict[tuple, float] = {}  # (source, sample) -> reasoning tokens already generated
    tokens = cost = lat = 0.0
    for j, st in enumerate(stages):
        s = samples[st.source]
        idx = orders[st.source][: st.k]
        keys = [s.keys[st.level][i] for i in idx]
        forced = [s.forced[st.level][i] for i in idx]
        step_tokens = []
        for i in idx:
            reasoning = s.reasoning[st.level][i]
            answer = s.tokens[st.level][i] - reasoning  # the forced answer's tokens (0 if its own)
            before = generated.get((st.source, i), 0.0) if st.reuse else 0.0
            step_tokens.append(max(0.0, reasoning - before) + answer)
            generated[(st.source, i)] = max(before, reasoning)
        tokens += sum(step_tokens)
        cost += st.price * sum(step_tokens)
        lat += max(step_tokens)
        if j == len(stages) - 1 or not unsure(keys, forced, st.budget):
            return vote_correct_fraction(keys, s.correct_keys), tokens, cost, lat
    raise AssertionError("unreachable")  # pragma: no cover


def cascade(stages: Sequence[Stage], samples: dict[Hashable, Samples], *, exact_limit: int = EXACT_LIMIT,
            mc_draws: int = MC_DRAWS, seed: int = 0) -> Outcome:
    """Expected outcome of running ``stages`` in order while ``router.adaptive.unsure`` says so:
    ``cascade_run`` averaged over the orders of every source's samples. Cost is in price units."""
    if len(stages) < 1:
        raise ValueError("a cascade needs at least one stage")
    need: dict[Hashable, int] = {}
    for st in stages:
        if not 1 <= st.k <= samples[st.source].n:
            raise ValueError(f"stage at {st.level!r} needs {st.k} samples; {samples[st.source].n} available")
        need[st.source] = max(need.get(st.source, 0), st.k)
    src = {s: (samples[s].n, k) for s, k in need.items()}
    runs = (cascade_run(stages, samples, o) for o in _orderings(src, exact_limit, mc_draws, seed))
    return _average(runs, src, exact_limit)
