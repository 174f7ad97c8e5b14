"""The evaluate stage: the routing policy against the baselines a reviewer asks for, every fixed
tier, their random mixtures and the per-query oracle, always out of sample.

Two modes (``pipelines.learn.evaluation_folds`` says which, README "How the router is
evaluated"): **cross-fitting** (``evaluate.cv_folds`` K >= 2): the labelled queries are dealt
into K folds by query; for each fold the whole fitting procedure (``learn.fit_router``: model
selection, calibration and lambda by inner cross-validation) runs on the other folds and
predicts this one, so every query is predicted once, by a router that never saw it; the
baselines are fitted on the same folds. **Holdout** (K = 0): the bundle's router (fitted by
the train stage on train + val) and the baselines (fitted on the same rows) predict the test
split. Headline figures carry bootstrap 95% intervals over the evaluated queries; differences
to the baselines are paired (the same resampled queries for both).

With a groups file (``evaluate.groups``, or ``<outcome table>.groups.csv`` beside the table)
the same figures are also computed *within* groups: each group's curve between its own cheapest
and most accurate tier, averaged with group sizes as weights. Groups are never features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts, learn
from pipelines.config import Params
from pipelines.routing_metrics import calibration
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("seed", "data", "label", "featurize", "train", "policy", "evaluate")

HEADLINE = ("router_accuracy", "router_mean_cost", "compute_saved_at_iso_accuracy", "accuracy_gain_at_iso_cost",
            "apgr", "cpt50", "cpt80", "aiq", "best_fixed_accuracy", "best_fixed_mean_cost", "oracle_accuracy",
            "oracle_mean_cost")
BASELINE_KEYS = ("apgr", "compute_saved_at_iso_accuracy", "aiq", "cpt50", "cpt80")


# ---------------------------------------------------------------- predictions out of sample


def crossfit(ds, folds: int, params: Params) -> dict[str, Any]:
    """Every query predicted once by the router and each baseline, fitted on the other folds."""
    cfg, ecfg = params.train, params.evaluate
    n = len(ds.query_ids)
    fold = learn.fold_ids(n, folds, ecfg.seed)
    P, Cp, op = np.empty_like(ds.Y), np.empty_like(ds.Cost), np.empty(n, dtype=np.int64)
    lam = np.empty(n)  # each query's operating point: its fold's lambda
    base = {b: (np.empty_like(ds.Y), np.empty_like(ds.Cost)) for b in baselines(params, ds)}
    records = []
    from router.policy import choose_batch

    for f in range(folds):
        fit_rows, held = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        r = learn.fit_router(ds, fit_rows, cfg, params.policy)
        P[held], Cp[held] = r.success.predict(ds.X[held]), np.maximum(r.cost.predict(ds.X[held]), 0.0)
        op[held] = choose_batch(P[held], Cp[held], r.lam)
        lam[held] = r.lam
        records.append({"fold": f, "fit_queries": int(len(fit_rows)), "evaluated_queries": int(len(held)),
                        "chosen": r.chosen, "cost_model": r.cost_model, "calibrated": r.calibrated,
                        "lambda": r.lam, "cv_apgr": r.report["cv_apgr"]})
        log.info("fold %d/%d: %s", f + 1, folds, records[-1])
        with learn.threads(cfg.threads):
            for b, (bp, bc) in base.items():
                s, c = learn.fit_baseline(b, ds, fit_rows, cfg)
                bp[held], bc[held] = s.predict(ds.X[held]), c.predict(ds.X[held])
    return {"rows": np.arange(n), "P": P, "Cp": Cp, "op": op, "lam": lam, "baselines": base, "folds": records}


def holdout(ds, params: Params) -> dict[str, Any]:
    """The bundle's router and the baselines (fitted on train + val) on the test split."""
    from router.policy import choose_batch

    success, cost_model, meta = artifacts.load_model(params.train.out_dir)
    if meta.get("evaluation_folds"):
        raise ValueError("the trained model was fitted on every query for cross-fitted evaluation; rerun train "
                         "(evaluate.cv_folds changed?)")
    fit_rows, test = np.nonzero(ds.split != "test")[0], np.nonzero(ds.split == "test")[0]
    P, Cp = success.predict(ds.X[test]), np.maximum(cost_model.predict(ds.X[test]), 0.0)
    base = {}
    with learn.threads(params.train.threads):
        for b in baselines(params, ds):
            s, c = learn.fit_baseline(b, ds, fit_rows, params.train)
            base[b] = (s.predict(ds.X[test]), c.predict(ds.X[test]))
    return {"rows": test, "P": P, "Cp": Cp, "op": choose_batch(P, Cp, float(meta["lambda"])),
            "lam": np.full(len(test), float(meta["lambda"])), "baselines": base,
            "folds": [{"fold": "holdout", "fit_queries": int(len(fit_rows)), "evaluated_queries": int(len(test)),
                       "chosen": meta["chosen"], "cost_model": meta["cost_model"], "calibrated": meta["calibrated"],
                       "lambda": float(meta["lambda"])}]}


