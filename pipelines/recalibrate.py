"""``python -m pipelines recalibrate``: refit the bundle's calibration on production outcomes.

    python -m pipelines recalibrate [--bundle models/router] [--feedback data/production/feedback.parquet]
                                    [--out models/recalibrated] [--report metrics/recalibrate.json]

The fast path of the feedback loop: no retraining, no labels. Each logged request with an outcome
gives one (predicted p of the tier it executed, observed correct) pair. Per tier with at least
``recalibrate.min_rows`` such pairs, a Platt map ``sigmoid(a * logit(p) + b)`` is fitted on soft
labels (``pipelines.learn.platt``, the one training uses); a tier with fewer (rarely chosen: its
rows are mostly explored requests) gets the map fitted on all tiers' rows together ("pooled"). The new bundle is the old one with its success model wrapped in that map
(``router.models.Calibrated``: JSON coefficients, no new model files), the manifest rewritten with
every file's sha256 and a ``recalibration`` section (parent bundle's sha256, rows, maps).

The predicted p of a row is the logged one when the log was written by this very bundle (its
``bundle_sha256``), else the bundle's prediction on the logged text (the proxy's ``--log-text``).
The report's before/after Brier and ECE are cross-fitted over the feedback rows
(``recalibrate.folds``): each row's recalibrated p comes from maps fitted on the other folds.

Exploration matters: a tier's outcomes come mostly from the requests the policy sends it, plus the
explored ones; the map is fitted on that mix, so it calibrates p *given the production traffic the
tier sees*. The operating point (lambda) is kept, not re-solved.

A DVC stage (``recalibrate`` in dvc.yaml, after ``feedback``): ``models/recalibrated`` is always a
servable bundle. The maps are applied only when there are ``min_rows`` outcomes and the cross-fitted
Brier falls; otherwise the output is the parent bundle unchanged and the report says why
(``applied: false``, ``why``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("recalibrate", "feedback")
LOGGED = ("rows", "brier_before", "brier_after", "ece_before", "ece_after")  # to MLflow, where measured


def outcome_pairs(router, df) -> dict[str, Any]:
    """(tier index, predicted p, observed correct) per usable feedback row, and where p came from:
    the logged p on rows this very bundle logged, else its prediction on the logged text. Rows that
    another bundle logged without text (proxy without ``--log-text``) cannot be scored by this one:
    left out and counted (``other_bundle_without_text``), so a new export does not stop the stage."""
    names = [t.name for t in router.tiers]
    rows, excluded = artifacts.answered_rows(df, names)
    own = ((rows["bundle_sha256"] == router.bundle_sha256) & rows["p_correct"].notna()).fillna(False).to_numpy(bool)
    has_text = rows["text"].notna().to_numpy(dtype=bool) if "text" in rows else np.zeros(len(rows), dtype=bool)
    usable = own | has_text
    excluded["other_bundle_without_text"] = int((~usable).sum())
    rows, own = rows[usable].reset_index(drop=True), own[usable]
    tier = rows["chosen"].map(names.index).to_numpy(dtype=np.int64)
    p = np.where(own, rows["p_correct"].to_numpy(dtype=np.float64, na_value=np.nan), np.nan)
    if (~own).any():
        _, P, _ = router.predict(list(rows.loc[~own, "text"]))
        p[~own] = P[np.arange(len(P)), tier[~own]]
    source = None if not len(rows) else "logged" if own.all() else "text" if not own.any() else "logged+text"
    return {"tier": tier, "p": np.clip(p, 0.0, 1.0), "y": rows["correct"].to_numpy(dtype=np.float64),
            "source": source, "excluded": excluded}


def fit_maps(tier: np.ndarray, p: np.ndarray, y: np.ndarray, k: int, min_rows: int):
    """Per-tier Platt coefficients (a, b) and each tier's map: "own" (its own rows), "pooled" (too
    few rows of its own: the map fitted on every tier's rows) or None (no map: fewer than
    ``min_rows`` rows in all)."""
    from pipelines.learn import platt

    a, b, kind = np.ones(k), np.zeros(k), [None] * k
    pooled = platt(p[:, None], y[:, None]) if len(p) >= min_rows else None
    for t in range(k):
        m = tier == t
        if m.sum() >= min_rows:
            (a[t],), (b[t],) = platt(p[m, None], y[m, None])
            kind[t] = "own"
        elif pooled is not None:
            (a[t],), (b[t],) = pooled
            kind[t] = "pooled"
    return a, b, kind


def apply_maps(tier, p, a, b):
    from router.models import logit, sigmoid

    return sigmoid(a[tier] * logit(p) + b[tier])


def crossfit(tier, p, y, k: int, min_rows: int, folds: int, seed: int) -> np.ndarray:
    """Each row's recalibrated p from maps fitted on the other folds (honest before/after figures)."""
    from pipelines.learn import fold_ids

    fold = fold_ids(len(p), folds, seed)
    out = np.empty_like(p)
    for f in range(folds):
        fit, held = fold != f, fold == f
        a, b, _ = fit_maps(tier[fit], p[fit], y[fit], k, min_rows)
        out[held] = apply_maps(tier[held], p[held], a, b)
    return out


