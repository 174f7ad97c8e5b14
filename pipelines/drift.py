"""``python -m pipelines drift``: the training data against a window of production traffic.

    python -m pipelines drift [--train data/features.parquet] --production FILE [FILE ...]
                              [--bundle models/router] [--last N] [--out metrics/drift.json]

``--production`` takes a features table (``query_id`` + the training feature columns) and/or a
feedback table (``pipelines feedback``; its logged text is featurized with the bundle's featurizer
when no production features table is given). ``--last N`` keeps the newest N logged requests.
What is compared, each against a threshold in the ``drift`` params section:

- **features**: population stability index (PSI, over ``psi_bins`` quantile bins of the training
  values) and the two-sample Kolmogorov-Smirnov test per feature; PSI above ``drift.psi`` with a KS
  p-value below ``drift.ks_pvalue`` flags.
- **predicted p(correct)** per tier: the bundle's predictions on the training features against the
  ones logged (or made on the production features); flagged by the same rule.
- **tier mix**: the bundle's greedy choice on the training features against production's greedy
  choice (the logged ``greedy`` tier, the chosen one for fallbacks); total variation above
  ``drift.tier_mix_tv`` flags.
- **out-of-distribution rate**: the share of requests routed ``fallback:out-of-distribution``
  (export sets the threshold so ``policy.ood_quantile`` of validation queries would be); above
  ``drift.ood_rate`` flags.
- **cost per query**: observed against predicted, and against the policy's predicted mean on the
  training features (reported, not flagged).
- **accuracy per tier** where outcomes exist: observed against predicted; predicted higher by more
  than ``drift.accuracy_drop`` (and 2 standard errors) on at least ``drift.min_tier_rows`` requests flags.

Fewer than ``drift.min_rows`` production rows: the report says so and flags nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines import artifacts
from pipelines.config import DriftConfig, Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("drift", "featurize", "export")
OOD_REASON = "fallback:out-of-distribution"


def psi(ref, cur, bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index of ``cur`` against ``ref``: sum (c - r) ln(c / r) over the
    quantile bins of ``ref`` (shares floored at ``floor`` so an empty bin is finite)."""
    ref = np.asarray(ref, dtype=np.float64)
    cur = np.asarray(cur, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if not len(ref) or not len(cur):
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    r, c = np.maximum(r, floor), np.maximum(c, floor)
    return float(np.sum((c - r) * np.log(c / r)))


def compare_columns(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], cfg: DriftConfig) -> dict[str, Any]:
    """PSI and KS per shared column; flagged where PSI passes ``cfg.psi`` and the KS p-value is
    below ``cfg.ks_pvalue``."""
    from scipy.stats import ks_2samp

    out = {}
    for name in ref:
        if name not in cur:
            continue
        a, b = np.asarray(ref[name], dtype=np.float64), np.asarray(cur[name], dtype=np.float64)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if not len(a) or not len(b):
            continue
        ks = ks_2samp(a, b)
        value = psi(a, b, cfg.psi_bins)
        # both: PSI says the shift is large, KS that it is not the noise of a small window (with
        # hundreds of embedding columns, PSI alone flags a few by chance in a window of 50)
        out[name] = {"psi": value, "ks": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
                     "flag": bool(value > cfg.psi and ks.pvalue < cfg.ks_pvalue)}
    return out


def _mix(names: Sequence[str], tiers: Sequence[str]) -> dict[str, float]:
    n = max(len(names), 1)
    return {t: sum(1 for x in names if x == t) / n for t in tiers}


def _allowed_p(feedback, tiers: list[str]) -> dict[str, np.ndarray]:
    """Logged predicted p(correct) per tier (where the tier was admitted)."""
    cols: dict[str, list[float]] = {t: [] for t in tiers}
    for s in feedback["allowed"]:
        for u in json.loads(s):
            if u["tier"] in cols:
                cols[u["tier"]].append(u["p_correct"])
    return {t: np.asarray(v) for t, v in cols.items() if v}


