"""The export stage: the versioned router bundle and the MLflow registered model.

``models/router/`` holds ``manifest.json`` (schema version, tiers, featurizer spec, policy
and lambda, training metadata, headline metrics, library versions, sha256 of every file) and
the model files in data formats only. The same bundle is logged to MLflow as a pyfunc model,
registered as a new version of ``difficulty-router``; the promotion gate (``pipelines.promotion``)
moves the alias ``champion`` to it only if it beats the current champion, else it gets ``challenger``.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage

log = logging.getLogger(__name__)

SECTIONS = ("seed", "models", "rollout", "label", "featurize", "train", "policy", "evaluate", "export")


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


def export(params: Params, run=NULL_RUN) -> dict[str, Any]:
    """Write the bundle (whole folder or nothing) and, inside an MLflow run, register it."""
    from router.bundle import write_manifest
    from router.featurizer import MINILM, MINILM_STATIC

    cfg, tcfg, ecfg, pcfg = params.export, params.train, params.evaluate, params.policy
    ev = artifacts.read_json(ecfg.metrics)
    tr_metrics = artifacts.read_json(tcfg.metrics)
    success, cost, meta = artifacts.load_model(tcfg.out_dir)
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    s_meta = success.save(tmp, "success_")
    c_meta = cost.save(tmp, "cost_")

    train = artifacts.load_dataset(params.label, params.featurize, splits=("train",))
    val = artifacts.load_dataset(params.label, params.featurize, splits=("val",))
    names = [t["name"] for t in meta["tiers"]]
    both_lat = _latency(params.label.out, names)
    val_acc = val.Y.mean(axis=0)
    fallback = names[int(np.lexsort((val.Cost.mean(axis=0), -val_acc))[0])]
    policy: dict[str, Any] = {
        "rule": "argmax p - lambda * cost",
        "lambda": float(meta["lambda"]),
        "lambda_solved_by": meta.get("lambda_solved_by"),
        "fallback_tier": fallback,  # most accurate on validation: the safe choice when unsure
        "cheapest_tier": names[int(np.argmin(val.Cost.mean(axis=0)))],
        "tier_latency_tokens": both_lat,
        "explore": float(pcfg.explore),  # the proxy's default exploration rate (router.policy.explore_choice)
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
    elif cfg.onnx_encoder and embedding in (MINILM,):
        from pipelines.onnx_export import export_minilm_onnx

        encoder = export_minilm_onnx(tmp / "encoder")
        encoder = {k: f"encoder/{v}" for k, v in encoder.items()}
    headline = {k: ev.get(k) for k in ("evaluated_queries", "cv_folds", "apgr_vs_logreg", "router_accuracy", "router_mean_cost", "best_fixed_tier", "best_fixed_accuracy",
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
                     "train_queries": tr_metrics.get("train_queries"), "cv_brier": tr_metrics.get("cv_brier"),
                     "cv_apgr": tr_metrics.get("cv_apgr"), "evaluation": tr_metrics.get("evaluation"),
                     # what the fitting procedure chose in each evaluation fold
                     "folds": ev.get("folds"), "seed": params.seed,
                     # which labelled queries "metrics" were measured on (the promotion gate's key)
                     "data_digest": artifacts.labelled_data_digest(params.label.out)},
        "metrics": headline,
        "versions": versions(),
    }
    execution = execution_settings(params, sorted({t["model"] for t in meta["tiers"]}))
    if execution:
        manifest["execution"] = execution
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"bundle": str(out), "files": len(manifest) and len(list(out.rglob("*.*"))), "bytes": size,
              "lambda": policy["lambda"], "registered": None}
    run.log_metrics({"bundle_bytes": size})
    if cfg.register and run.run_id is not None:  # registering needs the stage's MLflow run
        result["registered"], promotion = register(out, params)
        result["promotion"] = promotion["decision"]
        run.set_tags({"registered_version": result["registered"], "promotion": promotion["decision"],
                      "promotion_reason": promotion["reason"][:5000]})
        run.log_artifact(cfg.promotion_report)
    else:  # the report always exists (dvc.yaml declares it): say why nothing was promoted
        why = "export.register is false" if not cfg.register else "MLflow tracking is off (no stage run)"
        artifacts.write_json(cfg.promotion_report, {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": cfg.registered_model,
            "version": None, "decision": None, "reason": f"not registered: {why}", "checks": {}})
    return result


def execution_settings(params: Params, models: list[str]) -> dict[str, Any] | None:
    """The manifest's ``execution`` section: how each model's tiers were generated, so the proxy
    and ``router.executor`` execute a decision as the labels assumed (``router.execution``).

    Models the params do not declare (an imported outcome table's tiers) get no entry: a bundle
    can route without them, and serving it says which are missing. The speed is the rollout's
    measured generation rate for the model (``metrics/rollout.json``), if it ran."""
    from router.execution import ModelExecution, execution_section
    from router.generation import SamplingConfig

    r = params.rollout
    declared = [m for m in models if m in params.models]
    if not declared:
        return None
    speeds: dict[str, float] = {}
    if Path(r.metrics).exists():
        rm = artifacts.read_json(r.metrics)
        speeds = dict(rm.get("tokens_per_second_by_model") or {})
        if not speeds and rm.get("tokens_per_second") and len(str(rm.get("model") or "").split(",")) == 1:
            speeds = {rm["model"]: rm["tokens_per_second"]}
    sampling = SamplingConfig.of(params.rollout)
    return execution_section({
        m: ModelExecution(template=params.models[m].template, system_prompt=r.system_prompt,
                          force_suffix=r.force_suffix, direct_prefix=r.direct_prefix, answer_tokens=r.answer_tokens,
                          sampling=sampling, tokens_per_second=speeds.get(m) or None)
        for m in declared})


def _latency(outcomes_path: str, names: list[str]) -> list[float]:
    """Mean latency tokens per tier over train and validation (caps compare against it)."""
    out = artifacts.read_outcomes(outcomes_path, splits=("train", "val"), columns=["tier", "split", "latency_tokens"])
    m = out.groupby("tier")["latency_tokens"].mean()
    return [float(m.get(n, 0.0)) for n in names]


def register(bundle: Path, params: Params) -> tuple[str, dict[str, Any]]:
    """Log the bundle as an MLflow pyfunc model and register it as a candidate version; the
    promotion gate (``pipelines.promotion``) decides whether the alias ``champion`` moves to it
    (else it gets ``challenger``). Returns (version, the gate's report)."""
    import mlflow

    from pipelines.promotion import client, gate

    cfg = params.export

    code = Path(__file__).resolve().parents[1] / "router" / "mlflow_model.py"
    info = mlflow.pyfunc.log_model(
        name="router",
        python_model=str(code),  # models-from-code: no pickled Python object in the model
        artifacts={"bundle": str(bundle)},
        registered_model_name=cfg.registered_model,
        pip_requirements=["difficulty-router"],
    )
    version = str(info.registered_model_version)
    return version, gate(params, bundle, version, client(params))


def main(argv=None) -> dict:
    return run_stage("export", export, argv, sections=SECTIONS,
                     description="export: the router bundle and the MLflow registered model")


if __name__ == "__main__":
    main()
