"""Accuracy/cost curves and the routing metrics of RouteLLM and RouterBench.

Every curve is measured with *realized* outcomes (the labels' p_correct and cost) of the
tiers a policy chose, never with the policy's own predictions. Mixing two operating points
at random is always possible, so curves are compared through their upper concave envelope
(the "hull"), as RouteLLM and RouterBench do.

Normalized cost ``x = (cost - c_weak) / (c_strong - c_weak)`` runs from the cheapest tier
(weak) to the most accurate tier (strong); PGR is ``(acc - acc_weak) / (acc_strong - acc_weak)``.
APGR is the mean PGR over x in [0, 1]; CPT(p) the smallest x whose PGR reaches p; AIQ the mean
hull accuracy over the fixed tiers' cost range. A router's curve includes both end points (all
queries to the cheapest tier, all to the most accurate), as a RouteLLM router's threshold sweep
does, so it never lies below the straight line between them: APGR 0.5 is "no better than random".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from router.policy import choose_batch


def lambda_grid(C: np.ndarray, n: int = 60) -> np.ndarray:
    """Lambdas from 0 (most accurate) to a price that makes every query go cheapest."""
    spread = float(np.ptp(C)) or 1.0
    return np.concatenate([[0.0], np.geomspace(1e-4 / spread, 1e3 / spread, n - 1)])


def sweep(P: np.ndarray, Cp: np.ndarray, Y: np.ndarray, Cost: np.ndarray, lams) -> np.ndarray:
    """Per lambda: the chosen tier of every query. Returns (lambdas, queries) indexes."""
    return np.stack([choose_batch(P, Cp, lam) for lam in lams])


def realized(choice: np.ndarray, Y: np.ndarray, Cost: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean realized accuracy and cost of each lambda's choices (over ``rows`` if given)."""
    r = np.arange(Y.shape[0]) if rows is None else np.asarray(rows)
    ch = choice[:, r]
    return Y[r[None, :], ch].mean(axis=1), Cost[r[None, :], ch].mean(axis=1)


def curve(P: np.ndarray, Cp: np.ndarray, Y: np.ndarray, Cost: np.ndarray, lams=None):
    """The policy's lambda sweep: (choices per lambda, realized accuracy, realized cost)."""
    lams = lambda_grid(Cp, 120) if lams is None else lams
    choice = sweep(P, Cp, Y, Cost, lams)
    return (choice, *realized(choice, Y, Cost))


