"""Fit a router on given rows: the one fitting procedure train and evaluate share.

``fit_router(ds, rows, cfg, policy)`` fits every candidate success model and cost model, chooses
among them, calibrates the chosen one and solves the operating point (``lambda``), all inside
``rows`` and by inner cross-validation: each candidate is scored on out-of-fold predictions of
rows it was not fitted on, Platt scaling is fitted on out-of-fold predictions (and judged by a
second, nested cross-fit), and lambda is solved on the out-of-fold curve. The chosen models are
then refitted on all of ``rows``. The train stage calls it once (on every labelled query, or on
train + val when evaluation holds out a test split); the evaluate stage calls it once per outer
fold, so a cross-fitted figure never touches a row that anything was fitted or chosen on.

Candidates (all on the same features, soft labels used as such):

- ``constant``: the per-tier base rate; ``logreg``: one L2 logistic regression per tier (a
  soft label p is a success with weight p and a failure with weight 1 - p); ``knn``: the
  similarity-weighted mean outcome of the nearest training queries on the embedding (the idea
  of RouteLLM's SW ranking); ``lgbm_per_tier``: one LightGBM per tier; ``lgbm_joint``: one
  LightGBM over [query features, tier features].
- ``lgbm_gain``: what decides a route is the gain of one tier over another, so this models it
  directly: a LightGBM for the reference tier (the most accurate on the fitted rows) and, for
  every other tier, a LightGBM regression of ``y_t - y_ref``; ``p_t = p_ref + gain_t``.
- ``ridge_gain``: the same decomposition with ridge regressions (closed form, one solve).
- ``sufficient``: the cumulative "cheapest sufficient tier" model for depth ladders: one
  multiclass LightGBM over "which is the cheapest tier that solves the query (or none)";
  ``p_t = P(cheapest sufficient <= t)``. Right where a costlier tier solves whatever a cheaper
  one does; the inner cross-validation judges whether a table is like that.
- ``blend``: the mean of the other candidates' predictions (an ensemble); its out-of-fold
  predictions are the mean of theirs, so it costs no extra inner fit.

Every fitted model is a ``router.models`` predictor (JSON, ``.npy``, LightGBM text), so what
is scored here is exactly what the runtime computes.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipelines.artifacts import Dataset
from pipelines.config import PolicyConfig, TrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- checks on the rows


def check_table(ds: Dataset, rows: np.ndarray, what: str = "training rows") -> None:
    """Refuse tables no router can learn from, with what to do (never a LightGBM traceback)."""
    names = [t["name"] for t in ds.tiers]
    if len(names) < 2:
        raise ValueError(f"the outcome table has {len(names)} tier ({names}); routing needs at least two tiers")
    Y, C = ds.Y[rows], ds.Cost[rows]
    if not np.isfinite(Y).all():
        raise ValueError(f"{what}: p_correct has NaN or infinite values; check the outcome table")
    if not np.isfinite(C).all():
        bad = int((~np.isfinite(C)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} queries have a NaN or infinite cost; drop or fix those rows "
                         f"(the label stage reports them with their line numbers)")
    if (C < 0).any():
        raise ValueError(f"{what}: negative costs; costs are tokens x price, >= 0")


def table_warnings(ds: Dataset, rows: np.ndarray) -> list[str]:
    """Odd but learnable tables: said once, in the metrics, not raised."""
    names = [t["name"] for t in ds.tiers]
    out = []
    acc, cost = ds.Y[rows].mean(axis=0), ds.Cost[rows].mean(axis=0)
    for i in np.nonzero(acc <= 0)[0]:
        out.append(f"tier {names[i]} never solves a query: it is never worth its cost")
    if float(np.ptp(ds.Cost[rows])) <= 0:
        out.append("every tier costs the same: the router picks the most likely tier; cost figures are degenerate")
    elif float(np.ptp(cost)) <= 0:
        out.append("every tier has the same mean cost")
    return out


# ---------------------------------------------------------------- candidate success models


def soft_logistic(Z: np.ndarray, Y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regressions of every column of soft labels ``Y`` (in [0, 1]) on ``Z``, at once.

    Minimizes sklearn's objective for each column, ``C * sum(cross-entropy) + ||w||^2 / 2``
    (intercept not penalized), with the soft label used directly in the cross-entropy (the same
    optimum as a success with weight p plus a failure with weight 1 - p). One L-BFGS run over the
    (features + 1, tiers) weights: ~20x faster than one sklearn fit per tier on duplicated rows.
    Returns (coef (tiers, features), intercept (tiers,)).
    """
    from scipy.optimize import minimize

    n, d = Z.shape
    k = Y.shape[1]
    Za = np.concatenate([Z, np.ones((n, 1))], axis=1)
    pen = np.ones((d + 1, 1))
    pen[-1] = 0.0
    lam = 1.0 / (c * n)  # per-row scaling of sklearn's objective keeps the numbers O(1)

    def f(w):
        W = w.reshape(d + 1, k)
        S = Za @ W
        # cross-entropy of soft labels, stable: log(1 + e^s) - y s
        loss = (np.logaddexp(0.0, S) - Y * S).sum() / n + 0.5 * lam * float((pen * W * W).sum())
        G = Za.T @ (_sigmoid(S) - Y) / n + lam * pen * W
        return loss, G.reshape(-1)

    w0 = np.zeros((d + 1, k))
    p0 = np.clip(Y.mean(axis=0), 1e-6, 1 - 1e-6)
    w0[-1] = np.log(p0 / (1 - p0))
    res = minimize(f, w0.reshape(-1), jac=True, method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-6})
    W = res.x.reshape(d + 1, k)
    return W[:-1].T.copy(), W[-1].copy()


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _standardize(X):
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return (X - mean) / scale, mean, scale


