"""A realistic router bundle without the pipeline: synthetic arithmetic queries and outcomes.

Queries are arithmetic questions whose numbers have 1 to 7 digits; each tier's chance of
answering depends on that size (cheap tiers fail on big numbers, costly ones hold on), so
a trained model has something real to learn. Features come from the real featurizer, models
from ``pipelines.learn``'s own fitting functions, and the bundle is written with the same
manifest layout as ``pipelines/export.py``.

    from tests.router.bundle_fixture import make_bundle
    path = make_bundle(tmp_dir)                 # -> Path to the bundle folder
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# (name, model, budget, samples, cost_per_token, intercept, slope per digit)
TIERS = (
    ("small-b0-k1", "small", 0, 1, 1.0, 3.0, 1.3),
    ("small-b64-k1", "small", 64, 1, 1.0, 4.5, 1.0),
    ("small-b256-k1", "small", 256, 1, 1.0, 5.5, 0.8),
    ("small-b256-k4", "small", 256, 4, 1.0, 6.5, 0.75),
    ("big-b128-k1", "big", 128, 1, 4.0, 8.0, 0.7),
)
TEMPLATES = (
    "What is {a} + {b}?",
    "What is {a} * {b}?",
    "Compute {a} - {b}.",
    "Tom has {a} apples and gives {b} of them away. How many apples are left?",
    "A shop sells {a} pens per day for {b} days. How many pens does it sell in total?",
    "Each box holds {b} marbles. How many marbles are in {a} boxes?",
    "Sara saved {a} dollars and spent {b} dollars. How much money does she have now?",
    "A train travels {a} km on Monday and {b} km on Tuesday. What is the total distance?",
)


@dataclass
class BuiltBundle:
    """The bundle plus what built it, so tests can compare the runtime with training."""

    path: Path
    texts: list[str]
    split: np.ndarray  # "train" / "val" / "test" per query
    X: np.ndarray  # features from the pipeline's featurizer (sentence-transformers)
    Y: np.ndarray  # synthetic p_correct per tier
    Cost: np.ndarray
    success: Any  # the training-side predictors, before they were saved
    cost: Any
    featurizer: Any
    manifest: dict

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]


def synthetic_queries(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` arithmetic questions and the digit count of their larger number."""
    rng = random.Random(seed)
    texts, digits = [], []
    for i in range(n):
        d = 1 + i % 7  # every size equally often
        a = rng.randint(10 ** (d - 1), 10 ** d - 1)
        b = rng.randint(1, a)
        texts.append(rng.choice(TEMPLATES).format(a=a, b=b))
        digits.append(d)
    return texts, np.asarray(digits, dtype=np.float64)


def true_p_correct(digits: np.ndarray, tiers=TIERS, logit_shift=None) -> np.ndarray:
    """Each tier's true chance of a correct answer per query (n, tiers): a logistic in the digit
    count, ``intercept - slope * digits``, plus ``logit_shift`` ((n, tiers) or broadcastable; None:
    0) to simulate an upstream that got better or worse."""
    digits = np.asarray(digits, dtype=np.float64)
    P = np.empty((len(digits), len(tiers)))
    for t, (_, _, _, k, _, a, s) in enumerate(tiers):
        P[:, t] = a - s * digits
    if logit_shift is not None:
        P += logit_shift
    P = 1 / (1 + np.exp(-P))
    for t, row in enumerate(tiers):
        if row[3] > 1:  # majority of k: better when p > 1/2
            p = P[:, t]
            P[:, t] = np.clip(p + 0.3 * (p - 0.5) * (1 - abs(2 * p - 1)), 0, 1)
    return P


def synthetic_outcomes(digits: np.ndarray, seed: int = 0, tiers=TIERS) -> tuple[np.ndarray, np.ndarray]:
    """Soft p_correct (8 simulated samples of ``true_p_correct`` per tier) and cost (tokens x price)
    per query."""
    rng = np.random.default_rng(seed)
    n = len(digits)
    Y = np.empty((n, len(tiers)))
    C = np.empty((n, len(tiers)))
    P = true_p_correct(digits, tiers)
    for t, (_, _, budget, k, price, _, _) in enumerate(tiers):
        Y[:, t] = rng.binomial(8, P[:, t]) / 8
        tokens = 4 + np.minimum(budget, 10 + 25 * digits + rng.normal(0, 6, n).clip(-12, 12))
        C[:, t] = np.maximum(tokens, 1) * k * price
    return Y, C


