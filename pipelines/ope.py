"""``python -m pipelines ope``: off-policy evaluation of routing policies on logged traffic.

    python -m pipelines ope [--feedback data/production/feedback.parquet] [--lambda 0.01 ...]
                            [--candidate models/candidate] [--out metrics/ope.json]

The proxy logged, per request, the tier it chose with that tier's probability under the logging
policy (``propensity``: epsilon-greedy, ``router.policy.explore_choice``), the tiers the caps
admitted with their predicted success and cost, and ``pipelines feedback`` joined the observed
``correct``. For a target policy pi (probabilities over tiers per request) and logged rows
(x_i, a_i, r_i, pi0_i = propensity), with weights w_i = pi(a_i | x_i) / pi0_i:

- **IPS** (inverse propensity): mean(w_i r_i). Unbiased when pi0 > 0 wherever pi > 0.
- **SNIPS** (self-normalised): sum(w_i r_i) / sum(w_i). Slightly biased, far less variance when
  weights are large.
- **DR** (doubly robust): mean(sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i))), with q the
  logging bundle's own predictions (``p_correct`` per admitted tier; ``cost`` for the cost value):
  unbiased if either the propensities or q are right, and with a useful q much less variance.

Each is computed for accuracy (r = correct) and for cost (r = observed cost), with percentile
bootstrap intervals over requests. Policies: ``logged`` (the logging policy itself: w = 1, a check
that the estimates equal the observed mean), ``greedy`` (the bundle's policy without exploration),
``lambda=X`` (the bundle's predictions at another price of cost), ``candidate`` (another bundle,
routed on the logged text: needs the proxy's ``--log-text``). Rows used: an outcome exists, the
chosen tier is the one executed (a fallback after an upstream failure is not the policy's action),
the propensity is positive; the report counts every excluded row by reason.

Library: no maintained OPE library fits. Open Bandit Pipeline (``obp``, the reference
implementation of these estimators) last released 0.5.7 in April 2023 and is not installed here;
SCOPE-RL (2023) targets sequential RL. The three estimators are a few lines of NumPy, tested
against a simulation with a known true value (``tests/pipelines/test_ope.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("ope", "feedback")
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

    excluded = {"no_outcome": int(df["correct"].isna().sum())}
    keep = df["correct"].notna()
    fb = keep & (df["executed"] != df["chosen"])
    excluded["executed_other_tier"] = int(fb.sum())
    keep &= ~fb
    no_pred = keep & df["allowed"].map(lambda s: not json.loads(s))
    excluded["no_predictions"] = int(no_pred.sum())  # a fallback routed without a prediction
    keep &= ~no_pred
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


def evaluate_policies(data: dict[str, Any], lambdas: Sequence[float] = (), candidate: str | None = None,
                      bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                      min_propensity: float | None = None) -> dict[str, Any]:
    """Accuracy and cost of each policy: ``logged``, ``greedy``, ``lambda=X``, ``candidate``."""
    rows = data["rows"]
    targets: dict[str, Any] = {"logged": data["logging_probs"]}
    if len(rows):
        targets["greedy"] = greedy_probabilities(data)
        for x in lambdas:
            targets[f"lambda={x:g}"] = greedy_probabilities(data, x)
    notes = {}
    if candidate is not None:
        targets["candidate"], notes["candidate_rows_outside_logged_support"] = candidate_probabilities(candidate, data)
    kw = dict(bootstrap=bootstrap, confidence=confidence, seed=seed, min_propensity=min_propensity)
    out = {}
    for name, target in targets.items():
        out[name] = {"accuracy": estimate(data["correct"], data["action"], data["propensity"], target, data["P"], **kw),
                     "cost": estimate(data["cost"], data["action"], data["propensity"], target, data["C"], **kw),
                     "tier_mix": {t: float(target[:, j].mean()) for j, t in enumerate(data["tiers"])} if len(rows)
                     else {}}
    return {"policies": out, **notes}


def ope(params: Params, run=NULL_RUN, feedback_path=None, lambdas=(), candidate=None, out=None) -> dict:
    cfg = params.ope
    path = Path(feedback_path or Path(params.feedback.out_dir) / "feedback.parquet")
    data = logged_arrays(artifacts.read_feedback(path))
    result = evaluate_policies(data, lambdas, candidate, cfg.bootstrap, cfg.confidence, cfg.seed, cfg.min_propensity)
    report = {"feedback": str(path), "rows": int(len(data["rows"])), "excluded": data["excluded"],
              "tiers": data["tiers"], "confidence": cfg.confidence, "bootstrap": cfg.bootstrap, **result}
    out = Path(out or cfg.out)
    artifacts.write_json(out, report)
    run.log_metrics({f"{p}.{m}.{e}": v[m][e] for p, v in result["policies"].items() for m in ("accuracy", "cost")
                     for e in ESTIMATORS if v[m].get(e) is not None})
    run.log_artifact(out)
    summary = {p: {m: v[m].get("dr") for m in ("accuracy", "cost")} for p, v in result["policies"].items()}
    return {"rows": report["rows"], "out": str(out), "dr": summary}


def _arguments(ap) -> None:
    ap.add_argument("--feedback", default=None, help="feedback table (default: <feedback.out_dir>/feedback.parquet)")
    ap.add_argument("--lambda", dest="lambdas", type=float, action="append", default=[],
                    help="also evaluate the logging bundle's predictions at this price of cost (repeat)")
    ap.add_argument("--candidate", default=None, help="a candidate bundle, routed on the logged text")
    ap.add_argument("--out", default=None, help="report JSON (default: ope.out)")


def main(argv=None) -> dict:
    description = "ope: off-policy evaluation (IPS, SNIPS, DR) of routing policies on logged traffic"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("ope", lambda params, run: ope(params, run, args.feedback, args.lambdas, args.candidate, args.out),
                     description=description, sections=SECTIONS, args=args, summary=("rows", "out", "dr"))


if __name__ == "__main__":
    main()