def drift_report(train, production_features, feedback, router, cfg: DriftConfig) -> dict[str, Any]:
    """The report (pure: no files). ``train``/``production_features``: feature tables (DataFrames)
    or None; ``feedback``: a feedback table or None; ``router``: a loaded bundle or None."""
    report: dict[str, Any] = {"thresholds": {k: getattr(cfg, k) for k in ("psi", "psi_bins", "ks_pvalue", "tier_mix_tv",
                                                                         "ood_rate", "accuracy_drop", "min_rows",
                                                                         "min_tier_rows")}}
    flags: list[str] = []
    names = router.featurizer.feature_names if router is not None else None
    if names is None and train is not None:
        names = [c for c in train.columns if c != "query_id"]
    if production_features is None and feedback is not None and len(feedback) and router is not None \
            and "text" in feedback and feedback["text"].notna().all():
        X = router.featurizer.transform(list(feedback["text"]))
        import pandas as pd

        production_features = pd.DataFrame(X, columns=names)
        report["production_features_from"] = "feedback text, featurized with the bundle"
    n_prod = len(feedback) if feedback is not None else (len(production_features) if production_features is not None else 0)
    report["production_rows"] = int(n_prod)
    report["train_rows"] = int(len(train)) if train is not None else 0
    enough = n_prod >= cfg.min_rows
    if not enough:
        report["note"] = f"{n_prod} production rows < drift.min_rows {cfg.min_rows}: nothing is flagged"

    # features
    if train is not None and production_features is not None and len(production_features):
        shared = [c for c in names if c in train.columns and c in production_features.columns]
        feats = compare_columns({c: train[c].to_numpy() for c in shared},
                                {c: production_features[c].to_numpy() for c in shared}, cfg)
        drifted = sorted((c for c, v in feats.items() if v["flag"]), key=lambda c: -feats[c]["psi"])
        report["features"] = {"compared": len(feats), "flagged": drifted,
                              "max_psi": max((v["psi"] for v in feats.values()), default=None), "per_feature": feats}
        if drifted:
            flags.append(f"features: {len(drifted)} with PSI > {cfg.psi} (e.g. {drifted[:3]})")

    # predictions, tier mix, cost on the training features (the bundle's policy, no caps)
    tiers = [t.name for t in router.tiers] if router is not None else None
    ref_p = None
    if router is not None and train is not None:
        from router.policy import choose_batch

        X = train[names].to_numpy(dtype=np.float32)
        P = np.clip(router.success.predict(X), 0, 1)
        C = np.maximum(router.cost.predict(X), 0)
        idx = choose_batch(P, C, router.lam)
        ref_p = {t: P[:, j] for j, t in enumerate(tiers)}
        report["train_tier_mix"] = _mix([tiers[i] for i in idx], tiers)
        report["train_predicted_cost_per_query"] = float(C[np.arange(len(C)), idx].mean())
    if feedback is not None and len(feedback):
        tiers = tiers or sorted(set(feedback["chosen"].dropna()))
        cur_p = _allowed_p(feedback, tiers)
        if ref_p is not None:
            pp = compare_columns(ref_p, cur_p, cfg)
            report["predicted_p_correct"] = pp
            bad = [t for t, v in pp.items() if v["flag"]]
            if bad:
                flags.append(f"predicted p(correct): PSI > {cfg.psi} on tier(s) {bad}")
        greedy = [g if isinstance(g, str) else c for g, c in zip(feedback["greedy"], feedback["chosen"])]
        report["production_tier_mix"] = _mix(greedy, tiers)
        report["production_chosen_mix"] = _mix(list(feedback["chosen"]), tiers)  # exploration included
        if "train_tier_mix" in report:
            tv = 0.5 * sum(abs(report["production_tier_mix"][t] - report["train_tier_mix"][t]) for t in tiers)
            report["tier_mix_tv"] = tv
            if tv > cfg.tier_mix_tv:
                flags.append(f"tier mix: total variation {tv:.3f} > {cfg.tier_mix_tv}")
        ood = float((feedback["reason"] == OOD_REASON).mean())
        report["ood_rate"] = ood
        if ood > cfg.ood_rate:
            flags.append(f"out-of-distribution rate {ood:.3f} > {cfg.ood_rate}")
        report["cost_per_query"] = {"observed": float(feedback["observed_cost"].mean()),
                                    "predicted": float(feedback["expected_cost"].mean()),
                                    "train_predicted": report.get("train_predicted_cost_per_query")}
        per_tier = {}
        ok = feedback["correct"].notna() & (feedback["executed"] == feedback["chosen"])
        for tier, g in feedback[ok].groupby("executed"):
            n = len(g)
            obs, pred = float(g["correct"].mean()), float(g["p_correct"].mean())
            se = float(np.sqrt(max(obs * (1 - obs), 1e-12) / n))
            flag = n >= cfg.min_tier_rows and pred - obs > cfg.accuracy_drop and pred - obs > 2 * se
            per_tier[str(tier)] = {"requests": n, "observed": obs, "predicted": pred, "se": se, "flag": bool(flag)}
        report["accuracy_per_tier"] = per_tier
        bad = [t for t, v in per_tier.items() if v["flag"]]
        if bad:
            flags.append(f"accuracy: observed below predicted by > {cfg.accuracy_drop} on tier(s) {bad}")
    report["flags"] = flags if enough else []
    report["drift"] = bool(enough and flags)
    return report


