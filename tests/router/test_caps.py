"""``Caps``: validation from untrusted mappings, the tier filter, and ``Router.fallback`` and the
empty-query fallback on a stub router (no bundle, no encoder)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from router.caps import CAP_NAMES, Caps
from router.runtime import CAPS, Router
from router.tiers import Tier

TIERS = [  # stored in cost order, as bundles store them
    Tier("small-b0-k1", "small", 0, 1),
    Tier("small-b64-k1", "small", 64, 1),
    Tier("small-b256-k4", "small", 256, 4),
    Tier("big-b128-k1", "big", 128, 1),
]
LATENCY = [1.0, 40.0, 200.0, 100.0]


def names(caps: Caps, costs=None) -> list[str]:
    return [t.name for t, ok in zip(TIERS, caps.allowed(TIERS, LATENCY, costs)) if ok]


# ---------------------------------------------------------------- construction


def test_from_mapping_reads_set_caps_and_normalizes_them():
    c = Caps.from_mapping({"text": "hi", "max_budget": np.int64(64), "max_cost": 3, "models": ["big"],
                           "max_samples": None}, ignore=("text",))
    assert c == Caps(max_budget=64, max_cost=3.0, models=("big",))
    assert type(c.max_budget) is int and type(c.max_cost) is float  # JSON-ready, hashable
    assert c.to_dict() == {"max_budget": 64, "max_cost": 3.0, "models": ["big"]}
    assert c.active and not Caps().active and Caps.from_mapping({}) == Caps()
    assert hash(c) == hash(Caps(max_budget=64, max_cost=3.0, models=["big"]))


@pytest.mark.parametrize("data,message", [
    ({"max_budget": "64"}, 'max_budget must be an integer, got "64"'),
    ({"max_budget": True}, "max_budget must be an integer, got true"),
    ({"max_budget": 64.0}, "max_budget must be an integer, got 64.0"),
    ({"max_samples": 1.5}, "max_samples must be an integer"),
    ({"max_cost": "cheap"}, 'max_cost must be a finite number, got "cheap"'),
    ({"max_cost": math.nan}, "max_cost must be a finite number, got NaN"),
    ({"max_latency": math.inf}, "max_latency must be a finite number, got Infinity"),
    ({"max_latency": False}, "max_latency must be a finite number"),
    ({"models": "big"}, "models must be a list of model names"),  # not a substring match
    ({"models": ["big", 1]}, "models must be a list of model names"),
    ({"models": {"big": 1}}, "models must be a list of model names"),
    ({"max_tokens": 5}, "unknown key(s) ['max_tokens']; valid: ['text', 'max_budget'"),
])
def test_from_mapping_refuses_bad_caps_by_name(data, message):
    with pytest.raises(ValueError) as e:
        Caps.from_mapping(data, ignore=("text",))
    assert message in str(e.value)


def test_from_mapping_refuses_a_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        Caps.from_mapping([("max_budget", 3)])


def test_the_constructor_validates_too():
    with pytest.raises(ValueError, match="max_budget must be an integer"):
        Caps(max_budget="3")
    with pytest.raises(ValueError, match="models"):
        Caps(models="small")


def test_coerce_takes_keywords_or_a_caps_value_not_both():
    assert Caps.coerce(max_budget=3, models=None) == Caps(max_budget=3)
    c = Caps(max_samples=2)
    assert Caps.coerce(c) is c
    assert Caps.coerce({"max_samples": 2}) == c
    assert Caps.coerce() == Caps() and Caps.coerce(c, max_budget=None) is c
    with pytest.raises(TypeError, match=r"unknown cap\(s\) \['max_tokens'\]"):
        Caps.coerce(max_tokens=5)
    with pytest.raises(TypeError, match="not both"):
        Caps.coerce(c, max_budget=3)
    with pytest.raises(TypeError, match="Caps or a mapping"):
        Caps.coerce(3)


def test_the_runtime_still_exports_the_cap_names():
    assert CAPS == CAP_NAMES == tuple(f for f in Caps.__dataclass_fields__)


# ---------------------------------------------------------------- the tier filter


def test_each_cap_filters_tiers():
    assert names(Caps()) == [t.name for t in TIERS]
    assert names(Caps(max_budget=64)) == ["small-b0-k1", "small-b64-k1"]
    assert names(Caps(max_samples=1)) == ["small-b0-k1", "small-b64-k1", "big-b128-k1"]
    assert names(Caps(max_latency=100)) == ["small-b0-k1", "small-b64-k1", "big-b128-k1"]
    assert names(Caps(models=["big"])) == ["big-b128-k1"]
    assert names(Caps(models=[])) == []
    assert names(Caps(max_budget=-1)) == []
    assert names(Caps(max_budget=256, max_samples=1, models=["small"])) == ["small-b0-k1", "small-b64-k1"]


def test_max_cost_applies_only_with_predicted_costs():
    caps = Caps(max_cost=50.0)
    assert names(caps) == [t.name for t in TIERS]  # nothing predicted: nothing to compare
    assert names(caps, costs=np.array([10.0, 50.0, 400.0, 60.0])) == ["small-b0-k1", "small-b64-k1"]


# ---------------------------------------------------------------- fallbacks on a stub router


def stub_router(fallback="small-b256-k4", cheapest="small-b0-k1") -> Router:
    manifest = {"tiers": [t.to_dict() for t in TIERS],
                "policy": {"lambda": 0.01, "fallback_tier": fallback, "cheapest_tier": cheapest,
                           "tier_latency_tokens": LATENCY}}
    return Router("/nowhere", manifest, success=None, cost=None, featurizer=None)


def test_fallback_is_the_fallback_tier_when_the_caps_admit_it():
    r = stub_router()
    d = r.fallback()
    assert (d.tier, d.reason, d.p_correct, d.expected_cost) == ("small-b256-k4", "fallback:error", None, None)
    assert r.fallback(Caps(models=["small"]), reason="fallback:busy").tier == "small-b256-k4"
    assert r.fallback({"max_cost": 0.0}).tier == "small-b256-k4"  # no cost was predicted


def test_fallback_outside_the_caps_is_the_cheapest_admitted_tier():
    r = stub_router()
    assert r.fallback(Caps(max_samples=1)).tier == "small-b0-k1"
    assert r.fallback(Caps(models=["big"])).tier == "big-b128-k1"  # the cheapest tier is excluded too
    d = r.fallback(Caps(models=[]))  # nothing admitted: the cheapest tier, the reason kept
    assert (d.tier, d.reason) == ("small-b0-k1", "fallback:error")


def test_empty_queries_use_the_same_rule_from_the_cheapest_tier():
    r = stub_router()
    ds = r.route_batch(["", "  \n", None], max_budget=300)
    assert [(d.tier, d.reason) for d in ds] == [("small-b0-k1", "fallback:empty-query")] * 3
    assert r.route("", caps=Caps(models=["big"])).tier == "big-b128-k1"
    d = r.route("", models=[])
    assert (d.tier, d.reason) == ("small-b0-k1", "fallback:no-tier-within-caps")
    with pytest.raises(TypeError, match="max_tokens"):
        r.route("", max_tokens=5)
    with pytest.raises(TypeError, match="not both"):
        r.route("", caps=Caps(max_budget=1), max_samples=1)
    with pytest.raises(ValueError, match="max_budget must be an integer"):
        r.route("", max_budget="64")


def test_decide_keeps_to_the_caps():
    r = stub_router()
    p, c = np.array([0.2, 0.5, 0.9, 0.95]), np.array([1.0, 5.0, 20.0, 30.0])
    assert r.decide(p, c, lam=0.0) == (3, "utility")
    assert r.decide(p, c, 0.0, Caps(models=["small"])) == (2, "utility")
    assert r.decide(p, c, lam=0.0, max_cost=10.0) == (1, "utility")
    assert r.decide(p, c, lam=0.0, caps={"models": ["nope"]}) == (0, "fallback:no-tier-within-caps")
