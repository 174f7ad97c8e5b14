"""Off-policy estimators of routing policies on logged traffic (IPS, SNIPS, doubly robust), used
by the ``ope`` stage and by the promotion gate inside ``export``. The method, the policies and
the choice of no library: ``pipelines/ope.py``'s docstring and the README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

ESTIMATORS = ("ips", "snips", "dr")


# ---------------------------------------------------------------- the estimators (arrays)


def _values(r, a, pi0, target, q, idx, min_propensity):
    rows = np.arange(len(idx))
    r, a, pi0, target, q = r[idx], a[idx], pi0[idx], target[idx], q[idx]
    if min_propensity is not None:
        pi0 = np.maximum(pi0, min_propensity)
    w = target[rows, a] / pi0
    ips = float(np.mean(w * r))
    sw = float(np.sum(w))
    snips = float(np.sum(w * r) / sw) if sw > 0 else float("nan")
    dm = np.sum(target * q, axis=1)
    dr = float(np.mean(dm + w * (r - q[rows, a])))
    return ips, snips, dr, w


def estimate(reward, action, propensity, target, q, *, bootstrap: int = 1000, confidence: float = 0.95,
             seed: int = 0, min_propensity: float | None = None) -> dict[str, Any]:
    """IPS, SNIPS and DR estimates of a target policy's value with percentile bootstrap intervals.

    ``reward`` (n,), ``action`` (n,) logged tier indices, ``propensity`` (n,) the logging policy's
    probability of the logged action, ``target`` (n, K) the target policy's probabilities, ``q``
    (n, K) a reward model (DR's baseline; NaN where a tier was not admitted, which the target must
    give probability 0)."""
    r = np.asarray(reward, dtype=np.float64)
    a = np.asarray(action, dtype=np.int64)
    pi0 = np.asarray(propensity, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    q = np.nan_to_num(np.asarray(q, dtype=np.float64), nan=0.0)
    n = len(r)
    if n == 0:
        return {"rows": 0, **{e: None for e in ESTIMATORS}}
    if not (len(a) == len(pi0) == n == len(target) == len(q)):
        raise ValueError("reward, action, propensity, target and q need one row per logged request")
    if np.any(pi0 <= 0) or np.any(pi0 > 1):
        raise ValueError("propensities must be in (0, 1]")
    if not np.allclose(target.sum(axis=1), 1.0):
        raise ValueError("each row of target must be a probability distribution")
    everything = np.arange(n)
    ips, snips, dr, w = _values(r, a, pi0, target, q, everything, min_propensity)
    rng = np.random.default_rng(seed)
    boot = np.empty((bootstrap, 3))
    for b in range(bootstrap):
        boot[b, :3] = _values(r, a, pi0, target, q, rng.integers(0, n, n), min_propensity)[:3]
    lo, hi = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    out: dict[str, Any] = {"rows": n, "logged_mean": float(r.mean()),
                           "effective_sample_size": float(w.sum() ** 2 / np.sum(w ** 2)) if np.any(w) else 0.0,
                           "max_weight": float(w.max()), "agreement": float(np.mean(target[everything, a] > 0))}
    for j, (name, value) in enumerate(zip(ESTIMATORS, (ips, snips, dr))):
        col = boot[:, j][np.isfinite(boot[:, j])]
        out[name] = value
        out[f"{name}_ci"] = [float(np.quantile(col, lo)), float(np.quantile(col, hi))] if len(col) else None
        out[f"{name}_se"] = float(col.std(ddof=1)) if len(col) > 1 else None
    return out


# ---------------------------------------------------------------- from the feedback table


def greedy_probabilities(data: dict[str, Any], lam=None):
    """One-hot target of the bundle's rule ``argmax p - lam * c`` among each row's admitted tiers
    (``router.policy.choose_batch``) at ``lam`` (None: each row's logged lambda); a row the bundle
    answered by a fallback (no greedy tier logged) keeps its fallback tier."""
    from router.policy import choose_batch

    P, C = np.nan_to_num(data["P"], nan=0.0), np.nan_to_num(data["C"], nan=0.0)
    lam = data["rows"]["lambda"].to_numpy(dtype=np.float64)[:, None] if lam is None else float(lam)
    idx = choose_batch(P, C, lam, data["allowed"])
    idx = np.where(data["fallback"], data["action"], idx)
    out = np.zeros(P.shape)
    out[np.arange(len(P)), idx] = 1.0
    return out


def logged_arrays(df) -> dict[str, Any]:
    """The usable rows of a feedback table as arrays over the union of the logged tiers, and why
    the others were left out."""
    from router.policy import explore_probabilities

    # plain NumPy masks: an empty table read back from parquet has pyarrow/null column types
    excluded = {"no_outcome": int(df["correct"].isna().sum())}
    keep = df["correct"].notna().to_numpy(dtype=bool)
    fb = keep & (df["executed"] != df["chosen"]).fillna(True).to_numpy(dtype=bool)
    excluded["executed_other_tier"] = int(fb.sum())
    keep = keep & ~fb
    no_pred = keep & np.array([not json.loads(s) for s in df["allowed"]], dtype=bool)
    excluded["no_predictions"] = int(no_pred.sum())  # a fallback routed without a prediction
    keep = keep & ~no_pred
    rows = df[keep].reset_index(drop=True)
    allowed_lists = [json.loads(s) for s in rows["allowed"]]
    names: list[str] = []
    for lst in allowed_lists:
        for t in lst:
            if t["tier"] not in names:
                names.append(t["tier"])
    pos = {t: i for i, t in enumerate(names)}
    n, k = len(rows), len(names)
    P = np.full((n, k), np.nan)
    C = np.full((n, k), np.nan)
    for i, lst in enumerate(allowed_lists):
        for t in lst:
            P[i, pos[t["tier"]]] = t["p_correct"]
            C[i, pos[t["tier"]]] = t["cost"]
    allowed = ~np.isnan(P)
    chosen_ok = rows["chosen"].map(lambda t: t in pos).to_numpy(dtype=bool)
    if not chosen_ok.all():  # a fallback outside the admitted tiers (caps no tier met)
        excluded["chosen_not_admitted"] = int((~chosen_ok).sum())
        rows, P, C, allowed = rows[chosen_ok].reset_index(drop=True), P[chosen_ok], C[chosen_ok], allowed[chosen_ok]
    action = rows["chosen"].map(pos).to_numpy(dtype=np.int64)
    logging_probs = np.zeros(P.shape)
    fallback = np.zeros(len(rows), dtype=bool)
    for i, (g, eps) in enumerate(zip(rows["greedy"], rows["explore"])):
        if not isinstance(g, str) or g not in pos:  # a fallback decision: deterministic
            fallback[i] = True
            logging_probs[i, action[i]] = 1.0
        else:
            logging_probs[i] = explore_probabilities(pos[g], allowed[i], 0.0 if np.isnan(eps) else float(eps))
    return {"rows": rows, "tiers": names, "P": P, "C": C, "allowed": allowed, "action": action, "fallback": fallback,
            "propensity": rows["propensity"].to_numpy(dtype=np.float64), "logging_probs": logging_probs,
            "correct": rows["correct"].to_numpy(dtype=np.float64),
            "cost": rows["observed_cost"].to_numpy(dtype=np.float64), "excluded": excluded}


def candidate_probabilities(bundle: str | Path, data: dict[str, Any]):
    """A candidate bundle's one-hot choices on the logged text, among each row's admitted tiers."""
    from router.runtime import Router

    rows = data["rows"]
    if "text" not in rows or rows["text"].isna().any():
        raise ValueError("evaluating a candidate bundle needs the routed text in the log (proxy --log-text)")
    router = Router.load(bundle)
    names = data["tiers"]
    target = np.zeros(data["P"].shape)
    outside = 0
    for i, routed in enumerate(router.route_detailed(list(rows["text"]))):
        t = routed.decision.tier
        if t in names and data["allowed"][i, names.index(t)]:
            target[i, names.index(t)] = 1.0
        else:  # the logs cannot say what a tier never admitted there would do
            outside += 1
            target[i] = data["logging_probs"][i]
    return target, outside


def evaluate_policies(data: dict[str, Any], lambdas: Sequence[float] = (),
                      candidates: Mapping[str, str | Path] | None = None, bootstrap: int = 1000,
                      confidence: float = 0.95, seed: int = 0, min_propensity: float | None = None) -> dict[str, Any]:
    """Accuracy and cost of each policy: ``logged``, ``greedy``, ``lambda=X``, and each candidate
    bundle by its name (``<name>_rows_outside_logged_support`` counts where the logs cannot say)."""
    rows = data["rows"]
    targets: dict[str, Any] = {"logged": data["logging_probs"]}
    if len(rows):
        targets["greedy"] = greedy_probabilities(data)
        for x in lambdas:
            targets[f"lambda={x:g}"] = greedy_probabilities(data, x)
    notes = {}
    for name, bundle in (candidates or {}).items():
        if name in targets:
            raise ValueError(f"candidate name {name!r} is taken by a built-in policy ({sorted(targets)})")
        targets[name], notes[f"{name}_rows_outside_logged_support"] = candidate_probabilities(bundle, data)
    kw = dict(bootstrap=bootstrap, confidence=confidence, seed=seed, min_propensity=min_propensity)
    out = {}
    for name, target in targets.items():
        out[name] = {"accuracy": estimate(data["correct"], data["action"], data["propensity"], target, data["P"], **kw),
                     "cost": estimate(data["cost"], data["action"], data["propensity"], target, data["C"], **kw),
                     "tier_mix": {t: float(target[:, j].mean()) for j, t in enumerate(data["tiers"])} if len(rows)
                     else {}}
    return {"policies": out, **notes}
