"""Success and cost predictors in non-executable formats (JSON, .npy, LightGBM text).

Training fits scikit-learn and LightGBM estimators, converts them to these classes, and
scores validation and test rows *through these classes*, so what the evaluation measured
is exactly what the runtime computes. Every class predicts a (queries, tiers) matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EPS = 1e-6


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def logit(p):
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def tier_features(tiers: list[dict], models: list[str]) -> np.ndarray:
    """Features of a tier for joint models: depth, width, direct, and which model."""
    rows = []
    for t in tiers:
        one_hot = [1.0 if t["model"] == m else 0.0 for m in models]
        rows.append([np.log1p(t["budget"]), np.log2(t["samples"]), float(t["budget"] == 0), *one_hot])
    return np.asarray(rows, dtype=np.float64)


def joint_rows(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    """(queries x tiers) rows of [query features, tier features], query-major."""
    n, t = len(X), len(T)
    return np.concatenate([np.repeat(X, t, axis=0), np.tile(T, (n, 1))], axis=1)


class Predictor:
    """Base: ``predict(X) -> (queries, tiers)``; ``save(dir) -> meta``; ``load(dir, meta)``."""

    kind = "base"

    def predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, d: Path, prefix: str) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


class Constant(Predictor):
    """Per-tier base rate (success) or mean (cost): the baseline every model must beat."""

    kind = "constant"

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def predict(self, X):
        return np.tile(self.values, (len(X), 1))

    def save(self, d, prefix):
        return {"kind": self.kind, "values": self.values.tolist()}

    @classmethod
    def load(cls, d, meta):
        return cls(meta["values"])


class Linear(Predictor):
    """Per-tier logistic (success) or linear (cost) model on standardized features."""

    kind = "linear"

    def __init__(self, coef, intercept, mean, scale, link: str = "logistic"):
        self.coef = np.asarray(coef, dtype=np.float64)  # (tiers, features)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.link = link

    def predict(self, X):
        z = ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        return sigmoid(z) if self.link == "logistic" else z

    def save(self, d, prefix):
        f = f"{prefix}linear.npz.json"
        (d / f).write_text(json.dumps({"coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                                       "mean": self.mean.tolist(), "scale": self.scale.tolist()}))
        return {"kind": self.kind, "file": f, "link": self.link}

    @classmethod
    def load(cls, d, meta):
        w = json.loads((d / meta["file"]).read_text())
        return cls(w["coef"], w["intercept"], w["mean"], w["scale"], meta.get("link", "logistic"))


class Knn(Predictor):
    """Mean outcome of the k nearest training queries by cosine similarity of embeddings."""

    kind = "knn"

    def __init__(self, ref, targets, k: int, cols: tuple[int, int], temperature: float | None = None):
        self.ref = np.asarray(ref, dtype=np.float32)  # (n, d) unit-normalized embeddings
        self.targets = np.asarray(targets, dtype=np.float64)  # (n, tiers)
        self.k = int(k)
        self.cols = (int(cols[0]), int(cols[1]))  # the embedding's slice of the feature row
        # None: plain mean of the k neighbours; else weights exp((sim - best sim) / temperature)
        self.temperature = None if temperature is None else float(temperature)

    def predict(self, X):
        e = np.asarray(X, dtype=np.float32)[:, self.cols[0]:self.cols[1]]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        out = np.empty((len(e), self.targets.shape[1]))
        k = min(self.k, len(self.ref))
        for lo in range(0, len(e), 1024):  # bounded memory for big batches
            sims = e[lo:lo + 1024] @ self.ref.T
            idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            if self.temperature is None:
                out[lo:lo + 1024] = self.targets[idx].mean(axis=1)
                continue
            s = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
            w = np.exp((s - s.max(axis=1, keepdims=True)) / self.temperature)
            out[lo:lo + 1024] = np.einsum("nk,nkt->nt", w / w.sum(axis=1, keepdims=True), self.targets[idx])
        return out

    def save(self, d, prefix):
        np.save(d / f"{prefix}knn_ref.npy", self.ref, allow_pickle=False)
        np.save(d / f"{prefix}knn_targets.npy", self.targets, allow_pickle=False)
        return {"kind": self.kind, "ref": f"{prefix}knn_ref.npy", "targets": f"{prefix}knn_targets.npy",
                "k": self.k, "cols": list(self.cols), "temperature": self.temperature}

    @classmethod
    def load(cls, d, meta):
        return cls(np.load(d / meta["ref"], allow_pickle=False), np.load(d / meta["targets"], allow_pickle=False),
                   meta["k"], tuple(meta["cols"]), meta.get("temperature"))


def _booster(text: str):
    import lightgbm as lgb

    return lgb.Booster(model_str=text)


class PerTierLgbm(Predictor):
    """One LightGBM model per tier."""

    kind = "lgbm_per_tier"

    def __init__(self, boosters: list, link: str = "identity"):
        self.boosters = boosters
        self.link = link

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        out = np.stack([b.predict(X, num_threads=1) for b in self.boosters], axis=1)
        return out

    def save(self, d, prefix):
        files = []
        for i, b in enumerate(self.boosters):
            f = f"{prefix}lgbm_tier{i:03d}.txt"
            (d / f).write_text(b.model_to_string())
            files.append(f)
        return {"kind": self.kind, "files": files}

    @classmethod
    def load(cls, d, meta):
        return cls([_booster((d / f).read_text()) for f in meta["files"]])


class JointLgbm(Predictor):
    """One LightGBM model over [query features, tier features]: it sees how tiers relate,
    so it models the gain of a costlier tier, and can score budgets it never saw."""

    kind = "lgbm_joint"

    def __init__(self, booster, tier_feats, transform: str = "identity"):
        self.booster = booster
        self.tier_feats = np.asarray(tier_feats, dtype=np.float64)
        self.transform = transform  # "expm1" when trained on log1p(cost)

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        raw = self.booster.predict(joint_rows(X, self.tier_feats), num_threads=1).reshape(len(X), -1)
        return np.expm1(raw) if self.transform == "expm1" else raw

    def save(self, d, prefix):
        f = f"{prefix}lgbm_joint.txt"
        (d / f).write_text(self.booster.model_to_string())
        return {"kind": self.kind, "file": f, "tier_feats": self.tier_feats.tolist(), "transform": self.transform}

    @classmethod
    def load(cls, d, meta):
        return cls(_booster((d / meta["file"]).read_text()), meta["tier_feats"], meta.get("transform", "identity"))


def gain_matrix(k: int, ref: int) -> np.ndarray:
    """(k, k) map from [gain of each tier over ``ref``, with p_ref in place ``ref``] to p."""
    M = np.eye(k)
    M[ref, :] = 1.0
    return M


class GainLgbm(Predictor):
    """What decides a route is the gain of one tier over another: a LightGBM of the reference
    tier's success and, per other tier, a LightGBM regression of its gain over the reference;
    ``p_t = p_ref + gain_t``."""

    kind = "lgbm_gain"

    def __init__(self, boosters: list, ref: int):
        self.boosters = boosters
        self.ref = int(ref)

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        G = np.stack([b.predict(X, num_threads=1) for b in self.boosters], axis=1)
        return G @ gain_matrix(G.shape[1], self.ref)

    def save(self, d, prefix):
        meta = PerTierLgbm(self.boosters).save(d, f"{prefix}gain_")
        return {**meta, "kind": self.kind, "ref": self.ref}

    @classmethod
    def load(cls, d, meta):
        return cls(PerTierLgbm.load(d, meta).boosters, meta["ref"])


class Sufficient(Predictor):
    """The cumulative "cheapest sufficient tier" model: a multiclass LightGBM over which tier
    (cheapest first) is the cheapest that solves the query, or none; ``p_t = P(first <= t)``.
    ``only``: the single class seen in training, when there was nothing to learn."""

    kind = "sufficient"

    def __init__(self, booster, only: int | None, tiers: int):
        self.booster, self.only, self.tiers = booster, only, int(tiers)

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        if self.booster is None:
            P = np.zeros((len(X), self.tiers + 1))
            P[:, self.only] = 1.0
        else:
            P = self.booster.predict(X, num_threads=1).reshape(len(X), self.tiers + 1)
        return np.cumsum(P, axis=1)[:, :self.tiers]

    def save(self, d, prefix):
        meta = {"kind": self.kind, "only": self.only, "tiers": self.tiers, "file": None}
        if self.booster is not None:
            meta["file"] = f"{prefix}sufficient.txt"
            (d / meta["file"]).write_text(self.booster.model_to_string())
        return meta

    @classmethod
    def load(cls, d, meta):
        b = _booster((d / meta["file"]).read_text()) if meta.get("file") else None
        return cls(b, meta.get("only"), meta["tiers"])


class Blend(Predictor):
    """The mean of several predictors' outputs (an ensemble)."""

    kind = "blend"

    def __init__(self, members: list):
        self.members = list(members)

    def predict(self, X):
        return np.mean([m.predict(X) for m in self.members], axis=0)

    def save(self, d, prefix):
        return {"kind": self.kind, "members": [m.save(d, f"{prefix}m{i}_") for i, m in enumerate(self.members)]}

    @classmethod
    def load(cls, d, meta):
        return cls([load_predictor(d, m) for m in meta["members"]])