def recalibrated_manifest(manifest: dict[str, Any], a, b, section: dict[str, Any]) -> dict[str, Any]:
    """The parent's manifest with its success model wrapped in the per-tier maps."""
    return {**manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "success": {"kind": "calibrated", "a": [float(x) for x in a], "b": [float(x) for x in b],
                        "base": manifest["success"]},
            "recalibration": section}


def recalibrate(params: Params, run=NULL_RUN, bundle=None, feedback_path=None, out=None, report=None) -> dict:
    from pipelines.routing_metrics import calibration
    from router.runtime import Router

    cfg = params.recalibrate
    bundle = Path(bundle or cfg.bundle)
    path = Path(feedback_path or cfg.feedback or Path(params.feedback.out_dir) / "feedback.parquet")
    out = Path(out or cfg.out_dir)
    router = Router.load(bundle)
    names = [t.name for t in router.tiers]
    pairs = outcome_pairs(router, artifacts.read_feedback(path))
    tier, p, y = pairs["tier"], pairs["p"], pairs["y"]
    report = Path(report or cfg.report)
    need = max(cfg.min_rows, cfg.folds)
    if len(p) < need:
        return passed_through(bundle, out, report, run, rows=len(p), excluded=pairs["excluded"],
                              why=f"{len(p)} requests with an outcome on their own tier in {path}; recalibration "
                                  f"needs at least {need} (recalibrate.min_rows)")
    k = len(names)
    oof = crossfit(tier, p, y, k, cfg.min_rows, cfg.folds, cfg.seed)
    a, b, kind = fit_maps(tier, p, y, k, cfg.min_rows)
    ece0, brier0, _ = calibration(p, y, cfg.bins)
    ece1, brier1, _ = calibration(oof, y, cfg.bins)
    per_tier = {}
    for t, n in enumerate(names):
        m = tier == t
        if not m.any():
            continue
        per_tier[n] = {"rows": int(m.sum()), "map": kind[t], "a": float(a[t]), "b": float(b[t]),
                       "observed": float(y[m].mean()), "predicted_before": float(p[m].mean()),
                       "predicted_after": float(oof[m].mean()),
                       "brier_before": float(np.mean((p[m] - y[m]) ** 2)),
                       "brier_after": float(np.mean((oof[m] - y[m]) ** 2))}
    section = {"parent_sha256": router.bundle_sha256, "feedback": str(path), "rows": int(len(p)),
               "prediction_source": pairs["source"], "min_rows": cfg.min_rows,
               "maps": dict(zip(names, kind))}
    figures = {**section, "excluded": pairs["excluded"], "folds": cfg.folds, "brier_before": brier0,
               "brier_after": brier1, "ece_before": ece0, "ece_after": ece1, "per_tier": per_tier}
    # applied only if the cross-fitted maps help: on traffic that is already calibrated the maps fit
    # noise, and serving them would be a change with no evidence for it
    if not brier1 < brier0:
        return passed_through(bundle, out, report, run, why=f"cross-fitted Brier {brier0:.4f} -> {brier1:.4f}: "
                                                            "no gain", **figures)
    artifacts.derived_bundle(bundle, out, recalibrated_manifest(router.manifest, a, b, section))
    result = {"bundle": str(bundle), "out": str(out), "applied": True, "why": None, **figures}
    artifacts.write_json(report, result)
    run.log_metrics({"applied": 1, **{k: result[k] for k in LOGGED}})
    run.log_artifact(report)
    return {**result, "report": str(report)}


def passed_through(bundle: Path, out: Path, report: Path, run, **fields) -> dict:
    """No maps served: ``out`` is the bundle unchanged, and the report says why (the DVC stage
    always leaves a servable bundle at its output)."""
    log.warning("%s: %s is the bundle unchanged", fields["why"], out)
    result = artifacts.passed_through(bundle, out, report, fields)
    run.log_metrics({"applied": 0, **{k: result[k] for k in LOGGED if k in result}})
    run.log_artifact(report)
    return {**result, "report": str(report)}


def _arguments(ap) -> None:
    ap.add_argument("--bundle", default=None, help="the bundle to recalibrate (default: recalibrate.bundle)")
    ap.add_argument("--feedback", default=None, help="feedback table (default: <feedback.out_dir>/feedback.parquet)")
    ap.add_argument("--out", default=None, metavar="DIR", help="the new bundle (default: recalibrate.out_dir)")
    ap.add_argument("--report", default=None, help="report JSON (default: recalibrate.report)")


def main(argv=None) -> dict:
    description = "recalibrate: per-tier Platt maps on production outcomes, written as a new bundle"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("recalibrate", lambda params, run: recalibrate(params, run, args.bundle, args.feedback, args.out,
                                                                    args.report),
                     description=description, sections=SECTIONS, args=args,
                     summary=("applied", "rows", "out", "brier_before", "brier_after", "ece_before", "ece_after"))


if __name__ == "__main__":
    main()
