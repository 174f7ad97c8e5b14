"""``python -m pipelines retrain``: the served bundle's success model retrained with production
outcomes mixed into its labelled training queries, when the drift report says traffic moved.

    python -m pipelines retrain [--bundle models/router] [--feedback data/production/feedback.parquet]
                                [--drift metrics/drift.json] [--out models/retrained]
                                [--report metrics/retrain.json] [--when drift|always]

Recalibration (``pipelines recalibrate``) moves each tier's p by a map of p alone; it cannot learn
that the shift sits in one kind of query (a task family the upstream got worse at). Retraining
can: a LightGBM model over [query features, one-hot tier] is boosted *from the bundle's own
logits* (LightGBM's initial scores) on two kinds of rows mixed together:

- production rows: one per logged request with an outcome, answered by the tier it chose (the
  logged text featurized with the bundle's featurizer: the proxy must run with ``--log-text``;
  rows without text are left out and counted, ``excluded.no_text``),
  label ``correct``, weight ``retrain.production_weight``;
- labelled rows: every (query, tier) of the pipeline's labelled table (``data/outcomes.parquet``
  with ``data/features.parquet``), label the realized p_correct, weight 1. They hold the model to
  what the labels say where production is silent (a tier production rarely sends traffic to, a
  kind of query production no longer asks).

The result, ``router.models.Corrected``, predicts ``sigmoid(logit(p) + f(x, tier))``: the bundle's
cost model, operating point and featurizer are kept. Before/after Brier on the production rows is
cross-fitted (``retrain.folds``: each production row scored by a model fitted without its fold;
the labelled rows are in every fit). The new model is written only when the drift report flags
drift (``retrain.when: drift``; ``always`` skips that check), there are ``retrain.min_rows``
production outcomes, and the cross-fitted Brier falls; otherwise ``models/retrained`` is the bundle
unchanged and the report says why, so the DVC stage always leaves a servable bundle. Either way
the bundle then goes through the promotion gate like any candidate (``pipelines promote`` or the
registry): retraining on what production observed is evidence, not a decision.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("retrain", "feedback", "label", "featurize", "drift")


def production_rows(router, df) -> dict[str, Any]:
    """Features, tier index, outcome and the bundle's p of that tier (once: every fit starts from it)
    of each logged request answered by the tier it chose."""
    names = [t.name for t in router.tiers]
    rows, excluded = artifacts.answered_rows(df, names)
    # the features are the logged text's (proxy --log-text); a row without it is left out, counted
    has_text = rows["text"].notna().to_numpy(dtype=bool) if "text" in rows else np.zeros(len(rows), dtype=bool)
    excluded["no_text"] = int((~has_text).sum())
    rows = rows[has_text].reset_index(drop=True)
    X = router.featurizer.transform(list(rows["text"])) if len(rows) else np.empty((0, len(router.featurizer.feature_names)))
    X = np.asarray(X, dtype=np.float64)
    tier = rows["chosen"].map(names.index).to_numpy(dtype=np.int64)
    p = router.success.predict(X)[np.arange(len(X)), tier] if len(X) else np.empty(0)
    return {"X": X, "tier": tier, "y": rows["correct"].to_numpy(dtype=np.float64), "p": np.clip(p, 0.0, 1.0),
            "excluded": excluded}


def labelled_rows(router, params: Params) -> dict[str, Any]:
    """Every (query, tier) of the labelled table whose tier the bundle has, in long form."""
    ds = artifacts.load_dataset(params.label, params.featurize, splits=("train", "val", "test"))
    names = [t.name for t in router.tiers]
    want = router.featurizer.feature_names
    missing = [c for c in want if c not in ds.feature_names]
    if missing:
        raise ValueError(f"{params.featurize.out} lacks the bundle's features {missing[:5]}: the bundle was not "
                         "trained on this featurize output")
    X = ds.X[:, [ds.feature_names.index(c) for c in want]].astype(np.float64)
    cols = [(j, names.index(t["name"])) for j, t in enumerate(ds.tiers) if t["name"] in names]
    ks = [k for _, k in cols]
    n = len(X)
    # the bundle's p on each query once (all tiers in one call), not once per repeated (query, tier) row
    P = np.clip(router.success.predict(X), 0.0, 1.0) if n else np.empty((0, len(names)))
    return {"X": np.repeat(X, len(cols), axis=0) if cols else np.empty((0, X.shape[1])),
            "tier": np.tile(ks, n).astype(np.int64),
            "y": ds.Y[:, [j for j, _ in cols]].reshape(-1).astype(np.float64), "p": P[:, ks].reshape(-1),
            "queries": n}


def fit_correction(X, tier, y, w, p, k: int, cfg):
    """LightGBM over [features, one-hot tier], boosted from the base model's logits ``logit(p)``."""
    import lightgbm as lgb

    from router.models import logit

    rows = np.concatenate([X, np.eye(k)[tier]], axis=1)  # as router.models.joint_rows builds them at run time
    init = logit(p)
    params = {"objective": "cross_entropy", "verbosity": -1, "seed": cfg.seed, "deterministic": True,
              "force_col_wise": True, "num_threads": 1, "learning_rate": cfg.learning_rate,
              "num_leaves": cfg.num_leaves, "min_data_in_leaf": cfg.min_data_in_leaf, "lambda_l2": cfg.lambda_l2}
    booster = lgb.train(params, lgb.Dataset(rows, label=y, weight=w, init_score=init), num_boost_round=cfg.rounds)
    return booster