def build_bundle(tmp_dir: str | Path, n_queries: int = 120, onnx: bool = True, seed: int = 0,
                 featurizer=None, static: bool = False, tiers=TIERS, execution=None) -> BuiltBundle:
    """Build the bundle in ``tmp_dir/router`` and return it with its training-side objects.

    ``static``: trained and served on the distilled static embedding (no ONNX graph). ``tiers``:
    rows like ``TIERS``. ``execution``: {model: ``router.execution.ModelExecution``}, written as
    the manifest's ``execution`` section the way export writes it (None: no section)."""
    from pipelines.export import ood_reference, versions
    from pipelines.artifacts import Dataset
    from pipelines.config import TrainConfig
    from pipelines.learn import fit_cost, fit_success
    from router.bundle import write_manifest
    from router.featurizer import Featurizer, FeaturizerSpec
    from router.models import Clipped
    from router.policy import choose_batch, solve_lambda

    texts, digits = synthetic_queries(n_queries, seed)
    Y, Cost = synthetic_outcomes(digits, seed, tiers)
    static_kwargs = {}
    if static:
        from pipelines.static_distill import static_files
        from router.featurizer import MINILM_STATIC

        files = static_files()
        static_kwargs = {"table_path": files["table"], "tokenizer_path": files["tokenizer"]}
        spec = FeaturizerSpec(embedding=MINILM_STATIC)
    else:
        spec = FeaturizerSpec()
    fz = featurizer or Featurizer(spec, encoder_kwargs=static_kwargs)
    X = fz.transform(texts).astype(np.float64)
    split = np.asarray(["train", "train", "train", "val", "test"] * (n_queries // 5 + 1))[:n_queries]
    tier_rows = tiers
    tiers = [{"name": n, "model": m, "budget": b, "samples": k, "cost_per_token": p}
             for n, m, b, k, p, _, _ in tier_rows]
    names = [t["name"] for t in tiers]
    ds = Dataset([f"q{i:04d}" for i in range(n_queries)], split, X, Y, Cost, tiers, spec.feature_names())
    tr, va = ds.rows("train"), ds.rows("val")
    cfg = TrainConfig(lgbm={**TrainConfig().lgbm, "n_estimators": 60})
    success = Clipped(fit_success("lgbm_joint", ds, tr, cfg), 0.0, 1.0)
    cost = fit_cost("constant", ds, tr, cfg)

    out = Path(tmp_dir) / "router"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s_meta, c_meta = success.save(out, "success_"), cost.save(out, "cost_")
    P_va, C_va = success.predict(X[va]), cost.predict(X[va])
    # an operating point between the cheapest and the most accurate tier, so decisions vary
    lam = solve_lambda(P_va, C_va, target_cost=float(np.median(C_va.mean(axis=0))))
    chosen = choose_batch(P_va, C_va, lam)
    val_acc, val_cost = Y[va].mean(axis=0), Cost[va].mean(axis=0)
    policy: dict[str, Any] = {
        "rule": "argmax p - lambda * cost",
        "lambda": float(lam),
        "lambda_solved_by": "target_cost",
        "fallback_tier": names[int(np.lexsort((val_cost, -val_acc))[0])],
        "cheapest_tier": names[int(np.argmin(val_cost))],
        # longest single sequence, over train and validation like export's: samples run in parallel
        "tier_latency_tokens": [float(Cost[split != "test", i].mean() / t["samples"] / t["cost_per_token"])
                                for i, t in enumerate(tiers)],
    }
    ref, thr = ood_reference(X[tr], X[va], ds.feature_names, 0.01)
    np.save(out / "ood_ref.npy", ref.astype(np.float16).astype(np.float32), allow_pickle=False)
    policy.update(ood_ref="ood_ref.npy", ood_min_similarity=thr)
    encoder = None
    if static:
        (out / "encoder").mkdir()
        shutil.copyfile(static_kwargs["table_path"], out / "encoder" / "static.npy")
        shutil.copyfile(static_kwargs["tokenizer_path"], out / "encoder" / "tokenizer.json")
        encoder = {"static": "encoder/static.npy", "tokenizer": "encoder/tokenizer.json"}
    elif onnx:
        from pipelines.onnx_export import export_minilm_onnx

        # the parity check inside the export is what test_runtime measures more thoroughly
        encoder = {k: f"encoder/{v}" for k, v in export_minilm_onnx(out / "encoder", check=False).items()}
    manifest = {
        "name": "difficulty-router",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tiers": tiers,
        "featurizer": spec.to_dict(),
        "feature_names": spec.feature_names(),
        "encoder": encoder,
        "success": s_meta,
        "cost": c_meta,
        "policy": policy,
        "training": {"chosen": "lgbm_joint", "cost_model": "constant", "calibrated": False,
                     "train_queries": int(len(tr)), "val_queries": int(len(va)), "seed": seed,
                     "synthetic": True, "val_tier_mix": np.bincount(chosen, minlength=len(tiers)).tolist()},
        "metrics": {"router_accuracy": None},
        "versions": versions(),
    }
    if execution is not None:
        from router.execution import execution_section

        manifest["execution"] = execution_section(execution)
    manifest = write_manifest(out, manifest)
    return BuiltBundle(out, texts, split, X, Y, Cost, success, cost, fz, manifest)


def make_bundle(tmp_dir: str | Path, n_queries: int = 120, onnx: bool = True, static: bool = False) -> Path:
    """Write a realistic bundle into ``tmp_dir`` and return its path."""
    return build_bundle(tmp_dir, n_queries=n_queries, onnx=onnx, static=static).path


_SESSION: dict = {}


def session_bundle(tmp_path_factory, n_queries: int = 120, onnx: bool = True, static: bool = False) -> BuiltBundle:
    """One bundle per test session (pytest's ``tmp_path_factory``), shared by every test file."""
    key = (n_queries, onnx, static)
    if key not in _SESSION:
        _SESSION[key] = build_bundle(tmp_path_factory.mktemp("bundle"), n_queries=n_queries, onnx=onnx,
                                     static=static)
    return _SESSION[key]


# a bundle to serve with the proxy: two models (both SmolLM2 behind llama.cpp's server in the
# tests) with small budgets, since one busy core makes ~30-100 tokens per second
PROXY_TIERS = (
    ("small-b0-k1", "small", 0, 1, 1.0, 3.0, 1.3),
    ("small-b8-k1", "small", 8, 1, 1.0, 4.5, 1.0),
    ("small-b16-k1", "small", 16, 1, 1.0, 5.5, 0.8),
    ("small-b16-k3", "small", 16, 3, 1.0, 6.5, 0.75),
    ("big-b12-k1", "big", 12, 1, 4.0, 8.0, 0.7),
)
PROXY_SYSTEM = "Solve the problem. Think step by step, briefly. End with: The final answer is <answer>."


def proxy_execution(tokens_per_second: float | None = 50.0):
    """The execution settings of both proxy-bundle models: SmolLM2's chat template."""
    from router.execution import ModelExecution

    return ModelExecution(template="chatml", system_prompt=PROXY_SYSTEM, answer_tokens=8,
                          tokens_per_second=tokens_per_second)


def build_proxy_bundle(tmp_dir: str | Path, n_queries: int = 60) -> BuiltBundle:
    """A static-embedding (the fastest featurizer) bundle of the proxy tiers, both models executed
    with SmolLM2's chat template."""
    ex = proxy_execution()
    return build_bundle(tmp_dir, n_queries=n_queries, static=True, tiers=PROXY_TIERS,
                        execution={"small": ex, "big": ex})


def session_proxy_bundle(tmp_path_factory, n_queries: int = 60) -> BuiltBundle:
    """One ``build_proxy_bundle`` per test session (and size)."""
    key = ("proxy", n_queries)
    if key not in _SESSION:
        _SESSION[key] = build_proxy_bundle(tmp_path_factory.mktemp("proxy_bundle"), n_queries)
    return _SESSION[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy to tamper with. The 90 MB ONNX file is hard-linked, not copied: tests
    must not modify it in place (deleting or replacing it is fine)."""

    def link_or_copy(s, d):
        if Path(s).suffix == ".onnx":
            try:
                os.link(s, d)
                return d
            except OSError:  # another file system: copy
                pass
        return shutil.copy2(s, d)

    return Path(shutil.copytree(src, dst, copy_function=link_or_copy))
