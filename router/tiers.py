"""Tiers: the ways of spending compute on a query (shared by the pipeline and the runtime)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from router.adaptive import KINDS


@dataclass(frozen=True)
class Tier:
    """One way to spend compute on a query.

    Depth scaling is a larger ``budget``; width scaling is a larger ``samples``; a tier whose
    ``model`` differs from another's is a model route. Adaptive tiers (``router.adaptive``) decide
    while they run: ``vote_until`` stops drawing samples at ``budget`` once ``agree`` answers agree
    (at most ``samples``, ``step`` at a time); ``cascade`` runs the static tiers named in ``chain``
    in order while they are unsure. For those, ``budget`` and ``samples`` are the most a run can
    use (what caps compare against).
    """

    name: str
    model: str  # backend/model id as declared under `models:` in params.yaml (a cascade: its first stage's)
    budget: int  # max reasoning tokens per sample; 0 = answer directly
    samples: int = 1  # k completions, majority vote
    cost_per_token: float = 1.0  # price of one generated token of this model, relative units
    kind: str = "static"  # static | vote_until | cascade
    agree: int = 0  # vote_until: answers that must agree to stop
    step: int = 1  # vote_until: samples drawn per step (in parallel)
    chain: tuple[str, ...] = ()  # cascade: the static tiers run in order

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tier name must not be empty")
        if self.budget < 0:
            raise ValueError(f"tier {self.name!r}: budget must be >= 0, got {self.budget}")
        if self.samples < 1:
            raise ValueError(f"tier {self.name!r}: samples must be >= 1, got {self.samples}")
        if self.cost_per_token < 0:
            raise ValueError(f"tier {self.name!r}: cost_per_token must be >= 0")
        if self.kind not in KINDS:
            raise ValueError(f"tier {self.name!r}: unknown kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.kind == "vote_until" and not (2 <= self.agree <= self.samples and 1 <= self.step <= self.samples):
            raise ValueError(f"tier {self.name!r}: vote_until needs 2 <= agree <= samples and 1 <= step <= samples")
        if self.kind == "cascade" and len(self.chain) < 2:
            raise ValueError(f"tier {self.name!r}: a cascade chains at least two tiers")

    @property
    def adaptive(self) -> bool:
        return self.kind != "static"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chain"] = list(self.chain)
        if not self.adaptive:  # static tiers keep the bundle format they always had
            for k in ("kind", "agree", "step", "chain"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tier":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tier field(s) {sorted(unknown)}")
        return cls(
            name=str(d["name"]),
            model=str(d["model"]),
            budget=int(d["budget"]),
            samples=int(d.get("samples", 1)),
            cost_per_token=float(d.get("cost_per_token", 1.0)),
            kind=str(d.get("kind", "static")),
            agree=int(d.get("agree", 0)),
            step=int(d.get("step", 1)),
            chain=tuple(str(c) for c in d.get("chain", ())),
        )


def tier_name(model: str, budget: int, samples: int) -> str:
    """Canonical tier name, e.g. ``smollm2-b64-k4``."""
    return f"{model}-b{budget}-k{samples}"


def vote_until_name(model: str, budget: int, agree: int, samples: int, step: int = 1) -> str:
    """E.g. ``smollm2-b64-a2k6``: stop when 2 agree, at most 6 (``-s2``: two at a time)."""
    return f"{model}-b{budget}-a{agree}k{samples}" + (f"-s{step}" if step > 1 else "")


def cascade_name(chain) -> str:
    """E.g. ``smollm2-b0-k1-then-smollm2-b64-k4``."""
    return "-then-".join(chain)
