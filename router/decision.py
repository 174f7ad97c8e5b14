"""The runtime's output: which tier, with what budget and samples, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Decision:
    tier: str
    budget: int  # max reasoning tokens per sample (0 = answer directly)
    samples: int  # completions to draw and vote over
    model: str
    p_correct: float | None  # predicted probability the tier answers correctly (None: not predicted)
    expected_cost: float | None  # predicted cost (tokens x price) of the tier on this query
    reason: str  # "utility", or "fallback:<why>" (see README, "Fallbacks")

    def to_dict(self) -> dict:
        return asdict(self)
