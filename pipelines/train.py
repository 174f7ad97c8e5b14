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

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Params

log = logging.getLogger(__name__)

CANDIDATES = ("constant", "logreg", "knn", "lgbm_per_tier", "lgbm_joint")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "models/train"
    metrics: str = "metrics/train.json"
    candidates: tuple = CANDIDATES
    select_by: str = "apgr"  # "apgr" (validation routing curve) or "brier"
    calibrate: bool = True  # per-tier Platt scaling on validation, kept only if it helps out of fold
    logreg_c: float = 0.1  # strong L2: a few hundred queries and ~400 features
    knn_k: int = 15
    lgbm: dict = field(default_factory=lambda: {
        "num_leaves": 7, "learning_rate": 0.05, "n_estimators": 150, "min_data_in_leaf": 8,
        "feature_fraction": 0.5, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    })
    seed: int = 0


def train_config(params: Params) -> TrainConfig:
    from pipelines.config import build

    cfg = build(TrainConfig, params.extra.get("train"), "train")
    bad = set(cfg.candidates) - set(CANDIDATES)
    if bad:
        from pipelines.config import ConfigError

        raise ConfigError(f"train.candidates: unknown model(s) {sorted(bad)}; choose from {list(CANDIDATES)}")
    if cfg.select_by not in ("apgr", "brier"):
        from pipelines.config import ConfigError

        raise ConfigError("train.select_by must be 'apgr' or 'brier'")
    return cfg


@dataclass
class Dataset:
    """Outcomes pivoted to (queries, tiers) with features aligned by query_id."""

    query_ids: list[str]
    split: np.ndarray
    X: np.ndarray
    Y: np.ndarray  # realized p_correct
    Cost: np.ndarray  # realized cost
    tiers: list[dict]
    feature_names: list[str]

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]


def load_dataset(outcomes_path: str, features_path: str, tiers_path: str, splits: tuple[str, ...]) -> Dataset:
    """Join outcomes and features for the given splits only (train never asks for test)."""
    import pandas as pd

    from pipelines.featurize import read_features

    tiers = json.loads(Path(tiers_path).read_text())
    names = [t["name"] for t in tiers]
    out = pd.read_parquet(outcomes_path)
    out = out[out["split"].isin(splits)]
    if out.empty:
        raise ValueError(f"{outcomes_path}: no rows in split(s) {splits}")
    P = out.pivot(index="query_id", columns="tier", values="p_correct")
    C = out.pivot(index="query_id", columns="tier", values="cost")
    missing = set(names) - set(P.columns)
    if missing:
        raise ValueError(f"{outcomes_path}: tiers {sorted(missing)} have no outcomes")
    P, C = P[names].dropna(), C[names].loc[P[names].dropna().index]
    feats, _ = read_features(features_path)
    feats = feats.drop_duplicates("query_id", keep="last").set_index("query_id")
    lost = set(P.index) - set(feats.index)
    if lost:
        raise ValueError(f"{len(lost)} queries have outcomes but no features; rerun featurize")
    split = out.drop_duplicates("query_id").set_index("query_id")["split"]
    qids = list(P.index)
    return Dataset(qids, split.loc[qids].to_numpy(), feats.loc[qids].to_numpy(dtype=np.float64),
                   P.to_numpy(dtype=np.float64), C.to_numpy(dtype=np.float64), tiers, list(feats.columns))


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


def save_model(d: Path, success, cost, meta: dict) -> None:
    """Write the chosen models: JSON + LightGBM text + .npy, never pickle."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    meta = dict(meta)
    meta["success"] = success.save(d, "success_")
    meta["cost"] = cost.save(d, "cost_")
    (d / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(d: str | Path):
    """(success predictor, cost predictor, meta) from a train output folder."""
    from router.models import load_predictor

    d = Path(d)
    meta = json.loads((d / "model.json").read_text())
    return load_predictor(d, meta["success"]), load_predictor(d, meta["cost"]), meta


def train(params: Params) -> dict[str, Any]:
    from pipelines.featurize import featurize_config, spec_of
    from pipelines.label import label_config
    from pipelines.tracking import stage_run
    from router.models import Calibrated

    cfg = train_config(params)
    lcfg, fcfg = label_config(params), featurize_config(params)
    # the test split is excluded here, at the door: nothing below can touch it
    ds = load_dataset(lcfg.out, fcfg.out, lcfg.tiers_out, splits=("train", "val"))
    tr, va = ds.rows("train"), ds.rows("val")
    if len(tr) < 5 or len(va) < 5:
        raise ValueError(f"too few queries to train: {len(tr)} train / {len(va)} val (need >= 5 each)")
    names = [t["name"] for t in ds.tiers]
    with stage_run(params.mlflow, "train") as run:
        run.log_params({"train": asdict(cfg), "train_queries": len(tr), "val_queries": len(va), "tiers": len(names)})
        # cost model first: routing scores of success candidates use its predictions
        cost_scores, cost_models = {}, {}
        for cname in ("constant", "lgbm_joint"):
            m = fit_cost(cname, ds, tr, cfg)
            pred = m.predict(ds.X[va])
            err = np.abs(pred - ds.Cost[va])
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
        calib = {"applied": False}
        if cfg.calibrate and chosen != "constant":
            oof = crossfit_calibration(P_va, ds.Y[va], seed=cfg.seed)
            before, after = prob_scores(P_va, ds.Y[va])["brier"], prob_scores(oof, ds.Y[va])["brier"]
            calib = {"val_brier_before": before, "val_brier_after_out_of_fold": after, "applied": after < before}
            if after < before:
                a, b = platt(P_va, ds.Y[va], cfg.seed)
                success = Calibrated(success, a, b)
        P_final = np.clip(success.predict(ds.X[va]), 0, 1)
        final = prob_scores(P_final, ds.Y[va])
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
        out = Path(cfg.out_dir)
        save_model(out, Clipped01(success), cost_model, {
            "schema": 1, "tiers": ds.tiers, "feature_names": ds.feature_names,
            "featurizer": spec_of(fcfg).to_dict(), "chosen": chosen, "cost_model": cost_choice,
            "calibrated": calib["applied"],
        })
        mpath = Path(cfg.metrics)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.write_text(json.dumps(metrics, indent=2) + "\n")
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_metrics({"models": {n: {k: v for k, v in s.items() if k != "per_tier"} for n, s in metrics["models"].items()}})
        run.set_tags({"chosen": chosen, "cost_model": cost_choice})
        run.log_artifact(mpath)
        run.log_artifact(out, "model")
    return metrics


def Clipped01(p):
    from router.models import Clipped

    return Clipped(p, 0.0, 1.0)


def main(argv=None) -> None:
    from pipelines.config import load_params, stage_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_args("train: success and cost models over tiers, selected on validation", argv)
    m = train(load_params(args.params))
    print(json.dumps({k: m[k] for k in ("chosen", "chosen_cost_model", "val_brier", "constant_val_brier",
                                        "beats_constant_brier_tiers", "varying_tiers")}))


if __name__ == "__main__":
    main()
