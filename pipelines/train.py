"""The train stage: success models over tiers and a cost model, selected and calibrated on
the validation split. The test split is never read here.

Candidates (all on the same features): the constant per-tier base rate, logistic regression
and kNN (scikit-learn baselines), LightGBM per tier, and one joint LightGBM over
[query features, tier features] that sees how tiers relate. Soft labels (p_correct from the
subset estimator) are used as such: LightGBM's cross-entropy objective takes labels in
[0, 1]; logistic regression sees each row twice, as a success with weight p and a failure
with weight 1 - p. Selection is by the validation routing curve (APGR), since what decides
a route is the gain of a costlier tier, which per-tier log loss does not measure.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.artifacts import Dataset
from pipelines.config import Params, TrainConfig
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("seed", "label", "featurize", "train")


# ---------------------------------------------------------------- fitting candidates


def _soft_logreg(X, y, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():  # no variation: a constant is the honest model
        return np.zeros(X.shape[1]), float(np.log(max(y[0], 1e-6) / max(1 - y[0], 1e-6)))
    Xd = np.concatenate([X, X])
    yd = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    w = np.concatenate([y, 1 - y])
    m = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(Xd, yd, sample_weight=w)
    return m.coef_[0], float(m.intercept_[0])


def _lgbm_params(cfg: TrainConfig, objective: str) -> dict:
    p = {"objective": objective, "verbosity": -1, "seed": cfg.seed, "num_threads": 1, "deterministic": True}
    p.update({k: v for k, v in cfg.lgbm.items() if k != "n_estimators"})
    return p


def fit_success(name: str, ds: Dataset, tr: np.ndarray, cfg: TrainConfig):
    """Fit candidate ``name`` on the training rows; returns a ``router.models`` predictor."""
    from router.models import Constant, JointLgbm, Knn, Linear, PerTierLgbm, tier_features

    X, Y = ds.X[tr], ds.Y[tr]
    if name == "constant":
        return Constant(Y.mean(axis=0))
    if name == "logreg":
        mean, scale = X.mean(axis=0), X.std(axis=0)
        scale[scale < 1e-9] = 1.0
        Z = (X - mean) / scale
        coefs = [_soft_logreg(Z, Y[:, t], cfg.logreg_c, cfg.seed) for t in range(Y.shape[1])]
        return Linear([c for c, _ in coefs], [b for _, b in coefs], mean, scale)
    if name == "knn":
        emb = [i for i, f in enumerate(ds.feature_names) if f.startswith("emb_")]
        if not emb:
            raise ValueError("knn needs embedding features (featurize.embedding != 'none')")
        lo, hi = emb[0], emb[-1] + 1
        ref = X[:, lo:hi] / np.maximum(np.linalg.norm(X[:, lo:hi], axis=1, keepdims=True), 1e-12)
        return Knn(ref, Y, cfg.knn_k, (lo, hi))
    import lightgbm as lgb

    rounds = int(cfg.lgbm.get("n_estimators", 150))
    if name == "lgbm_per_tier":
        boosters = []
        for t in range(Y.shape[1]):
            d = lgb.Dataset(X, label=Y[:, t], free_raw_data=False)
            boosters.append(lgb.train(_lgbm_params(cfg, "cross_entropy"), d, num_boost_round=rounds))
        return PerTierLgbm(boosters)
    if name == "lgbm_joint":
        from router.models import joint_rows

        models = sorted({t["model"] for t in ds.tiers})
        T = tier_features(ds.tiers, models)
        d = lgb.Dataset(joint_rows(X, T), label=Y.reshape(-1), free_raw_data=False)
        return JointLgbm(lgb.train(_lgbm_params(cfg, "cross_entropy"), d, num_boost_round=rounds * 2), T)
    raise ValueError(f"unknown candidate {name!r}")


def fit_cost(name: str, ds: Dataset, tr: np.ndarray, cfg: TrainConfig):
    """Cost candidates: per-tier mean, or a joint LightGBM on log1p(cost)."""
    from router.models import Clipped, Constant, JointLgbm, joint_rows, tier_features

    if name == "constant":
        return Constant(ds.Cost[tr].mean(axis=0))
    import lightgbm as lgb

    models = sorted({t["model"] for t in ds.tiers})
    T = tier_features(ds.tiers, models)
    d = lgb.Dataset(joint_rows(ds.X[tr], T), label=np.log1p(ds.Cost[tr]).reshape(-1), free_raw_data=False)
    b = lgb.train(_lgbm_params(cfg, "regression_l1"), d, num_boost_round=int(cfg.lgbm.get("n_estimators", 150)))
    return Clipped(JointLgbm(b, T, transform="expm1"), 0.0, None)


# ---------------------------------------------------------------- scoring


def prob_scores(P: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """Log loss and Brier against soft labels; AUC against (p_correct >= 0.5)."""
    from sklearn.metrics import roc_auc_score

    Pc = np.clip(P, 1e-6, 1 - 1e-6)
    ll = -(Y * np.log(Pc) + (1 - Y) * np.log(1 - Pc))
    br = (P - Y) ** 2
    per = []
    for t in range(Y.shape[1]):
        yb = Y[:, t] >= 0.5
        auc = float(roc_auc_score(yb, P[:, t])) if 0 < yb.sum() < len(yb) else None
        per.append({"log_loss": float(ll[:, t].mean()), "brier": float(br[:, t].mean()), "auc": auc,
                    "label_std": float(Y[:, t].std())})
    aucs = [p["auc"] for p in per if p["auc"] is not None]
    return {"log_loss": float(ll.mean()), "brier": float(br.mean()),
            "auc": float(np.mean(aucs)) if aucs else None, "per_tier": per}


def routing_score(P: np.ndarray, Cp: np.ndarray, Y: np.ndarray, Cost: np.ndarray) -> dict[str, Any]:
    from pipelines.routing_metrics import headline, lambda_grid, realized, sweep

    lams = lambda_grid(Cp)
    acc, cost = realized(sweep(P, Cp, Y, Cost, lams), Y, Cost)
    h = headline(acc, cost, Y, Cost)
    return {k: h[k] for k in ("apgr", "compute_saved_at_iso_accuracy", "aiq", "cpt50")}


def platt(P: np.ndarray, Y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-tier Platt scaling fitted on soft labels: returns (a, b)."""
    from router.models import logit

    a, b = np.ones(P.shape[1]), np.zeros(P.shape[1])
    for t in range(P.shape[1]):
        if Y[:, t].min() == Y[:, t].max():
            continue
        coef, icpt = _soft_logreg(logit(P[:, [t]]), Y[:, t], c=1.0, seed=seed)
        a[t], b[t] = coef[0], icpt
    return a, b