def plot(report: dict[str, Any], path: str | Path) -> None:
    """PSI of the most shifted features and of predicted p per tier; tier mix, train vs production."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    feats = (report.get("features") or {}).get("per_feature", {})
    top = sorted(feats, key=lambda c: -feats[c]["psi"])[:15]
    axes[0].barh(top[::-1], [feats[c]["psi"] for c in top[::-1]])
    axes[0].set_title("feature PSI (top 15)")
    pp = report.get("predicted_p_correct", {})
    axes[1].barh(list(pp), [v["psi"] for v in pp.values()])
    axes[1].set_title("predicted p(correct) PSI per tier")
    for ax in axes[:2]:
        ax.axvline(report["thresholds"]["psi"], color="red", linestyle="--")
    tr, pr = report.get("train_tier_mix", {}), report.get("production_tier_mix", {})
    tiers = list(tr or pr)
    x = np.arange(len(tiers))
    axes[2].bar(x - 0.2, [tr.get(t, 0) for t in tiers], 0.4, label="train")
    axes[2].bar(x + 0.2, [pr.get(t, 0) for t in tiers], 0.4, label="production")
    axes[2].set_xticks(x, tiers, rotation=30, ha="right")
    axes[2].set_title("tier mix")
    axes[2].legend()
    fig.suptitle("drift: " + ("; ".join(report["flags"]) or "none flagged"), fontsize=9)
    fig.tight_layout()
    with artifacts.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _read_production(paths: Sequence[str]):
    import pandas as pd

    features = feedback = None
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such production table (a features table, or `pipelines feedback`'s)")
        df = pd.read_parquet(p)
        if "request_id" in df.columns:
            if feedback is not None:
                raise ValueError(f"{p}: a second feedback table; join logs into one with `pipelines feedback`")
            feedback = artifacts.read_feedback(p)
        else:
            if features is not None:
                raise ValueError(f"{p}: a second features table")
            features = artifacts.read_features(p)[0]
    return features, feedback


def drift(params: Params, run=NULL_RUN, train=None, production=(), bundle=None, last=None, out=None, plot_path=None) -> dict:
    cfg = params.drift
    production = list(production) or [str(Path(params.feedback.out_dir) / "feedback.parquet")]
    prod_features, feedback = _read_production(production)
    if feedback is not None and last:
        feedback = feedback.sort_values("ts", kind="stable").tail(int(last)).reset_index(drop=True)
    train_path = Path(train or params.featurize.out)
    train_df = artifacts.read_features(train_path)[0]
    router = None
    bundle = Path(bundle or params.export.out_dir)
    if (bundle / "manifest.json").exists():
        from router.runtime import Router

        router = Router.load(bundle)
    else:
        log.warning("no bundle at %s: predicted p(correct), tier mix and text features are not compared", bundle)
    report = drift_report(train_df, prod_features, feedback, router, cfg)
    report.update(train=str(train_path), production=production, bundle=str(bundle) if router else None)
    out = Path(out or cfg.out)
    artifacts.write_json(out, report)
    plot_path = plot_path or cfg.plot
    if plot_path:
        plot(report, plot_path)
        run.log_artifact(plot_path)
    run.log_metrics({"drift": int(report["drift"]), "flags": len(report["flags"]),
                     "features_max_psi": (report.get("features") or {}).get("max_psi"),
                     "tier_mix_tv": report.get("tier_mix_tv"), "ood_rate": report.get("ood_rate")})
    run.log_artifact(out)
    return {"drift": report["drift"], "flags": report["flags"], "production_rows": report["production_rows"],
            "out": str(out)}


def _arguments(ap) -> None:
    ap.add_argument("--train", default=None, help="training features (default: featurize.out)")
    ap.add_argument("--production", nargs="+", default=[], metavar="FILE",
                    help="a production features table and/or a feedback table (default: the feedback table)")
    ap.add_argument("--bundle", default=None, help="the serving bundle (default: export.out_dir)")
    ap.add_argument("--last", type=int, default=None, help="only the newest N logged requests")
    ap.add_argument("--out", default=None, help="report JSON (default: drift.out)")
    ap.add_argument("--plot", default=None, help="plot PNG (default: drift.plot)")


def main(argv=None) -> dict:
    description = "drift: training data against a window of production traffic"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("drift", lambda params, run: drift(params, run, args.train, args.production, args.bundle,
                                                        args.last, args.out, args.plot),
                     description=description, sections=SECTIONS, args=args,
                     summary=("drift", "flags", "production_rows", "out"))


if __name__ == "__main__":
    main()