def lgbm_params(cfg: TrainConfig, objective: str, **extra) -> dict:
    p = {"objective": objective, "verbosity": -1, "seed": cfg.seed, "num_threads": cfg.threads,
         "deterministic": True, "force_col_wise": True}
    p.update({k: v for k, v in cfg.lgbm.items() if k != "n_estimators"})
    p.update(extra)
    return p


def _rounds(cfg: TrainConfig) -> int:
    return int(cfg.lgbm.get("n_estimators", 150))


def _train(params: dict, X, y, rounds: int):
    import lightgbm as lgb

    return lgb.train(params, lgb.Dataset(X, label=y, free_raw_data=True), num_boost_round=rounds)


def _embedding_cols(names: list[str]) -> tuple[int, int] | None:
    emb = [i for i, f in enumerate(names) if f.startswith("emb_")]
    return (emb[0], emb[-1] + 1) if emb else None


def reference_tier(Y: np.ndarray, Cost: np.ndarray) -> int:
    """The most accurate tier (the cheaper among equals): what gains are measured against."""
    return int(np.lexsort((Cost.mean(axis=0), -Y.mean(axis=0)))[0])


def _fit_constant(ds, rows, cfg):
    from router.models import Constant

    return Constant(ds.Y[rows].mean(axis=0))


def _fit_logreg(ds, rows, cfg):
    from router.models import Linear

    Z, mean, scale = _standardize(ds.X[rows])
    coef, intercept = soft_logistic(Z, ds.Y[rows], cfg.logreg_c)
    return Linear(coef, intercept, mean, scale)


def _fit_knn(ds, rows, cfg):
    from router.models import Knn

    cols = _embedding_cols(ds.feature_names)
    if cols is None:
        raise ValueError("knn needs embedding features (featurize.embedding != 'none')")
    E = ds.X[rows, cols[0]:cols[1]]
    ref = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    return Knn(ref, ds.Y[rows], cfg.knn_k, cols, temperature=cfg.knn_temperature)