def baselines(params: Params, ds) -> list[str]:
    return [b for b in params.evaluate.baselines if learn.usable(b, ds)]


# ---------------------------------------------------------------- figures


def groups_of(params: Params, query_ids: list[str]) -> tuple[np.ndarray | None, str | None]:
    """Each query's group from ``evaluate.groups`` or ``<table>.groups.csv`` (None without one)."""
    import pandas as pd

    path = params.evaluate.groups
    if path is None and params.data.outcomes:
        p = Path(params.data.outcomes)
        guess = p.with_name(p.name.split(".")[0] + ".groups.csv")
        path = str(guess) if guess.exists() else None
    if path is None:
        return None, None
    df = pd.read_csv(path, dtype=str)
    if not {"query_id", "group"} <= set(df.columns):
        raise ValueError(f"{path}: a groups file needs columns query_id, group; has {list(df.columns)}")
    g = df.drop_duplicates("query_id").set_index("query_id")["group"]
    out = g.reindex(query_ids).to_numpy(dtype=object)
    missing = int(sum(x is None or (isinstance(x, float) and np.isnan(x)) for x in out))
    if missing:
        log.warning("%s: %d evaluated queries have no group; they form the group '(none)'", path, missing)
        out = np.array(["(none)" if not isinstance(x, str) else x for x in out], dtype=object)
    return out, path