def project(X, cols, mean, components) -> np.ndarray:
    """Feature rows with the embedding slice ``cols`` replaced by its principal components."""
    X = np.asarray(X, dtype=np.float64)
    lo, hi = cols
    E = (X[:, lo:hi] - mean) @ components.T
    return np.concatenate([X[:, :lo], X[:, hi:], E], axis=1)


class Projected(Predictor):
    """A model trained on the features with the embedding reduced to its top principal
    components (trees split ~10x faster on 32 components than on 384 raw dimensions)."""

    kind = "projected"

    def __init__(self, base: Predictor, cols, mean, components):
        self.base = base
        self.cols = (int(cols[0]), int(cols[1]))
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)  # (k, embedding dims)

    def predict(self, X):
        return self.base.predict(project(X, self.cols, self.mean, self.components))

    def save(self, d, prefix):
        f = f"{prefix}pca.npy"
        np.save(d / f, np.concatenate([self.mean[None, :], self.components]), allow_pickle=False)
        return {"kind": self.kind, "cols": list(self.cols), "file": f, "base": self.base.save(d, prefix)}

    @classmethod
    def load(cls, d, meta):
        a = np.load(d / meta["file"], allow_pickle=False)
        return cls(load_predictor(d, meta["base"]), meta["cols"], a[0], a[1:])