def crossfit_calibration(P: np.ndarray, Y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold calibrated predictions: an honest estimate of what calibration buys."""
    from router.models import logit, sigmoid

    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(P)) % folds
    out = np.empty_like(P)
    for f in range(folds):
        fit, held = fold != f, fold == f
        a, b = platt(P[fit], Y[fit], seed)
        out[held] = sigmoid(a * logit(P[held]) + b)
    return out


# ---------------------------------------------------------------- the stage


def train(params: Params, run=NULL_RUN) -> dict[str, Any]:
    """Fit, select and calibrate the success and cost models on train + validation rows.

    Every figure in the returned metrics is out of sample: candidates are fitted on train and
    scored on validation; when calibration is applied, the reported validation figures are the
    cross-fitted (out-of-fold) calibrated predictions, never the rows Platt scaling was fitted on.
    """
    from router.models import Calibrated, Clipped

    cfg = params.train
    # the test split is excluded here, at the door: nothing below can touch it
    ds = artifacts.load_dataset(params.label, params.featurize, splits=("train", "val"))
    tr, va = ds.rows("train"), ds.rows("val")
    if len(tr) < 5 or len(va) < 5:
        raise ValueError(f"too few queries to train: {len(tr)} train / {len(va)} val (need >= 5 each)")
    names = [t["name"] for t in ds.tiers]
    run.log_params({"train_queries": len(tr), "val_queries": len(va), "tiers": len(names)})
    # cost model first: routing scores of success candidates use its predictions
    cost_scores, cost_models = {}, {}
    for cname in ("constant", "lgbm_joint"):
        m = fit_cost(cname, ds, tr, cfg)
        err = np.abs(m.predict(ds.X[va]) - ds.Cost[va])
        cost_models[cname] = m
        cost_scores[cname] = {"mae": float(err.mean()),
                              "per_tier": {n: float(err[:, i].mean()) for i, n in enumerate(names)}}
    cost_choice = min(cost_scores, key=lambda k: cost_scores[k]["mae"])
    cost_model = cost_models[cost_choice]
    Cp_va = cost_model.predict(ds.X[va])

    scores, models = {}, {}
    has_embedding = any(f.startswith("emb_") for f in ds.feature_names)
    for name in cfg.candidates:
        if name == "knn" and not has_embedding:  # documented: knn needs an embedding to measure
            log.warning("skipping candidate knn: featurize.embedding is none")
            continue
        m = fit_success(name, ds, tr, cfg)
        P = np.clip(m.predict(ds.X[va]), 0.0, 1.0)
        s = prob_scores(P, ds.Y[va])
        s.update({f"val_{k}": v for k, v in routing_score(P, Cp_va, ds.Y[va], ds.Cost[va]).items()})
        scores[name], models[name] = s, m
        log.info("%-14s val brier %.4f  log loss %.4f  apgr %s", name, s["brier"], s["log_loss"], s["val_apgr"])

    def key(n):
        s = scores[n]
        if cfg.select_by == "apgr" and s["val_apgr"] is not None:
            return (-s["val_apgr"], s["brier"])
        return (0.0, s["brier"])

    chosen = min(scores, key=key)
    success = models[chosen]
    P_va = np.clip(success.predict(ds.X[va]), 0.0, 1.0)
    P_report = P_va  # out of sample: the model never saw validation rows
    calib = {"applied": False}
    if cfg.calibrate and chosen != "constant":
        oof = crossfit_calibration(P_va, ds.Y[va], seed=cfg.seed)
        before, after = prob_scores(P_va, ds.Y[va])["brier"], prob_scores(oof, ds.Y[va])["brier"]
        calib = {"val_brier_before": before, "val_brier_after_out_of_fold": after, "applied": after < before}
        if after < before:
            a, b = platt(P_va, ds.Y[va], cfg.seed)
            success = Calibrated(success, a, b)
            # the calibrator is fitted on all validation rows: report its out-of-fold predictions
            P_report = oof
    final = prob_scores(P_report, ds.Y[va])
    const = scores["constant"] if "constant" in scores else prob_scores(
        fit_success("constant", ds, tr, cfg).predict(ds.X[va]), ds.Y[va])
    varying = [i for i, n in enumerate(names) if ds.Y[va][:, i].std() > 1e-9]
    beats = {names[i]: final["per_tier"][i]["brier"] < const["per_tier"][i]["brier"] for i in varying}
    metrics = {
        "chosen": chosen,
        "chosen_cost_model": cost_choice,
        "calibration": calib,
        "train_queries": int(len(tr)),
        "val_queries": int(len(va)),
        # out of sample (out of fold where calibrated): see the README, "Measured results"
        "val_brier": final["brier"],
        "val_log_loss": final["log_loss"],
        "val_auc": final["auc"],
        "constant_val_brier": const["brier"],
        "beats_constant_brier_tiers": int(sum(beats.values())),
        "varying_tiers": len(varying),
        "models": {n: {"val_log_loss": s["log_loss"], "val_brier": s["brier"], "val_auc": s["auc"],
                       "val_apgr": s["val_apgr"], "val_compute_saved": s["val_compute_saved_at_iso_accuracy"],
                       "per_tier": {names[i]: {k: v for k, v in p.items() if k != "label_std"}
                                    for i, p in enumerate(s["per_tier"])}}
                   for n, s in scores.items()},
        "cost_models": {n: {"val_mae": s["mae"], "per_tier": s["per_tier"]} for n, s in cost_scores.items()},
    }
    artifacts.save_model(cfg.out_dir, Clipped(success, 0.0, 1.0), cost_model, {
        "schema": 1, "tiers": ds.tiers, "feature_names": ds.feature_names,
        "featurizer": params.featurize.spec().to_dict(), "chosen": chosen, "cost_model": cost_choice,
        "calibrated": calib["applied"],
    })
    artifacts.write_json(cfg.metrics, metrics)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_metrics({"models": {n: {k: v for k, v in s.items() if k != "per_tier"} for n, s in metrics["models"].items()}})
    run.set_tags({"chosen": chosen, "cost_model": cost_choice})
    run.log_artifact(cfg.metrics)
    run.log_artifact(cfg.out_dir, "model")
    return metrics


def main(argv=None) -> dict:
    return run_stage("train", train, argv, sections=SECTIONS,
                     description="train: success and cost models over tiers, selected on validation",
                     summary=("chosen", "chosen_cost_model", "val_brier", "constant_val_brier",
                              "beats_constant_brier_tiers", "varying_tiers"))


if __name__ == "__main__":
    main()