def reduced(ds: Dataset, rows: np.ndarray, cfg: TrainConfig):
    """(features of ``rows`` for trees, wrap) where ``wrap(model)`` makes the model read full rows.

    With an embedding and ``cfg.tree_embedding_dims`` > 0, trees see the lexical features plus
    the embedding's top principal components (fitted on ``rows``), not its raw dimensions."""
    from router.models import Projected, project

    cols = _embedding_cols(ds.feature_names)
    X = ds.X[rows]
    k = min(cfg.tree_embedding_dims, len(rows) - 1)
    if cols is None or k <= 0 or k >= cols[1] - cols[0]:
        return X, lambda m: m
    E = X[:, cols[0]:cols[1]]
    mean = E.mean(axis=0)
    comps = np.linalg.svd(E - mean, full_matrices=False)[2][:k]
    return project(X, cols, mean, comps), lambda m: Projected(m, cols, mean, comps)


def _fit_lgbm_per_tier(ds, rows, cfg):
    from router.models import PerTierLgbm

    (X, wrap), Y = reduced(ds, rows, cfg), ds.Y[rows]
    return wrap(PerTierLgbm([_train(lgbm_params(cfg, "cross_entropy"), X, Y[:, t], _rounds(cfg))
                             for t in range(Y.shape[1])]))


def _fit_lgbm_joint(ds, rows, cfg):
    from router.models import JointLgbm, joint_rows, tier_features

    X, wrap = reduced(ds, rows, cfg)
    T = tier_features(ds.tiers, sorted({t["model"] for t in ds.tiers}))
    b = _train(lgbm_params(cfg, "cross_entropy"), joint_rows(X, T), ds.Y[rows].reshape(-1), _rounds(cfg) * 2)
    return wrap(JointLgbm(b, T))


def _fit_lgbm_gain(ds, rows, cfg):
    from router.models import GainLgbm

    (X, wrap), Y = reduced(ds, rows, cfg), ds.Y[rows]
    ref = reference_tier(Y, ds.Cost[rows])
    boosters = []
    for t in range(Y.shape[1]):
        if t == ref:
            boosters.append(_train(lgbm_params(cfg, "cross_entropy"), X, Y[:, t], _rounds(cfg)))
        else:
            boosters.append(_train(lgbm_params(cfg, "regression"), X, Y[:, t] - Y[:, ref], _rounds(cfg)))
    return wrap(GainLgbm(boosters, ref))


def _fit_ridge_gain(ds, rows, cfg):
    from router.models import Linear, gain_matrix

    Z, mean, scale = _standardize(ds.X[rows])
    Y = ds.Y[rows]
    ref = reference_tier(Y, ds.Cost[rows])
    G = Y - Y[:, [ref]]
    G[:, ref] = Y[:, ref]
    # one solve for every tier: (Z'Z + a I) W = Z'(G - mean)
    alpha = cfg.ridge_alpha * len(Z)
    mu = G.mean(axis=0)
    W = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (G - mu))
    # back to per-tier probabilities: p_t = g_ref + g_t (t != ref), a linear map of the outputs
    M = gain_matrix(Y.shape[1], ref)
    return Linear((W @ M).T, mu @ M, mean, scale, link="identity")


def _fit_sufficient(ds, rows, cfg):
    from router.models import Sufficient

    (X, wrap), Y = reduced(ds, rows, cfg), ds.Y[rows]
    solved = Y >= 0.5
    k = Y.shape[1]
    # the cheapest solving tier, or k for "none solves it"; tiers are stored cheapest first
    first = np.where(solved.any(axis=1), solved.argmax(axis=1), k)
    present = np.unique(first)
    if len(present) == 1:
        return Sufficient(None, int(present[0]), k)
    b = _train(lgbm_params(cfg, "multiclass", num_class=k + 1), X, first, _rounds(cfg))
    return wrap(Sufficient(b, None, k))


FITTERS: dict[str, Callable] = {
    "constant": _fit_constant,
    "logreg": _fit_logreg,
    "knn": _fit_knn,
    "lgbm_per_tier": _fit_lgbm_per_tier,
    "lgbm_joint": _fit_lgbm_joint,
    "lgbm_gain": _fit_lgbm_gain,
    "ridge_gain": _fit_ridge_gain,
    "sufficient": _fit_sufficient,
}


