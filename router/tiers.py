"""Tiers: the ways of spending compute on a query (shared by the pipeline and the runtime)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Tier:
    """One way to spend compute on a query.

    Depth scaling is a larger ``budget``; width scaling is a larger ``samples``; a tier whose
    ``model`` differs from another's is a model route.
    """

    name: str
    model: str  # backend/model id as declared under `models:` in params.yaml
    budget: int  # max reasoning tokens per sample; 0 = answer directly
    samples: int = 1  # k completions, majority vote
    cost_per_token: float = 1.0  # price of one generated token of this model, relative units

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tier name must not be empty")
        if self.budget < 0:
            raise ValueError(f"tier {self.name!r}: budget must be >= 0, got {self.budget}")
        if self.samples < 1:
            raise ValueError(f"tier {self.name!r}: samples must be >= 1, got {self.samples}")
        if self.cost_per_token < 0:
            raise ValueError(f"tier {self.name!r}: cost_per_token must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Tier":
        unknown = set(d) - {"name", "model", "budget", "samples", "cost_per_token"}
        if unknown:
            raise ValueError(f"unknown tier field(s) {sorted(unknown)}")
        return cls(
            name=str(d["name"]),
            model=str(d["model"]),
            budget=int(d["budget"]),
            samples=int(d.get("samples", 1)),
            cost_per_token=float(d.get("cost_per_token", 1.0)),
        )


def tier_name(model: str, budget: int, samples: int) -> str:
    """Canonical tier name, e.g. ``smollm2-b64-k4``."""
    return f"{model}-b{budget}-k{samples}"
