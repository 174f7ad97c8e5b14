"""The routing policy: one implementation for the runtime and the evaluation.

For query q and tier t with predicted success ``p[t]`` and cost ``c[t]``, pick
``argmax_t p[t] - lam * c[t]`` among the tiers a request allows. ``lam`` is the price of one
unit of cost in accuracy: 0 buys the most accurate tier, a large value the cheapest.
Ties go to the cheaper tier (then the lower index), so a decision is deterministic.
"""

from __future__ import annotations

from typing import Sequence


def choose(p: Sequence[float], c: Sequence[float], lam: float, allowed: Sequence[bool] | None = None) -> int:
    """Index of the chosen tier for one query (pure Python: no NumPy call overhead).

    Returns -1 if no tier is allowed.
    """
    best, best_u, best_c = -1, float("-inf"), float("inf")
    for i in range(len(p)):
        if allowed is not None and not allowed[i]:
            continue
        u = p[i] - lam * c[i]
        if u > best_u + 1e-12 or (abs(u - best_u) <= 1e-12 and c[i] < best_c):
            best, best_u, best_c = i, u, c[i]
    return best


def choose_batch(P, C, lam: float, allowed=None):
    """Vectorized :func:`choose` over queries: ``P``, ``C`` are (queries, tiers) arrays."""
    import numpy as np

    P = np.asarray(P, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    U = P - lam * C
    if allowed is not None:
        U = np.where(np.asarray(allowed, dtype=bool), U, -np.inf)
    best = U.max(axis=1, keepdims=True)
    # among near-ties (same rule as `choose`), the cheapest tier wins, then the lowest index
    tie = U >= best - 1e-12
    Cm = np.where(tie, C, np.inf)
    idx = Cm.argmin(axis=1)
    idx[~np.isfinite(best[:, 0])] = -1
    return idx


def solve_lambda(P, C, *, target_cost: float | None = None, target_accuracy: float | None = None,
                 Y=None, iters: int = 60) -> float:
    """Find ``lam`` by bisection so the policy meets a target on the given (validation) rows.

    ``target_cost``: the largest accuracy whose mean *predicted* cost (or, with ``Y`` as the
    realized cost table, realized cost) stays within the target. ``target_accuracy``: the
    cheapest operating point whose mean accuracy (``Y`` = realized p_correct table, default the
    predictions) reaches the target. Mean cost falls as ``lam`` grows, so bisection applies.
    """
    import numpy as np

    if (target_cost is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_cost and target_accuracy")
    P = np.asarray(P, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    rows = np.arange(len(P))
    spread = float(np.ptp(C)) or 1.0
    lo, hi = 0.0, 10.0 / spread * max(1.0, float(np.ptp(P)) or 1.0)
    # hi must make the policy pick the cheapest tier everywhere
    for _ in range(60):
        idx = choose_batch(P, C, hi)
        if np.allclose(C[rows, idx], C.min(axis=1)):
            break
        hi *= 2
    if target_cost is not None:
        table = C if Y is None else np.asarray(Y, dtype=np.float64)

        def ok(lam: float) -> bool:  # within budget
            return float(table[rows, choose_batch(P, C, lam)].mean()) <= target_cost

        if ok(lo):
            return lo
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi
    table = P if Y is None else np.asarray(Y, dtype=np.float64)

    def good(lam: float) -> bool:  # accurate enough
        return float(table[rows, choose_batch(P, C, lam)].mean()) >= target_accuracy

    if not good(lo):
        return lo  # unreachable target: the most accurate operating point
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if good(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------- exploration

EXPLORE_RULE = "epsilon-greedy/other-uniform/sha256-request-id/v1"


def explore_uniform(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (the request id): the same request id always
    explores the same way, so a logged decision can be replayed."""
    import hashlib

    return int(hashlib.sha256(b"explore:" + key.encode("utf-8")).hexdigest()[:13], 16) / 16.0 ** 13


def explore_probabilities(greedy: int, allowed: Sequence[bool], epsilon: float) -> list[float]:
    """The logging policy's probability of every tier: the greedy tier ``1 - epsilon``, each
    other allowed tier ``epsilon / (|allowed| - 1)``, a tier the caps exclude 0. With no other
    allowed tier (or ``epsilon`` 0) the greedy tier has probability 1."""
    others = [i for i, ok in enumerate(allowed) if ok and i != greedy]
    probs = [0.0] * len(allowed)
    if epsilon <= 0 or not others:
        probs[greedy] = 1.0
        return probs
    probs[greedy] = 1.0 - epsilon
    for i in others:
        probs[i] = epsilon / len(others)
    return probs


def explore_choice(greedy: int, allowed: Sequence[bool], epsilon: float, u: float) -> tuple[int, float, bool]:
    """Epsilon-greedy on top of :func:`choose`: with probability ``epsilon`` (``u < epsilon``) the
    request goes to one of the *other* allowed tiers, drawn uniformly (``u / epsilon`` picks it), else
    to the greedy tier. Returns (tier index, its propensity under this rule, explored?); the
    propensities are :func:`explore_probabilities`."""
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"explore must be in [0, 1), got {epsilon}")
    others = [i for i, ok in enumerate(allowed) if ok and i != greedy]
    if epsilon <= 0 or not others:
        return greedy, 1.0, False
    if u < epsilon:
        j = min(int(u / epsilon * len(others)), len(others) - 1)
        return others[j], epsilon / len(others), True
    return greedy, 1.0 - epsilon, False