def fit_success(name: str, ds: Dataset, rows: np.ndarray, cfg: TrainConfig):
    """Fit candidate ``name`` on ``rows``; returns a ``router.models`` predictor."""
    if name == "blend":
        from router.models import Blend

        return Blend([fit_success(n, ds, rows, cfg) for n in blend_members(cfg, ds)])
    if name not in FITTERS:
        raise ValueError(f"unknown candidate {name!r}; choose from {sorted(FITTERS) + ['blend']}")
    return FITTERS[name](ds, rows, cfg)


def blend_members(cfg: TrainConfig, ds: Dataset) -> list[str]:
    return [n for n in cfg.blend if n != "constant" and usable(n, ds)]


def usable(name: str, ds: Dataset) -> bool:
    """knn needs an embedding to measure similarity on (documented: skipped with lexical only)."""
    return not (name == "knn" and _embedding_cols(ds.feature_names) is None)


def fit_cost(name: str, ds: Dataset, rows: np.ndarray, cfg: TrainConfig):
    """Cost candidates: per-tier mean, or a joint LightGBM of log1p(cost) (per-query cost:
    chain-of-thought length varies by query)."""
    from router.models import Clipped, Constant, JointLgbm, joint_rows, tier_features

    C = ds.Cost[rows]
    if name == "constant" or float(np.ptp(C - C.mean(axis=0))) <= 0:  # cost never varies within a tier
        return Constant(C.mean(axis=0))
    if name != "lgbm_joint":
        raise ValueError(f"unknown cost model {name!r}; choose from ['constant', 'lgbm_joint']")
    T = tier_features(ds.tiers, sorted({t["model"] for t in ds.tiers}))
    # tier identity as well: tables name tiers, not budgets, so tier_features may not tell them apart
    T = np.concatenate([T, np.eye(len(ds.tiers))], axis=1)
    X, wrap = reduced(ds, rows, cfg)
    b = _train(lgbm_params(cfg, "regression"), joint_rows(X, T), np.log1p(C).reshape(-1), _rounds(cfg))
    return Clipped(wrap(JointLgbm(b, T, transform="expm1")), 0.0, None)


# ---------------------------------------------------------------- scores


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
    """APGR, compute saved, AIQ and CPT(50%) of the lambda sweep of (P, Cp) on realized outcomes."""
    from pipelines.routing_metrics import curve, headline

    acc, cost = curve(P, Cp, Y, Cost)[1:]
    h = headline(acc, cost, Y, Cost)
    return {k: h[k] for k in ("apgr", "compute_saved_at_iso_accuracy", "aiq", "cpt50")}


# ---------------------------------------------------------------- calibration