def within_groups(choice: np.ndarray, Y: np.ndarray, Cost: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """APGR, compute saved and AIQ per group (each between its own cheapest and best tier), and
    their means weighted by group size over the groups where a costlier tier beats the cheapest."""
    from pipelines.routing_metrics import headline, realized

    per, w = {}, []
    for g in sorted(set(groups)):
        r = np.nonzero(groups == g)[0]
        h = headline(*realized(choice, Y, Cost, r), Y, Cost, r)
        per[g] = {"queries": int(len(r)), **{k: h[k] for k in BASELINE_KEYS}}
    out: dict[str, Any] = {"groups": len(per)}
    for k in ("apgr", "compute_saved_at_iso_accuracy", "aiq"):
        have = [(v[k], v["queries"]) for v in per.values() if v[k] is not None]
        out[k] = float(np.average([a for a, _ in have], weights=[n for _, n in have])) if have else None
    have = [v["queries"] for v in per.values() if v["apgr"] is not None]
    out["queries_in_scored_groups"] = int(sum(have))
    out["per_group"] = per
    return out


def adaptive_vs_static(P, Cp, Y, Cost, Lat, lam, adaptive: np.ndarray, choice: np.ndarray, n_boot: int,
                       seed: int) -> dict[str, Any] | None:
    """What adaptive tiers buy over the same router restricted to static tiers.

    The static-only router is the router's own out-of-sample predictions with the adaptive columns
    removed, at each query's own operating point (its fold's lambda). ``compute_saved``: 1 - the
    mean cost the full router's curve (``choice``: its lambda sweep, as a hull) needs to reach the
    static-only router's accuracy / the static-only router's mean cost; ``latency_saved`` the
    same in latency tokens along the same curve (negative: adaptive tiers cost wall time). 95%
    intervals by resampling queries. None when the grid has no adaptive or no static tier.
    """
    from pipelines.routing_metrics import cost_for_acc, upper_hull
    from router.policy import choose_batch

    static = np.nonzero(~adaptive)[0]
    if not adaptive.any() or not len(static):
        return None
    q = np.arange(Y.shape[0])
    op_s = np.empty(len(q), dtype=np.int64)
    for v in np.unique(lam):
        m = lam == v
        op_s[m] = static[choose_batch(P[m][:, static], Cp[m][:, static], float(v))]

    def saved(rows, M):
        a_s, m_s = Y[rows, op_s[rows]].mean(), M[rows, op_s[rows]].mean()
        ch = choice[:, rows]
        acc, spend = Y[rows[None, :], ch].mean(axis=1), M[rows[None, :], ch].mean(axis=1)
        hc, ha = upper_hull(spend, acc)
        need = cost_for_acc(hc, ha, float(a_s))
        ok = np.isfinite(need) and m_s > 0
        return float(a_s), float(m_s), (float(1 - need / m_s) if ok else None), (float(need) if ok else None)

    a_s, c_s, cs, c_need = saved(q, Cost)
    out: dict[str, Any] = {"static_router_accuracy": a_s, "static_router_mean_cost": c_s,
                           "adaptive_router_cost_at_that_accuracy": c_need, "adaptive_compute_saved_vs_static": cs}
    if Lat is not None:
        _, l_s, ls, l_need = saved(q, Lat)
        out.update(static_router_mean_latency_tokens=l_s, adaptive_router_latency_tokens_at_that_accuracy=l_need,
                   adaptive_latency_saved_vs_static=ls)
    rng = np.random.default_rng(seed + 1)
    draws: dict[str, list[float]] = {"adaptive_compute_saved_vs_static": [], "adaptive_latency_saved_vs_static": []}
    for _ in range(n_boot):
        r = rng.integers(0, len(q), len(q))
        v = saved(r, Cost)[2]
        if v is not None:
            draws["adaptive_compute_saved_vs_static"].append(v)
        if Lat is not None and (v := saved(r, Lat)[2]) is not None:
            draws["adaptive_latency_saved_vs_static"].append(v)
    for k, v in draws.items():
        if k in out:
            out[f"{k}_ci"] = ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                              if len(v) >= n_boot // 2 else None)
    return out


def fixed_choices(k: int, n: int) -> np.ndarray:
    """The 'random' baseline as a curve: every fixed tier (mixtures of them are its hull)."""
    return np.repeat(np.arange(k)[:, None], n, axis=1)


def bootstrap(curves: dict[str, np.ndarray], op: np.ndarray, Y, Cost, n: int, seed: int) -> dict[str, Any]:
    """95% intervals by resampling queries: the router's headline figures, the operating point
    against the best fixed tier, and paired differences of APGR and compute saved between the
    router and every baseline (the same resampled queries for both)."""
    from pipelines.routing_metrics import headline, realized

    rng = np.random.default_rng(seed)
    q = Y.shape[0]
    draws: dict[str, list[float]] = {k: [] for k in HEADLINE}
    draws.update(operating_point_cost_saved=[], operating_point_accuracy_delta=[])
    diffs = {b: {"apgr": [], "compute_saved_at_iso_accuracy": []} for b in curves if b != "router"}
    base_draws = {b: {"apgr": [], "compute_saved_at_iso_accuracy": []} for b in curves if b != "router"}
    for _ in range(n):
        r = rng.integers(0, q, q)
        point = (float(Y[r, op[r]].mean()), float(Cost[r, op[r]].mean()))
        h = headline(*realized(curves["router"], Y, Cost, r), Y, Cost, r, point=point)
        for k in HEADLINE:
            if h.get(k) is not None:
                draws[k].append(h[k])
        best = h["best_fixed_tier_index"]
        bc = Cost[r, best].mean()
        if bc > 0:
            draws["operating_point_cost_saved"].append(1 - point[1] / bc)
        draws["operating_point_accuracy_delta"].append(point[0] - Y[r, best].mean())
        for b in diffs:
            hb = headline(*realized(curves[b], Y, Cost, r), Y, Cost, r)
            for k in diffs[b]:
                if hb[k] is not None:
                    base_draws[b][k].append(hb[k])
                # a router that cannot reach the best fixed tier's accuracy saves nothing
                if h[k] is not None or hb[k] is not None:
                    diffs[b][k].append((h[k] or 0.0) - (hb[k] or 0.0))

    def ci(v):
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= n // 2 else None

    return {"router": {k: ci(v) for k, v in draws.items()},
            "diffs": {b: {k: ci(v) for k, v in d.items()} for b, d in diffs.items()},
            "baselines": {b: {k: ci(v) for k, v in d.items()} for b, d in base_draws.items()}}


def evaluate(params: Params, run=NULL_RUN) -> dict[str, Any]:
    import pandas as pd

    from pipelines.routing_metrics import (curve, fixed_tiers, headline, lambda_grid, oracle, realized, sweep,
                                           upper_hull)

    ecfg = params.evaluate
    summary = artifacts.outcome_summary(params.label.out)
    folds, why = learn.evaluation_folds(summary, ecfg)
    ds = artifacts.load_dataset(params.label, params.featurize, splits=("train", "val", "test"))
    names = [t["name"] for t in ds.tiers]
    _, _, meta = artifacts.load_model(params.train.out_dir)
    if [t["name"] for t in meta["tiers"]] != names:
        raise ValueError("the trained model's tiers differ from the labels' tiers; rerun train")
    learn.check_table(ds, np.arange(len(ds.query_ids)), "evaluated queries")
    pred = crossfit(ds, folds, params) if folds else holdout(ds, params)
    rows = pred["rows"]
    Y, Cost, P, Cp = ds.Y[rows], ds.Cost[rows], pred["P"], pred["Cp"]
    run.log_params({"evaluated_queries": len(rows), "cv_folds": folds})

    lams = lambda_grid(Cp, 120)
    choice, acc, cost = curve(P, Cp, Y, Cost, lams)
    op = pred["op"]
    point = (float(Y[np.arange(len(rows)), op].mean()), float(Cost[np.arange(len(rows)), op].mean()))
    h = headline(acc, cost, Y, Cost, point=point)
    curves = {"router": choice, "random": fixed_choices(len(names), len(rows))}
    base_metrics: dict[str, Any] = {}
    for b, (bp, bc) in pred["baselines"].items():
        curves[b] = curve(bp, bc, Y, Cost)[0]
        hb = headline(*realized(curves[b], Y, Cost), Y, Cost)
        base_metrics[b] = {k: hb[k] for k in BASELINE_KEYS}
        # the same success model priced by the router's per-query cost predictions: separates
        # what the router's success model adds from what its cost model adds
        hc = headline(*curve(bp, Cp, Y, Cost)[1:], Y, Cost)
        base_metrics[b]["apgr_with_router_cost"] = hc["apgr"]
    hr = headline(*realized(curves["random"], Y, Cost), Y, Cost)
    base_metrics["random"] = {k: hr[k] for k in BASELINE_KEYS}
    boot = bootstrap(curves, op, Y, Cost, ecfg.bootstrap, ecfg.seed)
    for b, m in base_metrics.items():
        m["router_minus"] = {k: (None if h[k] is None and m[k] is None else (h[k] or 0.0) - (m[k] or 0.0))
                             for k in ("apgr", "compute_saved_at_iso_accuracy")}
        m["router_minus_ci"] = boot["diffs"][b]
        m["ci"] = boot["baselines"][b]
    fa, fc = fixed_tiers(Y, Cost)
    ece, brier, cal_rows = calibration(P, Y, ecfg.calibration_bins)
    mix = np.bincount(op, minlength=len(names)) / len(rows)
    lam = float(meta["lambda"])
    metrics: dict[str, Any] = {
        "evaluated_queries": int(len(rows)),
        "cv_folds": int(folds),
        "evaluation": why,
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
        # the operating point itself (each fold's own lambda on its own queries) against the best fixed tier
        "operating_point_cost_saved": float(1 - h["router_mean_cost"] / h["best_fixed_mean_cost"])
        if h["best_fixed_mean_cost"] > 0 else None,
        "operating_point_accuracy_delta": float(h["router_accuracy"] - h["best_fixed_accuracy"]),
        # the bundle's operating point (fitted on every query in cross-fitting mode)
        "lambda": lam, "lambda_solved_by": meta.get("lambda_solved_by"),
        "baselines": base_metrics,
        "apgr_vs_logreg": base_metrics["logreg"]["router_minus"]["apgr"] if "logreg" in base_metrics else None,
        "apgr_vs_logreg_ci": base_metrics["logreg"]["router_minus_ci"]["apgr"] if "logreg" in base_metrics else None,
        "folds": pred["folds"],
        "fixed_tiers": {n: {"accuracy": float(a), "mean_cost": float(c)} for n, a, c in zip(names, fa, fc)},
        "tier_mix": {n: float(m) for n, m in zip(names, mix) if m > 0},
    }
    if not folds:
        metrics["test_queries"] = int(len(rows))
    for k, v in boot["router"].items():
        metrics[f"{k}_ci"] = v
    adaptive = np.array([t.get("kind", "static") != "static" for t in ds.tiers])
    lat = ds.Latency[rows] if ds.Latency is not None else None
    avs = adaptive_vs_static(P, Cp, Y, Cost, lat, pred["lam"], adaptive, choice, ecfg.bootstrap, ecfg.seed)
    if avs is not None:
        metrics.update(avs)
    groups, gpath = groups_of(params, [ds.query_ids[i] for i in rows])
    if groups is not None:
        metrics["within_groups"] = {"file": gpath, "router": within_groups(choice, Y, Cost, groups)}
        for b in curves:
            if b != "router":
                metrics["within_groups"][b] = {k: v for k, v in within_groups(curves[b], Y, Cost, groups).items()
                                               if k != "per_group"}
        wg = metrics["within_groups"]
        if "logreg" in wg:
            wg["apgr_vs_logreg"] = (None if wg["router"]["apgr"] is None or wg["logreg"]["apgr"] is None
                                    else wg["router"]["apgr"] - wg["logreg"]["apgr"])
    artifacts.write_json(ecfg.metrics, metrics)

    plots = Path(ecfg.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    hc, ha = upper_hull(fc, fa)
    oa, oc = oracle(Y, Cost)
    pd.DataFrame({"cost": cost, "accuracy": acc, "lambda": lams}).sort_values("cost").to_csv(
        plots / "router_curve.csv", index=False)
    base_curves = {b: realized(curves[b], Y, Cost) for b in pred["baselines"]}
    pd.concat([pd.DataFrame({"baseline": b, "cost": c, "accuracy": a}) for b, (a, c) in base_curves.items()]
              or [pd.DataFrame(columns=["baseline", "cost", "accuracy"])]).to_csv(plots / "baseline_curves.csv",
                                                                                   index=False)
    pd.DataFrame({"tier": names, "cost": fc, "accuracy": fa}).to_csv(plots / "fixed_tiers.csv", index=False)
    pd.DataFrame({"cost": hc, "accuracy": ha}).to_csv(plots / "fixed_hull.csv", index=False)
    pd.DataFrame(cal_rows).to_csv(plots / "calibration.csv", index=False)
    pd.DataFrame({"tier": names, "share": mix}).to_csv(plots / "tier_mix.csv", index=False)
    static_curve = None
    if avs is not None:  # the same router restricted to static tiers, beside the full one
        st = np.nonzero(~adaptive)[0]
        static_choice = st[sweep(P[:, st], Cp[:, st], None, None, lams)]  # its choices, as tier indexes
        sa, sc = realized(static_choice, Y, Cost)
        static_curve = (sa, sc)
        pd.DataFrame({"cost": sc, "accuracy": sa, "lambda": lams}).sort_values("cost").to_csv(
            plots / "static_router_curve.csv", index=False)
        if lat is not None:
            la = realized(choice, Y, lat)[1]
            ls = realized(static_choice, Y, lat)[1]
            pd.concat([pd.DataFrame({"router": "with adaptive tiers", "latency_tokens": la, "accuracy": acc}),
                       pd.DataFrame({"router": "static tiers only", "latency_tokens": ls, "accuracy": sa})]).to_csv(
                plots / "latency_curves.csv", index=False)
    write_plots(plots, names, acc, cost, fa, fc, hc, ha, (oc, oa), (point[1], point[0]), cal_rows, mix, base_curves,
                "cross-fitted" if folds else "test split", adaptive=adaptive, static_curve=static_curve)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_metrics({f"baseline_{b}_apgr": m["apgr"] for b, m in base_metrics.items() if m["apgr"] is not None})
    run.log_artifact(ecfg.metrics)
    run.log_artifact(plots, "plots")
    return metrics


def write_plots(d: Path, names, acc, cost, fa, fc, hc, ha, oracle_pt, op, cal_rows, mix, base_curves, how,
                adaptive=None, static_curve=None) -> None:
    """Pareto (accuracy vs cost; ``oracle_pt`` and ``op`` are (cost, accuracy); adaptive tiers
    marked apart, and the router restricted to static tiers if given), calibration, tier mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.routing_metrics import upper_hull

    fig, ax = plt.subplots(figsize=(7, 5))
    o = np.argsort(cost)
    ax.plot(np.asarray(cost)[o], np.asarray(acc)[o], "-", color="C0", lw=2, label="router (lambda sweep)")
    for i, (b, (a, c)) in enumerate(base_curves.items()):
        bc, ba = upper_hull(c, a)
        ax.plot(bc, ba, ":", color=f"C{4 + i}", label=f"{b} baseline (hull)")
    if static_curve is not None:
        so = np.argsort(static_curve[1])
        ax.plot(np.asarray(static_curve[1])[so], np.asarray(static_curve[0])[so], "-", color="C9", lw=1.5,
                label="router, static tiers only")
    ad = np.zeros(len(names), bool) if adaptive is None else np.asarray(adaptive, bool)
    ax.scatter(np.asarray(fc)[~ad], np.asarray(fa)[~ad], color="C1", zorder=3, label="fixed tiers")
    if ad.any():
        ax.scatter(np.asarray(fc)[ad], np.asarray(fa)[ad], marker="^", color="C8", zorder=3,
                   label="adaptive tiers (fixed)")
    for n, x, y in zip(names, fc, fa):
        ax.annotate(n, (x, y), fontsize=6, alpha=0.7)
    ax.plot(hc, ha, "--", color="C1", alpha=0.6, label="random mixtures of fixed tiers")
    ax.scatter([oracle_pt[0]], [oracle_pt[1]], marker="*", s=150, color="C2", zorder=4, label="oracle")
    ax.scatter([op[0]], [op[1]], marker="D", s=60, color="C3", zorder=5, label="operating point")
    ax.set_xscale("symlog")
    ax.set_xlabel("mean cost per query (tokens x price)")
    ax.set_ylabel(f"accuracy ({how})")
    ax.legend(fontsize=7, loc="lower right")
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
    ax.set_ylabel("share of evaluated queries")
    ax.set_title("tier mix at the operating point")
    fig.tight_layout()
    fig.savefig(d / "tier_mix.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return run_stage("evaluate", evaluate, argv, sections=SECTIONS,
                     description="evaluate: router vs baselines, fixed tiers and the oracle, out of sample",
                     summary=("evaluated_queries", "cv_folds", "router_accuracy", "router_mean_cost", "best_fixed_tier",
                              "compute_saved_at_iso_accuracy", "apgr", "apgr_vs_logreg"))


if __name__ == "__main__":
    main()