def retrain(params: Params, run=NULL_RUN, bundle=None, feedback_path=None, drift_path=None, out=None, report=None,
            when=None) -> dict:
    from pipelines.learn import fold_ids
    from router.models import Corrected
    from router.runtime import Router

    cfg = params.retrain
    bundle = Path(bundle or cfg.bundle)
    fb_path = Path(feedback_path or cfg.feedback or Path(params.feedback.out_dir) / "feedback.parquet")
    drift_path = Path(drift_path or cfg.drift or params.drift.out)
    out, report = Path(out or cfg.out_dir), Path(report or cfg.report)
    when = when or cfg.when
    router = Router.load(bundle)
    k = len(router.tiers)
    base = {"bundle": str(bundle), "out": str(out), "feedback": str(fb_path), "when": when}

    def unchanged(why: str, **extra) -> dict:
        log.warning("%s: %s is the bundle unchanged", why, out)
        result = artifacts.passed_through(bundle, out, report, {**base, "why": why, **extra})
        run.log_metrics({"applied": 0})
        return {**result, "report": str(report)}

    drifted = None
    if when == "drift":
        if not drift_path.exists():
            return unchanged(f"no drift report at {drift_path} (run `pipelines drift`)")
        drifted = bool(json.loads(drift_path.read_text()).get("drift"))
        if not drifted:
            return unchanged(f"the drift report {drift_path} flags no drift (retrain.when: drift)", drift=False)
    prod = production_rows(router, artifacts.read_feedback(fb_path))
    n = len(prod["y"])
    need = max(cfg.min_rows, cfg.folds)
    if n < need:
        no_text = prod["excluded"]["no_text"]
        return unchanged(f"{n} production outcomes on their own tier with logged text; retraining needs at least "
                         f"{need} (retrain.min_rows)" + (f"; {no_text} more have no text (run the proxy with "
                                                         "--log-text)" if no_text else ""),
                         drift=drifted, rows=n, excluded=prod["excluded"])
    lab = labelled_rows(router, params)
    t0 = time.time()

    def fit(mask):
        both = {c: np.concatenate([prod[c][mask], lab[c]]) for c in ("X", "tier", "y", "p")}
        w = np.concatenate([np.full(int(mask.sum()), cfg.production_weight), np.ones(len(lab["y"]))])
        return fit_correction(both["X"], both["tier"], both["y"], w, both["p"], k, cfg)

    p0 = prod["p"]
    oof = np.empty(n)
    fold = fold_ids(n, cfg.folds, cfg.seed)
    for f in range(cfg.folds):
        held = fold == f
        model = Corrected(router.success, fit(~held), k)
        oof[held] = model.predict(prod["X"][held])[np.arange(int(held.sum())), prod["tier"][held]]
    y = prod["y"]
    brier0, brier1 = float(np.mean((p0 - y) ** 2)), float(np.mean((oof - y) ** 2))
    per_tier = {}
    for j, t in enumerate(router.tiers):
        m = prod["tier"] == j
        if m.any():
            per_tier[t.name] = {"rows": int(m.sum()), "observed": float(y[m].mean()),
                                "predicted_before": float(p0[m].mean()), "predicted_after": float(oof[m].mean())}
    figures = {"drift": drifted, "rows": n, "labelled_queries": lab["queries"], "labelled_rows": int(len(lab["y"])),
               "excluded": prod["excluded"], "folds": cfg.folds, "brier_before": brier0, "brier_after": brier1,
               "per_tier": per_tier}
    if not brier1 < brier0:
        return unchanged(f"cross-fitted Brier {brier0:.4f} -> {brier1:.4f}: no gain", **figures)
    model = Corrected(router.success, fit(np.ones(n, dtype=bool)), k)
    section = {"parent_sha256": router.bundle_sha256, "feedback": str(fb_path), "rows": n,
               "labelled_queries": lab["queries"], "production_weight": cfg.production_weight,
               "brier_before": brier0, "brier_after": brier1}
    f = f"correction_{router.bundle_sha256[:12]}_lgbm.txt"  # unique if a retrained bundle is retrained again
    manifest = {**router.manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "success": {"kind": Corrected.kind, "file": f, "tiers": k, "base": router.manifest["success"]},
                "retraining": section}
    artifacts.derived_bundle(bundle, out, manifest, {f: model.booster.model_to_string()})
    result = {**base, "applied": True, "why": None, **figures, "seconds": round(time.time() - t0, 1)}
    artifacts.write_json(report, result)
    run.log_metrics({"applied": 1, "rows": n, "brier_before": brier0, "brier_after": brier1})
    run.log_artifact(report)
    return {**result, "report": str(report)}


def _arguments(ap) -> None:
    ap.add_argument("--bundle", default=None, help="the bundle to retrain (default: retrain.bundle)")
    ap.add_argument("--feedback", default=None, help="feedback table (default: <feedback.out_dir>/feedback.parquet)")
    ap.add_argument("--drift", default=None, help="drift report (default: drift.out)")
    ap.add_argument("--out", default=None, metavar="DIR", help="the new bundle (default: retrain.out_dir)")
    ap.add_argument("--report", default=None, help="report JSON (default: retrain.report)")
    ap.add_argument("--when", choices=("drift", "always"), default=None,
                    help="retrain only when the drift report flags drift, or always (default: retrain.when)")


def main(argv=None) -> dict:
    description = "retrain: the success model boosted on production outcomes mixed with the labelled queries"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("retrain", lambda params, run: retrain(params, run, args.bundle, args.feedback, args.drift,
                                                            args.out, args.report, args.when),
                     description=description, sections=SECTIONS, args=args,
                     summary=("applied", "why", "rows", "out", "brier_before", "brier_after"))


if __name__ == "__main__":
    main()