def platt(P: np.ndarray, Y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-tier Platt scaling fitted on soft labels: returns (a, b)."""
    from router.models import logit

    a, b = np.ones(P.shape[1]), np.zeros(P.shape[1])
    for t in range(P.shape[1]):
        if Y[:, t].min() == Y[:, t].max() or np.ptp(P[:, t]) <= 1e-12:
            continue
        coef, icpt = soft_logistic(logit(P[:, [t]]), Y[:, [t]], c=1.0)
        a[t], b[t] = coef[0, 0], icpt[0]
    return a, b


def crossfit_calibration(P: np.ndarray, Y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold calibrated predictions: an honest estimate of what calibration buys."""
    from router.models import logit, sigmoid

    fold = fold_ids(len(P), min(folds, len(P)), seed)
    out = np.empty_like(P)
    for f in range(fold.max() + 1):
        fit, held = fold != f, fold == f
        a, b = platt(P[fit], Y[fit], seed)
        out[held] = sigmoid(a * logit(P[held]) + b)
    return out


# ---------------------------------------------------------------- folds


def fold_ids(n: int, k: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` rows: a seeded permutation dealt round-robin, so sizes differ by <= 1."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if n < k:
        raise ValueError(f"{n} queries cannot make {k} folds; use fewer folds or more queries")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return fold


def evaluation_folds(summary: dict[str, Any], cfg) -> tuple[int, str]:
    """How evaluation measures the router: K >= 2 (cross-fitting over every labelled query) or
    0 (the test split), and why. ``summary`` is ``artifacts.outcome_summary``; ``cfg`` an
    ``EvaluateConfig``. The rule (README, "How the router is evaluated"): ``cv_folds`` if set;
    else the test split when the table has a split column of its own or at least
    ``CV_AUTO_MAX_QUERIES`` queries, else 5 folds. Fewer queries than folds need: fewer folds,
    with a warning; fewer than 8 queries cannot be cross-fitted (a clear error)."""
    from pipelines.config import CV_AUTO_MAX_QUERIES

    n = summary["queries"]
    if cfg.cv_folds == 0:
        k, why = 0, "evaluate.cv_folds is 0: the test split"
    elif cfg.cv_folds is not None:
        k, why = int(cfg.cv_folds), f"evaluate.cv_folds is {cfg.cv_folds}"
    elif summary["splits_from"] == "table":
        k, why = 0, "the outcome table has a split column of its own: its test split"
    elif n >= CV_AUTO_MAX_QUERIES:
        k, why = 0, f"{n} queries (>= {CV_AUTO_MAX_QUERIES}): the test split"
    else:
        k, why = 5, f"{n} queries (< {CV_AUTO_MAX_QUERIES}): 5-fold cross-fitting"
    if k == 0:
        if not summary["by_split"].get("test"):
            raise ValueError("holdout evaluation needs queries in the test split and there are none; set "
                             "evaluate.cv_folds to cross-fit instead")
        return 0, why
    if n < 8:
        raise ValueError(f"{n} queries are too few to cross-fit a router (need >= 8)")
    if n < 4 * k:  # every outer training part must leave room for the inner cross-validation
        log.warning("%d queries are too few for %d folds; using %d", n, k, max(2, n // 4))
        k, why = max(2, n // 4), why + f", reduced to {max(2, n // 4)} folds for {n} queries"
    return k, why


# ---------------------------------------------------------------- the fitting procedure


@dataclass
class FittedRouter:
    """Success and cost predictors fitted on some rows, with the operating point chosen there."""

    success: Any  # Clipped(...) predictor of p_correct, (queries, tiers)
    cost: Any  # predictor of cost, (queries, tiers)
    lam: float
    chosen: str
    cost_model: str
    calibrated: bool
    report: dict[str, Any] = field(default_factory=dict)  # what the inner cross-validation measured


def candidates_for(cfg: TrainConfig, ds: Dataset) -> list[str]:
    names = []
    for n in cfg.candidates:
        if not usable(n, ds):
            log.warning("skipping candidate %s: featurize.embedding is none", n)
            continue
        if n == "blend" and len(blend_members(cfg, ds)) < 2:
            continue
        names.append(n)
    return names


def fit_router(ds: Dataset, rows: np.ndarray, cfg: TrainConfig, policy: PolicyConfig) -> FittedRouter:
    """Choose, calibrate and fit a router on ``rows`` alone (see the module docstring)."""
    with threads(cfg.threads):
        return _fit_router(ds, rows, cfg, policy)


def threads(n: int):
    """Cap BLAS/OpenMP thread pools while fitting (see ``TrainConfig.threads``)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n)


def _fit_router(ds: Dataset, rows: np.ndarray, cfg: TrainConfig, policy: PolicyConfig) -> FittedRouter:
    from router.models import Calibrated, Clipped

    rows = np.asarray(rows)
    check_table(ds, rows)
    names = [t["name"] for t in ds.tiers]
    folds = min(cfg.inner_folds, len(rows) // 2)
    if folds < 2:
        raise ValueError(f"{len(rows)} queries are too few to choose a model by cross-validation (need >= 4)")
    fold = fold_ids(len(rows), folds, cfg.seed)
    Y, Cost = ds.Y[rows], ds.Cost[rows]

    def oof(fit: Callable[[np.ndarray], Any]) -> np.ndarray:
        out = np.empty_like(Y)
        for f in range(folds):
            m = fit(rows[fold != f])
            out[fold == f] = m.predict(ds.X[rows[fold == f]])
        return out

    # cost first: the success candidates' routing scores use its out-of-fold predictions
    cost_oof, cost_scores = {}, {}
    for cname in cfg.cost_candidates:
        cost_oof[cname] = np.maximum(oof(lambda r, c=cname: fit_cost(c, ds, r, cfg)), 0.0)
        err = np.abs(cost_oof[cname] - Cost)
        cost_scores[cname] = {"mae": float(err.mean()),
                              "per_tier": {n: float(err[:, i].mean()) for i, n in enumerate(names)}}
    cost_choice = min(cost_scores, key=lambda k: (cost_scores[k]["mae"], k != "constant"))
    Cp = cost_oof[cost_choice]

    P_oof, scores = {}, {}
    todo = candidates_for(cfg, ds)
    members = blend_members(cfg, ds)
    for name in [n for n in todo if n != "blend"] + [n for n in members if n not in todo]:
        P_oof[name] = np.clip(oof(lambda r, n=name: fit_success(n, ds, r, cfg)), 0.0, 1.0)
    if "blend" in todo:
        P_oof["blend"] = np.mean([P_oof[n] for n in members], axis=0)
    for name in todo:
        s = prob_scores(P_oof[name], Y)
        s.update({f"cv_{k}": v for k, v in routing_score(P_oof[name], Cp, Y, Cost).items()})
        scores[name] = s
        log.info("%-14s cv brier %.4f  apgr %s", name, s["brier"], s["cv_apgr"])

    def key(n):
        s = scores[n]
        if cfg.select_by == "apgr" and s["cv_apgr"] is not None:
            return (-round(s["cv_apgr"], 6), s["brier"])
        return (0.0, s["brier"])

    chosen = min(scores, key=key)
    P_report = P_oof[chosen]
    success = fit_success(chosen, ds, rows, cfg)
    calib: dict[str, Any] = {"applied": False}
    if cfg.calibrate and chosen != "constant":
        nested = crossfit_calibration(P_oof[chosen], Y, seed=cfg.seed)
        before, after = prob_scores(P_oof[chosen], Y)["brier"], prob_scores(nested, Y)["brier"]
        calib = {"cv_brier_before": before, "cv_brier_after_out_of_fold": after, "applied": after < before}
        if after < before:
            # fitted on out-of-fold predictions, applied to the model refitted on all rows
            a, b = platt(P_oof[chosen], Y, cfg.seed)
            success = Calibrated(success, a, b)
            P_report = nested
    # the operating point, on the out-of-fold curve of what will be shipped (calibrated: cross-fitted)
    lam, how = solve_operating_point(P_report, Cp, Y, Cost, policy)
    final = prob_scores(P_report, Y)
    report = {
        "rows": int(len(rows)), "inner_folds": int(folds), "chosen": chosen, "cost_model": cost_choice,
        "calibration": calib, "lambda": lam, "lambda_solved_by": how,
        "cv_brier": final["brier"], "cv_log_loss": final["log_loss"], "cv_auc": final["auc"],
        "cv_apgr": scores[chosen]["cv_apgr"], "per_tier_brier": [p["brier"] for p in final["per_tier"]],
        "models": scores, "cost_models": cost_scores,
    }
    return FittedRouter(Clipped(success, 0.0, 1.0), fit_cost(cost_choice, ds, rows, cfg), lam, chosen,
                        cost_choice, calib["applied"], report)


def solve_operating_point(P, Cp, Y, Cost, cfg: PolicyConfig) -> tuple[float, dict[str, Any]]:
    """Lambda on the given (out-of-fold) rows: fixed, or the cheapest reaching the target."""
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


def fit_baseline(name: str, ds: Dataset, rows: np.ndarray, cfg: TrainConfig):
    """A baseline as a reviewer would build it: the candidate alone on ``rows``, no selection or
    calibration, each tier priced at its mean cost on ``rows``."""
    from router.models import Clipped, Constant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        success = Clipped(fit_success(name, ds, rows, cfg), 0.0, 1.0)
    return success, Constant(ds.Cost[rows].mean(axis=0))
