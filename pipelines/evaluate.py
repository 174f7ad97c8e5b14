"""The evaluate stage: the routing policy against every fixed tier, their random mixtures
and the per-query oracle, on the test split (read here and nowhere else).

The operating point (``lambda``) is solved on the validation split, then applied unchanged
to test. Headline figures carry bootstrap 95% intervals over test queries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.config import Params, PolicyConfig
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("label", "featurize", "train", "policy", "evaluate")

HEADLINE = ("router_accuracy", "router_mean_cost", "compute_saved_at_iso_accuracy", "accuracy_gain_at_iso_cost",
            "apgr", "cpt50", "cpt80", "aiq", "best_fixed_accuracy", "best_fixed_mean_cost", "oracle_accuracy",
            "oracle_mean_cost")


def solve_operating_point(P, Cp, Y, Cost, cfg: PolicyConfig) -> tuple[float, dict[str, Any]]:
    """Lambda on validation rows: fixed, or the cheapest reaching the target."""
    from router.policy import solve_lambda

    if cfg.lam is not None:
        return float(cfg.lam), {"how": "fixed"}
    if cfg.target == "cost":
        if cfg.target_value is None:
            raise ValueError("policy.target cost needs policy.target_value")
        return solve_lambda(P, Cp, target_cost=cfg.target_value, Y=Cost), {"how": "target_cost",
                                                                           "value": cfg.target_value}
    if cfg.target == "accuracy":
        if cfg.target_value is None:
            raise ValueError("policy.target accuracy needs policy.target_value")
        goal = cfg.target_value
    else:
        goal = float(Y.mean(axis=0).max()) + cfg.accuracy_margin
    return solve_lambda(P, Cp, target_accuracy=goal, Y=Y), {"how": "target_accuracy", "value": goal}


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


def bootstrap(choice, lam_index, Y, Cost, n: int, seed: int) -> dict[str, list[float]]:
    """95% intervals of the headline metrics by resampling test queries."""
    from pipelines.routing_metrics import headline, realized

    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in HEADLINE}
    q = Y.shape[0]
    for _ in range(n):
        rows = rng.integers(0, q, q)
        acc, cost = realized(choice, Y, Cost, rows)
        h = headline(acc, cost, Y, Cost, rows, point=(acc[lam_index], cost[lam_index]))
        for k in HEADLINE:
            if h.get(k) is not None:
                draws[k].append(h[k])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= n // 2 else None
            for k, v in draws.items()}


def evaluate(params: Params, run=NULL_RUN) -> dict[str, Any]:
    import pandas as pd

    from pipelines.routing_metrics import fixed_tiers, headline, lambda_grid, oracle, realized, sweep, upper_hull

    pcfg, ecfg = params.policy, params.evaluate
    success, cost_model, meta = artifacts.load_model(params.train.out_dir)
    val = artifacts.load_dataset(params.label, params.featurize, splits=("val",))
    test = artifacts.load_dataset(params.label, params.featurize, splits=("test",))
    names = [t["name"] for t in test.tiers]
    if [t["name"] for t in meta["tiers"]] != names:
        raise ValueError("the trained model's tiers differ from the labels' tiers; rerun train")

    run.log_params({"test_queries": len(test.query_ids)})
    Pv, Cv = success.predict(val.X), cost_model.predict(val.X)
    lam, how = solve_operating_point(Pv, Cv, val.Y, val.Cost, pcfg)
    P, Cp = success.predict(test.X), cost_model.predict(test.X)
    lams = np.unique(np.concatenate([lambda_grid(Cp, 80), [lam]]))
    li = int(np.nonzero(lams == lam)[0][0])
    choice = sweep(P, Cp, test.Y, test.Cost, lams)
    acc, cost = realized(choice, test.Y, test.Cost)
    h = headline(acc, cost, test.Y, test.Cost, point=(acc[li], cost[li]))
    fa, fc = fixed_tiers(test.Y, test.Cost)
    ece, brier, cal_rows = calibration(P, test.Y, ecfg.calibration_bins)
    cis = bootstrap(choice, li, test.Y, test.Cost, ecfg.bootstrap, ecfg.seed)
    mix = np.bincount(choice[li], minlength=len(names)) / len(test.query_ids)
    metrics: dict[str, Any] = {
        "router_accuracy": h["router_accuracy"],
        "router_mean_cost": h["router_mean_cost"],
        "best_fixed_tier": names[h["best_fixed_tier_index"]],
        "best_fixed_accuracy": h["best_fixed_accuracy"],
        "best_fixed_mean_cost": h["best_fixed_mean_cost"],
        "compute_saved_at_iso_accuracy": h["compute_saved_at_iso_accuracy"],
        "accuracy_gain_at_iso_cost": h["accuracy_gain_at_iso_cost"],
        "apgr": h["apgr"], "cpt50": h["cpt50"], "cpt80": h["cpt80"], "aiq": h["aiq"],
        "oracle_accuracy": h["oracle_accuracy"], "oracle_mean_cost": h["oracle_mean_cost"],
        "ece": ece, "brier": brier,
        # the exported point itself against the best fixed tier
        "operating_point_cost_saved": float(1 - h["router_mean_cost"] / h["best_fixed_mean_cost"])
        if h["best_fixed_mean_cost"] > 0 else None,
        "operating_point_accuracy_delta": float(h["router_accuracy"] - h["best_fixed_accuracy"]),
        "lambda": lam, "lambda_solved_by": how, "test_queries": len(test.query_ids),
        "fixed_tiers": {n: {"accuracy": float(a), "mean_cost": float(c)} for n, a, c in zip(names, fa, fc)},
        "tier_mix": {n: float(m) for n, m in zip(names, mix) if m > 0},
    }
    # paired interval of the operating point's savings and accuracy delta
    rng = np.random.default_rng(ecfg.seed + 1)
    best = h["best_fixed_tier_index"]
    rr = np.arange(len(test.query_ids))
    ch = choice[li]
    sav, dacc = [], []
    for _ in range(ecfg.bootstrap):
        r = rng.integers(0, len(rr), len(rr))
        bc = test.Cost[r, best].mean()
        sav.append(1 - test.Cost[r, ch[r]].mean() / bc if bc > 0 else np.nan)
        dacc.append(test.Y[r, ch[r]].mean() - test.Y[r, best].mean())
    cis["operating_point_cost_saved"] = [float(np.nanpercentile(sav, 2.5)), float(np.nanpercentile(sav, 97.5))]
    cis["operating_point_accuracy_delta"] = [float(np.percentile(dacc, 2.5)), float(np.percentile(dacc, 97.5))]
    for k, v in cis.items():
        metrics[f"{k}_ci"] = v
    artifacts.write_json(ecfg.metrics, metrics)

    plots = Path(ecfg.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    hc, ha = upper_hull(fc, fa)
    oa, oc = oracle(test.Y, test.Cost)
    pd.DataFrame({"cost": cost, "accuracy": acc, "lambda": lams}).sort_values("cost").to_csv(
        plots / "router_curve.csv", index=False)
    pd.DataFrame({"tier": names, "cost": fc, "accuracy": fa}).to_csv(plots / "fixed_tiers.csv", index=False)
    pd.DataFrame({"cost": hc, "accuracy": ha}).to_csv(plots / "fixed_hull.csv", index=False)
    pd.DataFrame(cal_rows).to_csv(plots / "calibration.csv", index=False)
    pd.DataFrame({"tier": names, "share": mix}).to_csv(plots / "tier_mix.csv", index=False)
    write_plots(plots, names, acc, cost, fa, fc, hc, ha, (oc, oa), (h["router_mean_cost"], h["router_accuracy"]),
                cal_rows, mix)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_artifact(ecfg.metrics)
    run.log_artifact(plots, "plots")
    return metrics


def write_plots(d: Path, names, acc, cost, fa, fc, hc, ha, oracle_pt, op, cal_rows, mix) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    o = np.argsort(cost)
    ax.plot(np.asarray(cost)[o], np.asarray(acc)[o], "-", color="C0", label="router (lambda sweep)")
    ax.scatter(fc, fa, color="C1", zorder=3, label="fixed tiers")
    for n, x, y in zip(names, fc, fa):
        ax.annotate(n, (x, y), fontsize=6, alpha=0.7)
    ax.plot(hc, ha, "--", color="C1", alpha=0.6, label="random mixtures of fixed tiers")
    ax.scatter([oracle_pt[0]], [oracle_pt[1]], marker="*", s=150, color="C2", zorder=4, label="oracle")
    ax.scatter([op[0]], [op[1]], marker="D", s=60, color="C3", zorder=5, label="exported operating point")
    ax.set_xscale("symlog")
    ax.set_xlabel("mean cost per query (tokens x price)")
    ax.set_ylabel("accuracy (test split)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "pareto.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    if cal_rows:
        ax.plot([r["predicted"] for r in cal_rows], [r["observed"] for r in cal_rows], "o-", label="model")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
    ax.set_xlabel("predicted p_correct")
    ax.set_ylabel("observed p_correct")
    ax.legend()
    fig.tight_layout()
    fig.savefig(d / "calibration.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), mix)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.set_ylabel("share of test queries")
    ax.set_title("tier mix at the exported operating point")
    fig.tight_layout()
    fig.savefig(d / "tier_mix.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return run_stage("evaluate", evaluate, argv, sections=SECTIONS,
                     description="evaluate: router vs every fixed tier and the oracle on the test split",
                     summary=("router_accuracy", "router_mean_cost", "best_fixed_tier", "best_fixed_accuracy",
                              "best_fixed_mean_cost", "compute_saved_at_iso_accuracy", "apgr"))


if __name__ == "__main__":
    main()