def upper_hull(cost: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper concave, non-decreasing envelope of points (cost, acc): what random
    mixtures of the operating points can reach."""
    pts = sorted(set(zip(np.asarray(cost, float).tolist(), np.asarray(acc, float).tolist())))
    # best accuracy at each cost, non-decreasing in cost
    frontier: list[tuple[float, float]] = []
    for c, a in pts:
        if frontier and a <= frontier[-1][1]:
            continue
        while frontier and frontier[-1][0] == c:
            frontier.pop()
        frontier.append((c, a))
    hull: list[tuple[float, float]] = []
    for p in frontier:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    h = np.asarray(hull)
    return h[:, 0], h[:, 1]


def acc_at_cost(hc: np.ndarray, ha: np.ndarray, c):
    """Hull accuracy reachable with mean cost <= c (nan below the cheapest point); ``c`` may be
    an array."""
    out = np.where(np.asarray(c) < hc[0] - 1e-12, np.nan, np.interp(c, hc, ha))
    return float(out) if np.ndim(out) == 0 else out


def cost_for_acc(hc: np.ndarray, ha: np.ndarray, a: float) -> float:
    """Smallest mean cost on the hull whose accuracy reaches ``a`` (inf if none does)."""
    if a > ha[-1] + 1e-12:
        return float("inf")
    if a <= ha[0]:
        return float(hc[0])
    return float(np.interp(a, ha, hc))


def fixed_tiers(Y: np.ndarray, Cost: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(Y.shape[0]) if rows is None else rows
    return Y[r].mean(axis=0), Cost[r].mean(axis=0)


def oracle(Y: np.ndarray, Cost: np.ndarray, rows=None) -> tuple[float, float]:
    """Per query the cheapest tier with the highest realized p_correct."""
    r = np.arange(Y.shape[0]) if rows is None else rows
    y, c = Y[r], Cost[r]
    best = y.max(axis=1, keepdims=True)
    cm = np.where(y >= best - 1e-12, c, np.inf)
    idx = cm.argmin(axis=1)
    i = np.arange(len(r))
    return float(y[i, idx].mean()), float(c[i, idx].mean())


def headline(acc: np.ndarray, cost: np.ndarray, Y: np.ndarray, Cost: np.ndarray, rows=None,
             point: tuple[float, float] | None = None) -> dict[str, Any]:
    """Router-vs-fixed metrics from a router curve ``(acc, cost)`` and the outcome tables."""
    fa, fc = fixed_tiers(Y, Cost, rows)
    order = np.lexsort((fc, -fa))  # most accurate first, cheaper first among equals
    best = int(order[0])
    weak = int(np.lexsort((-fa, fc))[0])  # cheapest tier (the more accurate among equals)
    # the curve spans the cheapest and the most accurate tier, as a RouteLLM router's threshold
    # sweep does: sending everything to either is always possible
    hc, ha = upper_hull(np.concatenate([cost, [fc[weak], fc[best]]]), np.concatenate([acc, [fa[weak], fa[best]]]))
    out: dict[str, Any] = {
        "best_fixed_tier_index": best,
        "best_fixed_accuracy": float(fa[best]),
        "best_fixed_mean_cost": float(fc[best]),
    }
    need = cost_for_acc(hc, ha, float(fa[best]))
    out["compute_saved_at_iso_accuracy"] = float(1.0 - need / fc[best]) if np.isfinite(need) and fc[best] > 0 else None
    out["accuracy_gain_at_iso_cost"] = float(acc_at_cost(hc, ha, float(fc[best])) - fa[best])
    a_w, a_s, c_w, c_s = float(fa[weak]), float(fa[best]), float(fc[weak]), float(fc[best])
    xs = np.linspace(0.0, 1.0, 201)
    if a_s - a_w > 1e-12 and c_s - c_w > 1e-12:
        pgr = (acc_at_cost(hc, ha, c_w + xs * (c_s - c_w)) - a_w) / (a_s - a_w)
        pgr = np.nan_to_num(pgr, nan=0.0)
        out["apgr"] = float(np.trapezoid(pgr, xs))
        for p, key in ((0.5, "cpt50"), (0.8, "cpt80")):
            hit = np.nonzero(pgr >= p - 1e-12)[0]
            out[key] = float(xs[hit[0]]) if len(hit) else None
    else:  # the cheapest tier is already the most accurate: nothing to recover
        out.update(apgr=None, cpt50=None, cpt80=None)
    lo, hi = float(fc.min()), float(fc.max())
    if hi - lo > 1e-12:
        cs = np.linspace(lo, hi, 201)
        qa = acc_at_cost(hc, ha, cs)
        out["aiq"] = float(np.trapezoid(np.nan_to_num(qa, nan=float(ha[0])), cs) / (hi - lo))
    else:
        out["aiq"] = None
    if point is not None:
        out["router_accuracy"], out["router_mean_cost"] = float(point[0]), float(point[1])
    oa, oc = oracle(Y, Cost, rows)
    out["oracle_accuracy"], out["oracle_mean_cost"] = oa, oc
    return out


def calibration(P: np.ndarray, Y: np.ndarray, bins: int) -> tuple[float, float, list[dict]]:
    """ECE (equal-width bins, weighted by count) and Brier over all (query, tier) pairs."""
    p, y = P.reshape(-1), Y.reshape(-1)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        rows.append({"bin": b, "predicted": round(conf, 4), "observed": round(acc, 4), "count": int(m.sum())})
    return float(ece), float(((p - y) ** 2).mean()), rows
