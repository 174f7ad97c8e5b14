"""Epsilon-greedy exploration with logged propensities: the rule's exact probabilities, the
runtime's seeded draws (reproducible per request id, only among admitted tiers, never on a
fallback), and the proxy's decision log, headers and metrics against a scripted upstream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router import Router
from router.decision_log import read_records
from router.policy import explore_choice, explore_probabilities, explore_uniform
from router.proxy import ProxyConfig
from tests.fakes import FakeOpenAIServer
from tests.router.bundle_fixture import session_proxy_bundle, synthetic_queries
from tests.traffic import get_text, post_json, start_proxy

# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("greedy,allowed,eps", [(0, [True] * 5, 0.1), (2, [True, False, True, True, False], 0.3),
                                                (4, [False, True, False, False, True], 0.05)])
def test_the_draw_has_exactly_the_logged_probabilities(greedy, allowed, eps):
    probs = explore_probabilities(greedy, allowed, eps)
    assert sum(probs) == pytest.approx(1.0)
    assert all(p == 0 for p, ok in zip(probs, allowed) if not ok)
    # a fine even grid of u stands for the uniform: the share of each tier is its probability
    n = 100_000
    counts = np.zeros(len(allowed))
    for i in range(n):
        k, prop, explored = explore_choice(greedy, allowed, eps, (i + 0.5) / n)
        counts[k] += 1
        assert prop == pytest.approx(probs[k]) and explored == (k != greedy)
    assert np.allclose(counts / n, probs, atol=2 / n)


def test_no_other_tier_or_no_rate_means_the_greedy_tier_with_propensity_one():
    assert explore_choice(1, [False, True, False], 0.5, 0.01) == (1, 1.0, False)
    assert explore_choice(1, [True, True, True], 0.0, 0.0) == (1, 1.0, False)
    assert explore_probabilities(1, [False, True], 0.5) == [0.0, 1.0]
    with pytest.raises(ValueError, match="explore"):
        explore_choice(0, [True, True], 1.0, 0.5)


def test_the_uniform_is_fixed_by_the_key_and_spread_evenly():
    assert explore_uniform("abc") == explore_uniform("abc") != explore_uniform("abd")
    u = np.array([explore_uniform(f"req-{i}") for i in range(4000)])
    assert 0 <= u.min() and u.max() < 1
    # each decile holds about a tenth: binomial sd is sqrt(4000 * 0.1 * 0.9) = 19
    assert np.all(np.abs(np.histogram(u, bins=10, range=(0, 1))[0] - 400) < 5 * 19)


# ---------------------------------------------------------------- the runtime


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    r = Router.load(session_proxy_bundle(tmp_path_factory).path)
    r.route("warm up")
    return r


def test_router_explores_only_with_keys_and_reproducibly(router):
    texts, _ = synthetic_queries(400, seed=7)
    keys = [f"rid-{i}" for i in range(len(texts))]
    plain = router.route_detailed(texts)
    assert all(r.propensity == 1.0 and not r.explored for r in plain)  # no keys: deterministic
    eps = 0.3
    a = router.route_detailed(texts, keys=keys, explore=eps)
    b = router.route_detailed(texts, keys=keys, explore=eps)
    assert [r.decision for r in a] == [r.decision for r in b]
    names = [t.name for t in router.tiers]
    utility = [r for r0, r in zip(plain, a) if r0.decision.reason.startswith("utility")]
    assert len(utility) > len(texts) / 2
    n_explored = sum(r.explored for r in a)
    assert abs(n_explored - eps * len(utility)) < 4 * np.sqrt(len(utility) * eps * (1 - eps))
    for r0, r in zip(plain, a):
        if not r0.decision.reason.startswith("utility"):  # fallbacks (out of distribution here) never explore
            assert r.decision == r0.decision and r.greedy is None and r.propensity == 1.0
            continue
        assert r.greedy == names.index(r0.decision.tier)  # the greedy tier is the unexplored choice
        k = names.index(r.decision.tier)
        assert r.propensity == pytest.approx(explore_probabilities(r.greedy, r.allowed, eps)[k])
        assert r.explored == (k != r.greedy) and (r.decision.reason == "explore") == r.explored
        if r.explored:
            assert r.decision.p_correct == pytest.approx(float(r.p[k]))  # the executed tier's predictions


def test_exploration_stays_within_caps_and_never_touches_a_fallback(router):
    texts, _ = synthetic_queries(200, seed=3)
    keys = [f"k{i}" for i in range(len(texts))]
    routed = router.route_detailed(texts, keys=keys, explore=0.5, max_samples=1, models=["small"])
    allowed_names = {t.name for t in router.tiers if t.samples == 1 and t.model == "small"}
    assert {r.decision.tier for r in routed} <= allowed_names
    assert any(r.explored for r in routed)
    assert all(r.propensity == pytest.approx(0.5 / (len(allowed_names) - 1) if r.explored else 0.5)
               for r in routed if r.greedy is not None)
    empty = router.route_detailed(["", "   "], keys=["a", "b"], explore=0.9)
    assert all(r.decision.reason == "fallback:empty-query" and r.propensity == 1.0 and r.greedy is None
               for r in empty)


def test_a_bad_rate_is_refused(router):
    with pytest.raises(ValueError, match="explore"):
        router.route_detailed(["What is 2 + 2?"], keys=["x"], explore=1.5)


# ---------------------------------------------------------------- the proxy


def post(srv, body):
    return post_json(srv, "/v1/chat/completions", body)


def test_proxy_logs_propensity_and_a_replay_gives_the_same_tiers(router, tmp_path):
    eps = 0.4
    texts, _ = synthetic_queries(60, seed=11)
    with FakeOpenAIServer() as fake:
        srv = start_proxy(router, ProxyConfig(upstreams={"small": fake.url, "big": fake.url}, explore=eps,
                                              decision_log=str(tmp_path / "d.jsonl"), log_text=True))
        try:
            answers = [post(srv, {"model": "router", "messages": [{"role": "user", "content": t}]}) for t in texts]
            text_metrics = get_text(srv)
        finally:
            srv.drain(5)
    recs = list(read_records(tmp_path / "d.jsonl"))
    assert len(recs) == len(texts) and all(status == 200 for status, _, _ in answers)
    by_id = {r["request_id"]: r for r in recs}
    for status, body, headers in answers:
        rec = by_id[body["router"]["request_id"]]
        assert float(headers["x-router-propensity"]) == pytest.approx(rec["propensity"])
        assert body["router"]["explored"] == rec["explored"] and body["router"]["tier"] == rec["chosen"]
    explored = [r for r in recs if r["explored"]]
    assert explored and len(explored) < len(recs)
    assert all(r["explore"] == eps and r["reason"] == "explore" and r["chosen"] != r["greedy"] for r in explored)
    assert all(r["propensity"] == pytest.approx(1 - eps) and r["chosen"] == r["greedy"]
               for r in recs if not r["explored"])
    # replay: the logged text and request id give the logged decision
    replay = router.route_detailed([r["text"] for r in recs], keys=[r["request_id"] for r in recs], explore=eps)
    assert [x.decision.tier for x in replay] == [r["chosen"] for r in recs]
    assert [x.propensity for x in replay] == pytest.approx([r["propensity"] for r in recs])
    assert "router_proxy_explore_rate 0.4" in text_metrics
    n_explore = sum(float(line.rsplit(" ", 1)[1]) for line in text_metrics.splitlines()
                    if line.startswith("router_proxy_decisions_total{") and 'reason="explore"' in line)
    assert n_explore == len(explored)


def test_proxy_without_explore_is_deterministic(router, tmp_path):
    with FakeOpenAIServer() as fake:
        srv = start_proxy(router, ProxyConfig(upstreams={"small": fake.url, "big": fake.url},
                                              decision_log=str(tmp_path / "d.jsonl")))
        try:
            for t in synthetic_queries(10, seed=1)[0]:
                assert post(srv, {"model": "router", "messages": [{"role": "user", "content": t}]})[0] == 200
        finally:
            srv.drain(5)
    recs = list(read_records(tmp_path / "d.jsonl"))
    assert all(r["propensity"] == 1.0 and r["explored"] is False and r["explore"] == 0.0 for r in recs)
    with pytest.raises(ValueError, match="explore"):
        start_proxy(router, ProxyConfig(upstreams={"small": "http://x/v1", "big": "http://x/v1"}, explore=1.0,
                                        decision_log=None))
