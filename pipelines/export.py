"""The export stage: the versioned router bundle and the MLflow registered model.

``models/router/`` holds ``manifest.json`` (schema version, tiers, featurizer spec, policy
and lambda, training metadata, headline metrics, library versions, sha256 of every file) and
the model files in data formats only. The same bundle is logged to MLflow as a pyfunc model,
registered as ``difficulty-router`` with the alias ``champion``.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    out_dir: str = "models/router"
    onnx_encoder: bool = True  # ship MiniLM as ONNX so the runtime needs no torch
    registered_model: str = "difficulty-router"
    alias: str = "champion"
    register: bool = True


def export_config(params: Params) -> ExportConfig:
    from pipelines.config import build

    return build(ExportConfig, params.extra.get("export"), "export")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "lightgbm", "scikit-learn", "onnxruntime", "tokenizers", "sentence-transformers",
                "torch", "llama-cpp-python", "difficulty-router"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def ood_reference(train_X: np.ndarray, val_X: np.ndarray, names: list[str], quantile: float):
    """Training embeddings and the similarity below which a query counts as unfamiliar:
    the ``quantile`` of validation queries' nearest-training-neighbour similarity."""
    emb = [i for i, n in enumerate(names) if n.startswith("emb_")]
    if not emb or len(val_X) == 0:
        return None, None
    lo, hi = emb[0], emb[-1] + 1

    def unit(a):
        a = a[:, lo:hi].astype(np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    ref = unit(train_X)
    sims = (unit(val_X) @ ref.T).max(axis=1)
    return ref, float(np.quantile(sims, quantile))


def export(params: Params) -> dict[str, Any]:
    from pipelines.evaluate import evaluate_config, policy_config
    from pipelines.featurize import featurize_config
    from pipelines.label import label_config
    from pipelines.tracking import stage_run
    from pipelines.train import load_dataset, load_model, train_config
    from router.bundle import write_manifest
    from router.featurizer import MINILM_STATIC

    cfg, tcfg, ecfg, pcfg = export_config(params), train_config(params), evaluate_config(params), policy_config(params)
    lcfg, fcfg = label_config(params), featurize_config(params)
    ev = json.loads(Path(ecfg.metrics).read_text())
    tr_metrics = json.loads(Path(tcfg.metrics).read_text())
    success, cost, meta = load_model(tcfg.out_dir)
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    s_meta = success.save(tmp, "success_")
    c_meta = cost.save(tmp, "cost_")

    train = load_dataset(lcfg.out, fcfg.out, lcfg.tiers_out, splits=("train",))
    val = load_dataset(lcfg.out, fcfg.out, lcfg.tiers_out, splits=("val",))
    names = [t["name"] for t in meta["tiers"]]
    both_lat = _latency(lcfg.out, names)
    val_acc = val.Y.mean(axis=0)
    fallback = names[int(np.lexsort((val.Cost.mean(axis=0), -val_acc))[0])]
    policy: dict[str, Any] = {
        "rule": "argmax p - lambda * cost",
        "lambda": float(ev["lambda"]),
        "lambda_solved_by": ev.get("lambda_solved_by"),
        "fallback_tier": fallback,  # most accurate on validation: the safe choice when unsure
        "cheapest_tier": names[int(np.argmin(val.Cost.mean(axis=0)))],
        "tier_latency_tokens": both_lat,
    }
    ref, thr = ood_reference(train.X, val.X, train.feature_names, pcfg.ood_quantile)
    if ref is not None:
        np.save(tmp / "ood_ref.npy", ref.astype(np.float16).astype(np.float32), allow_pickle=False)
        policy.update(ood_ref="ood_ref.npy", ood_min_similarity=thr)
    encoder = None
    embedding = meta["featurizer"].get("embedding")
    if embedding == MINILM_STATIC:  # the table is the encoder: no ONNX graph needed
        from pipelines.static_distill import static_files
        from router.static_encoder import TABLE_FILE, TOKENIZER_FILE

        files = static_files()
        (tmp / "encoder").mkdir()
        shutil.copyfile(files["table"], tmp / "encoder" / TABLE_FILE)
        shutil.copyfile(files["tokenizer"], tmp / "encoder" / TOKENIZER_FILE)
        encoder = {"static": f"encoder/{TABLE_FILE}", "tokenizer": f"encoder/{TOKENIZER_FILE}"}
    elif cfg.onnx_encoder and embedding != "none":
        from pipelines.onnx_export import export_minilm_onnx

        encoder = export_minilm_onnx(tmp / "encoder")
        encoder = {k: f"encoder/{v}" for k, v in encoder.items()}
    headline = {k: ev.get(k) for k in ("router_accuracy", "router_mean_cost", "best_fixed_tier", "best_fixed_accuracy",
                                       "best_fixed_mean_cost", "compute_saved_at_iso_accuracy", "apgr", "cpt50",
                                       "cpt80", "aiq", "oracle_accuracy", "oracle_mean_cost", "ece", "brier")}
    manifest = {
        "name": cfg.registered_model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tiers": meta["tiers"],
        "featurizer": meta["featurizer"],
        "feature_names": meta["feature_names"],
        "encoder": encoder,
        "success": s_meta,
        "cost": c_meta,
        "policy": policy,
        "training": {"chosen": meta["chosen"], "cost_model": meta["cost_model"], "calibrated": meta["calibrated"],
                     "train_queries": tr_metrics.get("train_queries"), "val_queries": tr_metrics.get("val_queries"),
                     "val_brier": tr_metrics.get("val_brier"), "seed": params.seed},
        "metrics": headline,
        "versions": versions(),
    }
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"bundle": str(out), "files": len(manifest) and len(list(out.rglob("*.*"))), "bytes": size,
              "lambda": policy["lambda"], "registered": None}
    with stage_run(params.mlflow, "export") as run:
        run.log_params({"export": asdict(cfg)})
        run.log_metrics({"bundle_bytes": size})
        if cfg.register and params.mlflow.enabled:
            result["registered"] = register(out, cfg)
            run.set_tags({"registered_version": result["registered"]})
    return result


def _latency(outcomes_path: str, names: list[str]) -> list[float]:
    """Mean latency tokens per tier over train and validation (caps compare against it)."""
    import pandas as pd

    out = pd.read_parquet(outcomes_path, columns=["tier", "split", "latency_tokens"])
    out = out[out["split"] != "test"]
    m = out.groupby("tier")["latency_tokens"].mean()
    return [float(m.get(n, 0.0)) for n in names]


def register(bundle: Path, cfg: ExportConfig) -> str:
    """Log the bundle as an MLflow pyfunc model, register it and point the alias at it."""
    import mlflow
    from mlflow import MlflowClient

    code = Path(__file__).resolve().parents[1] / "router" / "mlflow_model.py"
    info = mlflow.pyfunc.log_model(
        name="router",
        python_model=str(code),  # models-from-code: no pickled Python object in the model
        artifacts={"bundle": str(bundle)},
        registered_model_name=cfg.registered_model,
        pip_requirements=["difficulty-router"],
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(cfg.registered_model, cfg.alias, version)
    return version


def main(argv=None) -> None:
    from pipelines.config import load_params, stage_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_args("export: the router bundle and the MLflow registered model", argv)
    print(json.dumps(export(load_params(args.params))))


if __name__ == "__main__":
    main()
