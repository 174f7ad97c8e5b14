"""Adaptive tiers: the stopping and escalation rules, shared by the labels and the executor.

Static tiers pay for k samples at budget B whatever the samples say. Adaptive tiers look at the
answers as they arrive:

- ``vote_until`` (budget B, agree m, at most k, step g): draw g samples at a time at budget B;
  stop as soon as m of the answers drawn so far agree (the same vote key, a missing answer never
  agrees); after k samples without agreement, the majority vote of all k decides.
- ``cascade`` (a chain of static tiers): run the first; if it is unsure go on to the next, and so
  on; the last tier run gives the answer. Unsure means: with k > 1 samples, not all k answers
  agree (a missing answer disagrees); with one sample, it gave no answer, or it did not finish by
  itself within a budget B > 0 (its answer was forced; at budget 0 every answer is a direct,
  forced one, so only a missing answer is unsure there). A later tier of the same model continues
  the earlier tier's samples where it can (sample i keeps its seed, so its first tokens are the
  ones already generated), so a reused prefix is generated once.

The label stage computes each adaptive tier's expected accuracy, cost and latency from the
one-pass samples over the orders in which the samples could have arrived
(``pipelines/adaptive.py``); the executor runs the same rules (``router/executor.py``). Both call
the functions below, so labels describe what a decision does.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

KINDS = ("static", "vote_until", "cascade")


def agreed(keys: Sequence[str | None], agree: int) -> str | None:
    """The answer at least ``agree`` of ``keys`` share (the first to get there), or None."""
    counts: Counter = Counter()
    for k in keys:
        if k is None:
            continue
        counts[k] += 1
        if counts[k] >= agree:
            return k
    return None


def unsure(keys: Sequence[str | None], forced: Sequence[bool], budget: int) -> bool:
    """A cascade stage escalates when its answers are unsure (see the module docstring)."""
    if len(keys) == 1:
        return keys[0] is None or (budget > 0 and bool(forced[0]))
    return keys[0] is None or any(k != keys[0] for k in keys)


def vote_until_steps(k: int, step: int) -> list[int]:
    """How many samples have been drawn after each step: [g, 2g, ..., k]."""
    out, drawn = [], 0
    while drawn < k:
        drawn = min(k, drawn + step)
        out.append(drawn)
    return out
