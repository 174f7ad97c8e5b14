"""The promotion gate: which registered version the alias ``champion`` points at, and why.

Export registers every bundle as a new version of the MLflow registered model (a candidate). The
alias ``export.alias`` (``champion``) moves to it only if it beats the current champion by
``export.promote_margin`` on ``export.promote_metric``:

- **held out** (``export.promote_metric``, ``export.promote_margin``): the candidate's out-of-sample
  figure from ``metrics/evaluate.json`` against the champion's bundle (downloaded from the registry)
  routed on the *same* evaluated queries (every query when evaluation cross-fitted, the test split
  in holdout mode), scored by the same code (``pipelines.routing_metrics``: a lambda sweep realized
  with the labels' accuracy and cost, plus its own operating point). When the champion was fitted
  on the same labelled queries (``training.data_digest`` in its manifest), its own out-of-sample
  figures (manifest ``metrics``) are used instead: routing it there would score it in sample. On
  other data the champion may have been trained on some of the queries, so the comparison leans
  toward keeping it: a conservative gate.
- **off-policy** (when production feedback exists, ``pipelines.off_policy``): both bundles routed on the
  logged text at their operating points, their accuracy and cost estimated from the logged outcomes
  (``export.promote_estimator``, DR by default); the candidate's utility (accuracy - price * cost)
  must be >= the champion's + ``export.promote_ope_margin``. Fewer usable logged requests than
  ``export.promote_min_feedback``, or a log without text: reported, not gating.

Metrics: ``apgr`` (default) and ``aiq`` judge the whole accuracy/cost curve (no price, no operating
point); ``utility`` = accuracy - price * mean cost at each bundle's operating point (price:
``export.promote_price``, else the champion's lambda, the same for both bundles: a candidate's own
lambda would let it pick the price it is judged at); ``router_accuracy``; ``router_mean_cost``
(lower is better). No champion yet: the candidate becomes champion. Refused:
the candidate gets ``export.challenger_alias``. Either way ``export.promotion_report`` (JSON) says
what was compared and why, the model version carries ``promotion.*`` tags, and every alias move
(the gate's and a manual ``python -m pipelines promote``) is appended to ``export.promotion_audit``.
"""

from __future__ import annotations

import getpass
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import artifacts
from pipelines.config import PROMOTE_METRICS, ExportConfig, Params

log = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- comparing two figures


def value(metric: str, figures: dict[str, Any], price: float) -> float | None:
    """The figure ``metric`` names from a bundle's figures (``router_accuracy``, ``router_mean_cost``,
    ``apgr``, ``aiq``); ``utility`` is accuracy - price * mean cost."""
    if metric == "utility":
        acc, cost = figures.get("router_accuracy"), figures.get("router_mean_cost")
        return None if acc is None or cost is None else float(acc - price * cost)
    v = figures.get(metric)
    return None if v is None else float(v)


def compare(metric: str, candidate: float | None, champion: float | None, margin: float) -> dict[str, Any]:
    """Does the candidate beat the champion by ``margin`` (higher or lower is better by metric)?"""
    higher = PROMOTE_METRICS[metric]
    out = {"metric": metric, "margin": margin, "candidate": candidate, "champion": champion}
    if candidate is None or champion is None:  # not comparable: never promotes by itself
        return {**out, "difference": None, "passed": False}
    diff = candidate - champion if higher else champion - candidate  # > 0: the candidate is better
    return {**out, "difference": float(diff), "passed": bool(diff >= margin - 1e-12)}


# ---------------------------------------------------------------- the registry


def client(params: Params):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params.mlflow))
    return MlflowClient()


