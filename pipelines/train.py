"""The train stage: the router the bundle ships, fitted by ``pipelines.learn.fit_router``.

It is fitted on every labelled query when evaluation cross-fits (the evaluate stage then runs
the same procedure once per fold to measure it), or on train + val when evaluation holds out
the test split (which is then never read here). Model selection, calibration and the operating
point are chosen by inner cross-validation inside those rows; ``metrics/train.json`` records
what was chosen and the out-of-fold figures it was chosen by.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines import artifacts, learn
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("seed", "label", "featurize", "train", "policy", "evaluate")


def train(params: Params, run=NULL_RUN) -> dict[str, Any]:
    """Fit, select and calibrate the success and cost models; solve lambda. Every figure in the
    returned metrics is out of fold (inner cross-validation), never on rows a model saw."""
    cfg = params.train
    summary = artifacts.outcome_summary(params.label.out)
    folds, why = learn.evaluation_folds(summary, params.evaluate)
    # in holdout mode the test split is excluded here, at the door: nothing below can touch it
    splits = ("train", "val", "test") if folds else ("train", "val")
    ds = artifacts.load_dataset(params.label, params.featurize, splits=splits)
    rows = np.arange(len(ds.query_ids))
    if len(rows) < 5:
        raise ValueError(f"too few queries to train: {len(rows)} in split(s) {splits} (need >= 5)")
    names = [t["name"] for t in ds.tiers]
    run.log_params({"train_queries": len(rows), "tiers": len(names), "evaluation_folds": folds})
    fit = learn.fit_router(ds, rows, cfg, params.policy)
    rep = fit.report
    const = rep["models"].get("constant")
    varying = [i for i, n in enumerate(names) if ds.Y[:, i].std() > 1e-9]
    beats = ([rep["per_tier_brier"][i] < const["per_tier"][i]["brier"] for i in varying] if const else [])
    metrics = {
        "chosen": fit.chosen,
        "chosen_cost_model": fit.cost_model,
        "calibration": rep["calibration"],
        "lambda": fit.lam,
        "lambda_solved_by": rep["lambda_solved_by"],
        "evaluation": {"cv_folds": folds, "rule": why},
        "train_queries": int(len(rows)),
        "inner_folds": rep["inner_folds"],
        # out of fold (inner cross-validation; calibrated ones cross-fitted once more)
        "cv_brier": rep["cv_brier"],
        "cv_log_loss": rep["cv_log_loss"],
        "cv_auc": rep["cv_auc"],
        "cv_apgr": rep["cv_apgr"],
        "constant_cv_brier": const["brier"] if const else None,
        "beats_constant_brier_tiers": int(sum(beats)),
        "varying_tiers": len(varying),
        "warnings": learn.table_warnings(ds, rows),
        "models": {n: {"cv_log_loss": s["log_loss"], "cv_brier": s["brier"], "cv_auc": s["auc"],
                       "cv_apgr": s["cv_apgr"], "cv_compute_saved": s["cv_compute_saved_at_iso_accuracy"],
                       "per_tier": {names[i]: {k: v for k, v in p.items() if k != "label_std"}
                                    for i, p in enumerate(s["per_tier"])}}
                   for n, s in rep["models"].items()},
        "cost_models": {n: {"cv_mae": s["mae"], "per_tier": s["per_tier"]} for n, s in rep["cost_models"].items()},
    }
    for w in metrics["warnings"]:
        log.warning("%s", w)
    artifacts.save_model(cfg.out_dir, fit.success, fit.cost, {
        "schema": 1, "tiers": ds.tiers, "feature_names": ds.feature_names,
        "featurizer": artifacts.read_features_spec(params.featurize.out).to_dict(), "chosen": fit.chosen, "cost_model": fit.cost_model,
        "calibrated": fit.calibrated, "lambda": fit.lam, "lambda_solved_by": rep["lambda_solved_by"],
        "train_queries": int(len(rows)), "evaluation_folds": folds,
    })
    artifacts.write_json(cfg.metrics, metrics)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_metrics({"models": {n: {k: v for k, v in s.items() if k != "per_tier"} for n, s in metrics["models"].items()}})
    run.set_tags({"chosen": fit.chosen, "cost_model": fit.cost_model})
    run.log_artifact(cfg.metrics)
    run.log_artifact(cfg.out_dir, "model")
    return metrics


def main(argv=None) -> dict:
    return run_stage("train", train, argv, sections=SECTIONS,
                     description="train: success and cost models over tiers, chosen by inner cross-validation",
                     summary=("chosen", "chosen_cost_model", "cv_brier", "constant_cv_brier", "cv_apgr",
                              "beats_constant_brier_tiers", "varying_tiers"))


if __name__ == "__main__":
    main()
