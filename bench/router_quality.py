"""Routing quality on published outcome tables, through the project's own stages.

    python -m bench.router_quality                                   # every table in ../shared/data/outcomes
    python -m bench.router_quality --table T.parquet [--groups T.groups.csv] [--table ...]
    python -m bench.router_quality --embeddings all-MiniLM-L6-v2-static,none,all-MiniLM-L6-v2 \\
        --max-queries 1500 --name router_quality_featurizers        # featurizers side by side
    python -m bench.router_quality --table T --cv-folds 5 --name N  # cross-fit a table that has its own split

For every table (and embedding) it runs prepare (``data.outcomes``), label, featurize, train and
evaluate with the project's defaults (nothing per table), in ``--cache DIR/<table>/``. Features
are cached per table and embedding (the featurize stage's own cache), so a rerun skips them;
each table's ``cold_wall_seconds`` adds back what featurizing took when it was computed.
``--cold`` empties the cache first. ``--max-queries N`` evaluates a deterministic subsample
(the first N queries by a hash of ``query_id``), for comparisons that a slow featurizer cannot
afford on whole tables. Writes ``bench/results/<name>.json`` (default ``router_quality``) and
prints the Markdown table the README shows (``python -m bench.readme`` renders it from the
JSON); ``--no-write`` prints only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = REPO.parent / "shared" / "data" / "outcomes"
CACHE = REPO / "bench" / "cache"

# the targets, checked against each run (README, "Routing quality on published tables")
TARGETS = {"apgr_over_logreg": 0.03, "within_group_apgr_over_logreg": 0.05, "bbh_apgr": 0.88,
           "bbh_compute_saved": 0.60, "mmlu_apgr": 0.65, "wall_minutes": 15.0}


def stem_of(path: Path) -> str:
    return path.name.split(".")[0]


def groups_beside(table: Path) -> Path | None:
    g = table.with_name(stem_of(table) + ".groups.csv")
    return g if g.exists() else None


def subsample(table: Path, n: int, d: Path) -> Path:
    """The table restricted to its first ``n`` queries by sha1 of query_id (cached)."""
    import pandas as pd

    out = d / f"{stem_of(table)}-first{n}.parquet"
    if not out.exists():
        df = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
        ids = sorted(df["query_id"].astype(str).unique(), key=lambda q: hashlib.sha1(q.encode()).hexdigest())[:n]
        d.mkdir(parents=True, exist_ok=True)
        df[df["query_id"].astype(str).isin(set(ids))].to_parquet(out, index=False)
    return out


def raw_params(table: Path, work: Path, embedding: str, groups: Path | None, cv_folds: int | None = None) -> dict:
    return {
        "mlflow": {"enabled": False},
        "data": {"outcomes": str(table)},
        "prepare": {"out": str(work / "queries.parquet"), "report": str(work / "prepare_report.json")},
        "label": {"out": str(work / "outcomes.parquet"), "tiers_out": str(work / "tiers.json"),
                  "report": str(work / "label_report.json"), "metrics": str(work / "label.json")},
        "featurize": {"out": str(work / f"features-{embedding}.parquet"), "embedding": embedding},
        "train": {"out_dir": str(work / embedding / "train"), "metrics": str(work / embedding / "train.json")},
        "evaluate": {"metrics": str(work / embedding / "evaluate.json"), "plots_dir": str(work / embedding / "plots"),
                     "groups": str(groups) if groups else None, "cv_folds": cv_folds},
    }


def run_table(table: Path, groups: Path | None, embedding: str, cache: Path, cv_folds: int | None = None) -> dict:
    """The stages on one table; returns its row of the result."""
    from pipelines.config import parse_params
    from pipelines.evaluate import evaluate
    from pipelines.featurize import featurize
    from pipelines.label import label
    from pipelines.prepare import prepare
    from pipelines.train import train

    work = cache / stem_of(table)
    p = parse_params(raw_params(table, work, embedding, groups, cv_folds))
    seconds = {}
    t0 = time.perf_counter()
    prepare(p)
    label(p)
    seconds["prepare_label"] = time.perf_counter() - t0
    t = time.perf_counter()
    fz = featurize(p)
    seconds["featurize"] = time.perf_counter() - t
    sidecar = work / f"features-{embedding}.seconds.json"
    if fz["embedded"] == fz["queries"]:  # computed from scratch this run: remember the cold cost
        sidecar.write_text(json.dumps({"seconds": seconds["featurize"], "queries": fz["queries"]}))
    cold_featurize = json.loads(sidecar.read_text())["seconds"] if sidecar.exists() else seconds["featurize"]
    t = time.perf_counter()
    tr = train(p)
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate(p)
    seconds["evaluate"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    label_metrics = json.loads((work / "label.json").read_text())
    base = ev["baselines"]
    row = {
        "table": table.name, "embedding": embedding, "queries": label_metrics["queries"],
        "tiers": label_metrics["tiers"], "evaluated_queries": ev["evaluated_queries"], "cv_folds": ev["cv_folds"],
        "evaluation": ev["evaluation"], "oracle_accuracy": ev["oracle_accuracy"],
        "best_fixed_tier": ev["best_fixed_tier"], "best_fixed_accuracy": ev["best_fixed_accuracy"],
        "baselines": {b: {k: m[k] for k in ("apgr", "compute_saved_at_iso_accuracy", "aiq")} | (
            {"apgr_with_router_cost": m["apgr_with_router_cost"]} if "apgr_with_router_cost" in m else {})
            for b, m in base.items()},
        "router": {k: ev[k] for k in ("apgr", "apgr_ci", "compute_saved_at_iso_accuracy",
                                      "compute_saved_at_iso_accuracy_ci", "cpt50", "cpt80", "aiq", "router_accuracy",
                                      "router_mean_cost", "apgr_vs_logreg", "apgr_vs_logreg_ci")},
        "chosen": tr["chosen"], "cost_model": tr["chosen_cost_model"],
        # what the inner cross-validation of the shipped router measured for every candidate
        "candidates_cv_apgr": {n: m["cv_apgr"] for n, m in tr["models"].items()},
        "cost_models_cv_mae": {n: m["cv_mae"] for n, m in tr["cost_models"].items()},
        "fold_choices": [f"{f['chosen']}/{f['cost_model']}" for f in ev["folds"]],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "featurize_cached": fz["embedded"] == 0,
        "wall_seconds": round(wall, 1),
        "cold_wall_seconds": round(wall - seconds["featurize"] + cold_featurize, 1),
    }
    wg = ev.get("within_groups")
    if wg:
        row["within_groups"] = {"file": Path(wg["file"]).name, "groups": wg["router"]["groups"],
                                "queries_in_scored_groups": wg["router"]["queries_in_scored_groups"],
                                **{b: {k: wg[b][k] for k in ("apgr", "compute_saved_at_iso_accuracy")}
                                   for b in wg if b not in ("file", "apgr_vs_logreg")},
                                "apgr_vs_logreg": wg.get("apgr_vs_logreg")}
        row["within_groups"]["bounds"] = group_bounds(p, Path(wg["file"]))
    return row


def group_bounds(p, groups: Path) -> dict:
    """What routing by group alone can do: each query gets its group's *in-sample* mean accuracy
    (and mean cost, or its own true cost) per tier; APGR and compute saved of that policy on all
    queries. An upper bound for a router that only recognises the task, not a router."""
    import numpy as np
    import pandas as pd

    from pipelines.artifacts import load_dataset
    from pipelines.routing_metrics import curve, headline

    ds = load_dataset(p.label, p.featurize, ("train", "val", "test"))
    g = pd.read_csv(groups, dtype=str).drop_duplicates("query_id").set_index("query_id")["group"]
    g = g.reindex(ds.query_ids).fillna("(none)").to_numpy()
    P, Cg = np.empty_like(ds.Y), np.empty_like(ds.Cost)
    for name in set(g):
        m = g == name
        P[m], Cg[m] = ds.Y[m].mean(axis=0), ds.Cost[m].mean(axis=0)
    out = {}
    for key, Cp in (("group_means", Cg), ("group_means_true_cost", ds.Cost)):
        h = headline(*curve(P, Cp, ds.Y, ds.Cost)[1:], ds.Y, ds.Cost)
        out[key] = {"apgr": h["apgr"], "compute_saved_at_iso_accuracy": h["compute_saved_at_iso_accuracy"]}
    return out


def targets(rows: list[dict], wall: float) -> dict:
    """The issue's targets against this run's rows (by table name)."""
    def find(prefix):
        return next((r for r in rows if r["table"].startswith(prefix)), None)

    out: dict = {}
    diffs = {r["table"]: r["router"]["apgr_vs_logreg"] for r in rows}
    out["apgr_over_logreg_by_0.03"] = {t: d is not None and d >= TARGETS["apgr_over_logreg"] for t, d in diffs.items()}
    out["apgr_vs_logreg_ci_above_0_on_two"] = sum(
        1 for r in rows if r["router"]["apgr_vs_logreg_ci"] and r["router"]["apgr_vs_logreg_ci"][0] > 0) >= 2
    out["within_group_over_logreg_by_0.05"] = {
        r["table"]: (r["within_groups"]["apgr_vs_logreg"] or -1) >= TARGETS["within_group_apgr_over_logreg"]
        for r in rows if "within_groups" in r}
    bbh, mmlu, dc = find("bbh"), find("mmlu"), find("dcrouter")
    if bbh:
        out["bbh_apgr_0.88"] = (bbh["router"]["apgr"] or 0) >= TARGETS["bbh_apgr"]
        out["bbh_compute_saved_0.60"] = (bbh["router"]["compute_saved_at_iso_accuracy"] or 0) >= TARGETS["bbh_compute_saved"]
    if mmlu:
        out["mmlu_apgr_0.65"] = (mmlu["router"]["apgr"] or 0) >= TARGETS["mmlu_apgr"]
    if dc:
        ci = dc["router"]["compute_saved_at_iso_accuracy_ci"]
        out["dcrouter_compute_saved_ci_above_0"] = bool(ci and ci[0] > 0)
    out["cold_wall_under_15_min"] = wall / 60 <= TARGETS["wall_minutes"]
    return out


def markdown(res: dict) -> str:
    from bench.readme import router_quality_table

    return router_quality_table(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="append", default=[], help="an outcome table (repeatable)")
    ap.add_argument("--groups", action="append", default=[], help="groups CSV of the --table at the same position")
    ap.add_argument("--embeddings", default=None, help="comma-separated; default: featurize's default embedding")
    ap.add_argument("--max-queries", type=int, default=None, help="a deterministic subsample of each table")
    ap.add_argument("--cv-folds", type=int, default=None,
                    help="evaluate.cv_folds for every table (default: the project's rule)")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--cold", action="store_true", help="empty the cache first")
    ap.add_argument("--name", default="router_quality", help="bench/results/<name>.json")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.results_io import start, write_result
    from pipelines.config import FeaturizeConfig

    cache = Path(args.cache)
    if args.cold and cache.exists():
        shutil.rmtree(cache)
    tables = [Path(t) for t in args.table] or sorted(OUTCOMES.glob("*.parquet"))
    if not tables:
        raise SystemExit(f"no outcome tables found in {OUTCOMES}; pass --table PATH")
    groups = [Path(g) for g in args.groups] + [None] * (len(tables) - len(args.groups))
    groups = [g or groups_beside(t) for t, g in zip(tables, groups)]
    embeddings = args.embeddings.split(",") if args.embeddings else [FeaturizeConfig().embedding]
    started = start()
    rows = []
    for table, g in zip(tables, groups):
        src = subsample(table, args.max_queries, cache / "subsamples") if args.max_queries else table
        for emb in embeddings:
            print(f"== {table.name} ({emb}{f', first {args.max_queries}' if args.max_queries else ''})",
                  file=sys.stderr, flush=True)
            row = run_table(src, g, emb, cache, args.cv_folds)
            row["table"] = table.name
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("table", "embedding", "router", "wall_seconds")}, default=str),
                  file=sys.stderr, flush=True)
    wall = sum(r["cold_wall_seconds"] for r in rows)
    res = {"tables": rows, "max_queries": args.max_queries, "embeddings": embeddings,
           "cold_wall_seconds_total": round(wall, 1), "wall_seconds_total": round(sum(r["wall_seconds"] for r in rows), 1),
           # the targets are about the three published tables, one featurizer, whole tables
           "targets": targets(rows, wall) if len(embeddings) == 1 and not args.table and not args.max_queries else None}
    print(markdown({"meta": {}, **res}))
    if args.write:
        print(f"wrote {write_result(args.name, res, started)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
