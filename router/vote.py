"""Majority vote over sampled answers, shared by labeling and the runtime executor.

Labels are only honest if the runtime votes exactly the way the label estimator assumed,
so the answer normalization and the tie rule live here, once.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def vote_key(answer: str | None) -> str | None:
    """Normalize an extracted answer for voting: "1,000." and "1000.0" vote together.

    Returns None for a missing answer (it never wins a vote).
    """
    if answer is None:
        return None
    s = answer.strip().rstrip(".").strip().lower()
    s = s.replace(",", "").replace("$", "").strip()
    if not s:
        return None
    if _NUM.match(s):
        try:
            v = float(s)
        except ValueError:  # pragma: no cover - the regex admits only floats
            return s
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return " ".join(s.split())


def majority(keys: Sequence[str | None]) -> tuple[str | None, list[str]]:
    """The winning key and the tied leaders. Missing answers (None) do not vote.

    Ties are broken by first appearance among the samples; since samples come in random
    order, that is a uniform choice among the tied leaders, which is what the label
    estimator averages over.
    """
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, []
    top = max(counts.values())
    leaders = [k for k in dict.fromkeys(k for k in keys if k is not None) if counts[k] == top]
    return leaders[0], leaders


def vote_correct_fraction(keys: Iterable[str | None], correct_keys: set[str]) -> float:
    """Expected correctness of a majority vote with a uniform tie-break.

    1.0 if a correct answer leads alone, 1/t if it is one of t tied leaders, else 0.
    """
    keys = list(keys)
    _, leaders = majority(keys)
    if not leaders:
        return 0.0
    hits = sum(1 for k in leaders if k in correct_keys)
    return hits / len(leaders)