class Calibrated(Predictor):
    """Per-tier Platt scaling of a success model: ``sigmoid(a * logit(p) + b)``."""

    kind = "calibrated"

    def __init__(self, base: Predictor, a, b):
        self.base = base
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)

    def predict(self, X):
        return sigmoid(self.a * logit(self.base.predict(X)) + self.b)

    def save(self, d, prefix):
        return {"kind": self.kind, "a": self.a.tolist(), "b": self.b.tolist(), "base": self.base.save(d, prefix)}

    @classmethod
    def load(cls, d, meta):
        return cls(load_predictor(d, meta["base"]), meta["a"], meta["b"])


class Corrected(Predictor):
    """A success model boosted further on production outcomes (``pipelines.retrain``): one
    LightGBM model over [query features, one-hot tier] whose raw score is added to the base
    model's logit, ``sigmoid(logit(p) + f(x, tier))``. It was fitted with the base logits as
    its initial scores, so where production taught it nothing it leaves p as it was."""

    kind = "corrected"

    def __init__(self, base: Predictor, booster, tiers: int):
        self.base, self.booster, self.tiers = base, booster, int(tiers)

    def predict(self, X):
        X = np.asarray(X, dtype=np.float64)
        raw = self.booster.predict(joint_rows(X, np.eye(self.tiers)), raw_score=True, num_threads=1)
        return sigmoid(logit(self.base.predict(X)) + raw.reshape(len(X), self.tiers))

    def save(self, d, prefix):
        f = f"{prefix}correction_lgbm.txt"
        (d / f).write_text(self.booster.model_to_string())
        return {"kind": self.kind, "file": f, "tiers": self.tiers, "base": self.base.save(d, prefix)}

    @classmethod
    def load(cls, d, meta):
        return cls(load_predictor(d, meta["base"]), _booster((d / meta["file"]).read_text()), meta["tiers"])


class Clipped(Predictor):
    """Clip predictions into [lo, hi] (probabilities into [0, 1], costs to >= 0)."""

    kind = "clipped"

    def __init__(self, base: Predictor, lo: float | None, hi: float | None):
        self.base, self.lo, self.hi = base, lo, hi

    def predict(self, X):
        return np.clip(self.base.predict(X), self.lo, self.hi)

    def save(self, d, prefix):
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "base": self.base.save(d, prefix)}

    @classmethod
    def load(cls, d, meta):
        return cls(load_predictor(d, meta["base"]), meta["lo"], meta["hi"])


KINDS = {c.kind: c for c in (Constant, Linear, Knn, PerTierLgbm, JointLgbm, GainLgbm, Sufficient, Blend, Projected,
                             Calibrated, Corrected, Clipped)}


def load_predictor(d: str | Path, meta: dict) -> Predictor:
    """Rebuild a predictor from its saved ``meta`` (files relative to ``d``)."""
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind].load(Path(d), meta)
