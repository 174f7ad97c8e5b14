"""``Caps``: the limits a request puts on the tiers that may compete for it.

One type for every caller: ``Router.route(text, caps=Caps(...))`` (or the same caps as
keywords), the HTTP server (``Caps.from_mapping`` of the JSON body; its ``ValueError`` becomes
the 400) and the CLI (its flags). Validation lives here once, so a cap means the same thing
wherever it comes from. Standard library only: ``import router`` stays cheap.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

CAP_NAMES = ("max_budget", "max_samples", "max_cost", "max_latency", "max_latency_ms", "models")
_INT_CAPS = ("max_budget", "max_samples")
_NUM_CAPS = ("max_cost", "max_latency", "max_latency_ms")


def _shown(v: Any) -> str:
    """A rejected value as the client sent it (JSON if it is JSON), cut short."""
    try:
        return json.dumps(v)[:40]
    except (TypeError, ValueError):
        return repr(v)[:40]


@dataclass(frozen=True)
class Caps:
    """Which tiers a request admits. ``None`` leaves a cap unset; no cap set admits every tier.

    Negative or zero limits are valid (they may admit no tier: the router then answers with the
    cheapest tier and reason ``fallback:no-tier-within-caps``); NaN and infinity are not, since
    NaN compares false with everything and would silently admit every tier.
    """

    max_budget: int | None = None  # reasoning tokens per sample (a tier's ``budget``)
    max_samples: int | None = None  # completions voted over (a tier's ``samples``)
    max_cost: float | None = None  # predicted cost on this query: only known after prediction
    max_latency: float | None = None  # the tier's latency tokens (longest single sequence)
    # the tier's expected latency in milliseconds: its latency tokens over its model's measured
    # speed (tokens per second), so it needs speeds (``Router.tokens_per_second``; the proxy keeps
    # them current from what it observes). Its own cap rather than a translation into
    # ``max_latency``: models of one bundle run at different speeds
    max_latency_ms: float | None = None
    models: tuple[str, ...] | None = None  # admitted model ids; () admits none

    def __post_init__(self):
        for k in _INT_CAPS:
            v = getattr(self, k)
            if v is None:
                continue
            # numbers.Integral takes NumPy integers too; bool is an int but never a count
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{k} must be an integer, got {_shown(v)}")
            object.__setattr__(self, k, int(v))
        for k in _NUM_CAPS:
            v = getattr(self, k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {_shown(v)}")
            object.__setattr__(self, k, float(v))
        m = self.models
        if m is not None:
            # a bare string would be matched by substring ("small" in "smallest"): refuse it
            if isinstance(m, (str, bytes)) or not isinstance(m, (list, tuple, set, frozenset)) \
                    or not all(isinstance(x, str) for x in m):
                raise ValueError("models must be a list of model names (strings)")
            object.__setattr__(self, "models", tuple(m))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], ignore: Sequence[str] = ()) -> "Caps":
        """Caps from untrusted key/value pairs (a JSON body, CLI flags, MLflow params).

        ``ignore``: other keys the mapping may hold (e.g. the body's ``text``). Unknown keys,
        wrong types and non-finite numbers raise ``ValueError`` naming the key; ``None``
        values leave a cap unset.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"caps must be a mapping of cap names to values, got {type(data).__name__}")
        unknown = set(data) - set(CAP_NAMES) - set(ignore)
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; valid: {list(ignore) + list(CAP_NAMES)}")
        return cls(**{k: data[k] for k in CAP_NAMES if data.get(k) is not None})

    @classmethod
    def coerce(cls, caps: "Caps | Mapping[str, Any] | None" = None, **kw: Any) -> "Caps":
        """The caps of a Python call: ``caps=Caps(...)`` (or a mapping) or keyword caps, not both.

        An unknown keyword is a ``TypeError``, as for any function called with a keyword it
        does not take.
        """
        unknown = set(kw) - set(CAP_NAMES)
        if unknown:
            raise TypeError(f"unknown cap(s) {sorted(unknown)}; valid: {list(CAP_NAMES)}")
        if caps is None:
            return cls(**{k: v for k, v in kw.items() if v is not None}) if kw else NO_CAPS
        if any(v is not None for v in kw.values()):
            raise TypeError("pass caps=Caps(...) or keyword caps, not both")
        if isinstance(caps, Caps):
            return caps
        if isinstance(caps, Mapping):
            return cls.from_mapping(caps)
        raise TypeError(f"caps must be a Caps or a mapping, got {type(caps).__name__}")

    @property
    def active(self) -> bool:
        """True if any cap is set."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        """The caps that are set, JSON-ready (``models`` as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if "models" in out:
            out["models"] = list(out["models"])
        return out

    def allowed(self, tiers: Sequence[Any], latency: Sequence[float],
                costs: Sequence[float] | None = None, latency_ms: Sequence[float] | None = None) -> list[bool]:
        """Which of ``tiers`` (objects with ``budget``, ``samples``, ``model``) the caps admit.

        ``latency``: each tier's latency tokens. ``costs``: each tier's predicted cost on this
        query; without it ``max_cost`` is not applied (nothing was predicted to compare).
        ``latency_ms``: each tier's expected latency; ``max_latency_ms`` without it is a
        ``ValueError`` (a latency cap that cannot be checked must not pass silently).
        """
        if self.max_latency_ms is not None and latency_ms is None:
            raise ValueError("max_latency_ms needs each tier's expected latency, i.e. measured upstream speed "
                             "(the bundle's execution.models.<model>.tokens_per_second, or the proxy's)")
        out = []
        for i, t in enumerate(tiers):
            ok = ((self.max_budget is None or t.budget <= self.max_budget)
                  and (self.max_samples is None or t.samples <= self.max_samples)
                  and (self.max_latency is None or latency[i] <= self.max_latency)
                  and (self.max_latency_ms is None or latency_ms[i] <= self.max_latency_ms)
                  and (self.models is None or t.model in self.models)
                  and (self.max_cost is None or costs is None or costs[i] <= self.max_cost))
            out.append(bool(ok))
        return out


NO_CAPS = Caps()