def alias_version(cl, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None (no such alias, or no such model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(cl.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def download_bundle(name: str, version: str, dst: Path) -> Path:
    """A registered version's router bundle (the pyfunc model's ``bundle`` artifact) under ``dst``."""
    import mlflow

    from router.bundle import MANIFEST

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    found = sorted(p.parent for p in local.rglob(MANIFEST))
    if len(found) != 1:
        raise FileNotFoundError(f"models:/{name}/{version}: expected one router bundle in its artifacts, "
                                f"found {len(found)}")
    return found[0]


def move_alias(cl, cfg: ExportConfig, alias: str, version: str, kind: str, reason: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point ``alias`` at ``version``, tag the version and append the move to the audit log."""
    name = cfg.registered_model
    previous = alias_version(cl, name, alias)
    cl.set_registered_model_alias(name, alias, version)
    record = {"time": _now(), "kind": kind, "model": name, "alias": alias, "version": str(version),
              "previous": previous, "reason": reason, "user": getpass.getuser(), **(extra or {})}
    for k in ("kind", "reason", "time", "user", "previous"):
        cl.set_model_version_tag(name, version, f"{kind}.{alias}.{k}", str(record[k])[:5000])
    artifacts.append_jsonl(cfg.promotion_audit, record)
    return record


# ---------------------------------------------------------------- held-out queries


def evaluated_queries(params: Params, ev: dict[str, Any]):
    """The queries ``evaluate`` scored (all when it cross-fitted, the test split in holdout mode):
    (dataset, rows, texts)."""
    import pandas as pd

    ds = artifacts.load_dataset(params.label, params.featurize, splits=("train", "val", "test"))
    rows = np.arange(len(ds.query_ids)) if ev.get("cv_folds") else ds.rows("test")
    if ev.get("evaluated_queries") is not None and int(ev["evaluated_queries"]) != len(rows):
        raise ValueError(f"{params.evaluate.metrics} evaluated {ev['evaluated_queries']} queries, the labels now "
                         f"give {len(rows)}: rerun evaluate before export")
    text = pd.read_parquet(params.prepare.out, columns=["query_id", "text"]).drop_duplicates("query_id")
    texts = text.set_index("query_id").loc[[ds.query_ids[i] for i in rows], "text"].tolist()
    return ds, rows, texts


FIGURES = ("router_accuracy", "router_mean_cost", "apgr", "aiq", "compute_saved_at_iso_accuracy",
           "best_fixed_accuracy", "best_fixed_mean_cost")


def realized(bundle: Path, ds, rows: np.ndarray, texts: list[str]) -> dict[str, Any]:
    """A bundle's figures on labelled queries, scored as ``evaluate`` scores the candidate: its
    predictions swept over lambda (``routing_metrics.curve``) and its rule ``argmax p - lambda * c``
    at its own lambda (no exploration, no OOD fallback), every choice realized with the labels'
    p_correct and cost."""
    from pipelines.routing_metrics import curve, headline, lambda_grid
    from router.policy import choose_batch
    from router.runtime import Router

    r = Router.load(bundle)
    names = [t["name"] for t in ds.tiers]
    mine = [t.name for t in r.tiers]
    if sorted(mine) != sorted(names):
        return {"queries": int(len(rows)), "lambda": r.lam,
                "error": f"its tiers {mine} are not the labelled tiers {names}"}
    _, P, C = r.predict(texts)
    order = [mine.index(n) for n in names]  # the labels' tier order
    P, C = P[:, order], C[:, order]
    Y, Cost = ds.Y[rows], ds.Cost[rows]
    _, acc, cost = curve(P, C, Y, Cost, lambda_grid(C, 120))
    op = choose_batch(P, C, r.lam)
    at = np.arange(len(rows))
    h = headline(acc, cost, Y, Cost, point=(float(Y[at, op].mean()), float(Cost[at, op].mean())))
    mix = np.bincount(op, minlength=len(names)) / max(len(rows), 1)
    return {"queries": int(len(rows)), "lambda": r.lam, **{k: h.get(k) for k in FIGURES},
            "tier_mix": {n: float(m) for n, m in zip(names, mix) if m > 0}}


def own_figures(manifest: dict[str, Any], candidate_digest: str | None) -> dict[str, Any] | None:
    """The champion's own out-of-sample figures (its manifest's ``metrics``) when it was fitted and
    evaluated on the same labelled queries as the candidate (``training.data_digest``), else None.

    A cross-fitted bundle is fitted on every labelled query, so routing it on those queries would
    score it in sample against the candidate's out-of-sample figure; on the same data the fair
    comparison is the two out-of-sample evaluations."""
    digest = (manifest.get("training") or {}).get("data_digest")
    metrics = manifest.get("metrics") or {}
    if not digest or digest != candidate_digest or metrics.get("apgr") is None:
        return None
    return {"queries": metrics.get("evaluated_queries"), "lambda": (manifest.get("policy") or {}).get("lambda"),
            **{k: metrics.get(k) for k in FIGURES},
            "source": "its own out-of-sample evaluation on the same labelled queries (manifest metrics)"}


# ---------------------------------------------------------------- production feedback


def feedback_path(params: Params) -> Path:
    cfg = params.export
    return Path(cfg.promote_feedback or Path(params.feedback.out_dir) / "feedback.parquet")


def off_policy(params: Params, candidate: Path, champion: Path, price: float) -> dict[str, Any]:
    """Both bundles' off-policy value on the logged traffic (``pipelines.off_policy``), or why not."""
    from pipelines.off_policy import candidate_probabilities, estimate, logged_arrays

    cfg, ocfg = params.export, params.ope
    path = feedback_path(params)
    if not path.exists():
        return {"feedback": str(path), "used": False, "why": "no production feedback"}
    data = logged_arrays(artifacts.read_feedback(path))
    n = int(len(data["rows"]))
    out: dict[str, Any] = {"feedback": str(path), "rows": n, "excluded": data["excluded"],
                           "estimator": cfg.promote_estimator}
    if n < cfg.promote_min_feedback:
        return {**out, "used": False, "why": f"{n} usable logged requests < export.promote_min_feedback "
                                             f"{cfg.promote_min_feedback}"}
    if "text" not in data["rows"] or data["rows"]["text"].isna().any():
        return {**out, "used": False, "why": "the decision log has no text (proxy --log-text): bundles cannot be routed"}
    kw = dict(bootstrap=ocfg.bootstrap, confidence=ocfg.confidence, seed=ocfg.seed, min_propensity=ocfg.min_propensity)
    e = cfg.promote_estimator
    for who, bundle in (("candidate", candidate), ("champion", champion)):
        target, outside = candidate_probabilities(bundle, data)
        acc = estimate(data["correct"], data["action"], data["propensity"], target, data["P"], **kw)
        cost = estimate(data["cost"], data["action"], data["propensity"], target, data["C"], **kw)
        out[f"{who}_figures"] = {
            "accuracy": acc[e], "accuracy_ci": acc[f"{e}_ci"], "mean_cost": cost[e], "mean_cost_ci": cost[f"{e}_ci"],
            "effective_sample_size": acc["effective_sample_size"], "rows_outside_logged_support": outside,
            "utility": value("utility", {"router_accuracy": acc[e], "router_mean_cost": cost[e]}, price)}
    return {**out, "used": True}


# ---------------------------------------------------------------- the gate


def gate(params: Params, candidate_bundle: Path, version: str, cl) -> dict[str, Any]:
    """Decide where the new ``version`` goes, move the alias, tag it, write the report."""
    cfg = params.export
    name, metric, margin = cfg.registered_model, cfg.promote_metric, cfg.promote_margin
    champion = alias_version(cl, name, cfg.alias)
    report: dict[str, Any] = {"time": _now(), "model": name, "version": str(version), "metric": metric,
                              "margin": margin, "champion_before": champion, "checks": {}}
    if champion is None:
        report.update(decision=cfg.alias, reason=f"no {cfg.alias} yet: the first candidate becomes {cfg.alias}")
    else:
        try:
            _checks(params, candidate_bundle, champion, report)
        except Exception as e:  # a champion that cannot be fetched or scored: refuse, and say why
            log.exception("promotion: the comparison with the champion failed")
            report["checks"]["comparison"] = {"used": True, "passed": False, "metric": metric, "margin": margin,
                                              "candidate": None, "champion": None,
                                              "error": f"{type(e).__name__}: {e}"[:2000]}
        failed = [k for k, c in report["checks"].items() if c.get("used", True) and not c["passed"]]
        report["decision"] = cfg.alias if not failed else cfg.challenger_alias
        report["reason"] = _reason(report, failed)
    record = move_alias(cl, cfg, report["decision"], version, "gate", report["reason"],
                        {"metric": metric, "margin": margin})
    report["champion_after"] = version if report["decision"] == cfg.alias else champion
    report["audit"] = {"file": cfg.promotion_audit, "record": record}
    tags = {"promotion.decision": report["decision"], "promotion.reason": report["reason"][:5000],
            "promotion.metric": metric, "promotion.margin": margin}
    for k, c in report["checks"].items():
        for side in ("candidate", "champion", "difference", "passed"):
            if side in c and not isinstance(c[side], dict):
                tags[f"promotion.{k}.{side}"] = c[side]
    for k, v in tags.items():
        cl.set_model_version_tag(name, version, k, str(v))
    artifacts.write_json(cfg.promotion_report, report)
    log.info("promotion: version %s -> %s (%s)", version, report["decision"], report["reason"])
    return report


def _checks(params: Params, candidate_bundle: Path, champion: str, report: dict[str, Any]) -> None:
    """The held-out and off-policy comparisons of the candidate with version ``champion``."""
    from router.runtime import Router

    cfg = params.export
    metric = cfg.promote_metric
    ev = artifacts.read_json(params.evaluate.metrics)
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        champ_bundle = download_bundle(cfg.registered_model, champion, Path(tmp))
        champ_router = Router.load(champ_bundle)
        price = cfg.promote_price if cfg.promote_price is not None else champ_router.lam
        report["price"] = price
        # export wrote the candidate's digest into its manifest: the labels it was evaluated on
        candidate_digest = (artifacts.read_json(candidate_bundle / "manifest.json").get("training") or {}).get(
            "data_digest")
        champ = own_figures(champ_router.manifest, candidate_digest)
        if champ is None:
            ds, rows, texts = evaluated_queries(params, ev)
            champ = realized(champ_bundle, ds, rows, texts)
            queries = len(rows)
        else:
            queries = int(ev.get("evaluated_queries") or 0)
        held = compare(metric, value(metric, ev, price), value(metric, champ, price), cfg.promote_margin)
        held.update(queries=int(queries), cv_folds=ev.get("cv_folds"),
                    candidate_figures={**{k: ev.get(k) for k in FIGURES}, "source": params.evaluate.metrics},
                    champion_figures=champ)
        report["checks"]["held_out"] = held
        ope = off_policy(params, candidate_bundle, champ_bundle, price)
        if ope["used"]:
            ope.update(compare("utility", ope["candidate_figures"]["utility"], ope["champion_figures"]["utility"],
                               cfg.promote_ope_margin))
        report["checks"]["off_policy"] = ope


def _reason(report: dict[str, Any], failed: list[str]) -> str:
    parts = []
    for k, c in report["checks"].items():
        if not c.get("used", True):
            parts.append(f"{k}: not used ({c['why']})")
            continue
        fig = "n/a" if c["candidate"] is None else f"{c['candidate']:.4f}"
        champ = "n/a" if c["champion"] is None else f"{c['champion']:.4f}"
        why = c.get("error") or c.get("champion_figures", {}).get("error")
        parts.append(f"{k}: {c['metric']} candidate {fig} vs champion {champ} (margin {c['margin']:g}) "
                     f"{'passed' if c['passed'] else 'FAILED'}" + (f": {why}" if why else ""))
    head = "promoted: beats the champion" if not failed else f"refused ({', '.join(failed)})"
    return head + "; " + "; ".join(parts)
