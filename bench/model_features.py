"""Model-state features against text embeddings, on the CPU default's own labels.

    python -m bench.model_features [--embeddings all-MiniLM-L6-v2-static,model:gemma3,all-MiniLM-L6-v2]

Runs featurize, train and evaluate (the project's stages, cross-fitted as the default is) once
per embedding on the labelled queries of the last ``dvc repro`` (``data/queries.parquet``,
``data/outcomes.parquet``, ``data/tiers.json``; run the pipeline first), everything else as
``params.yaml`` has it, in ``bench/cache/model_features/<embedding>/``. For each: the routing
figures (APGR, compute saved at iso-accuracy, with bootstrap CIs), the out-of-fold Brier of the
success model, and what featurizing costs per query (one process, sequential). Writes
``bench/results/model_features.json`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / "cache" / "model_features"


def run(embedding: str, params_file: Path) -> dict:
    from pipelines.config import load_params
    from pipelines.evaluate import evaluate
    from pipelines.featurize import featurize
    from pipelines.train import train

    work = CACHE / embedding.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    p = load_params(params_file, [
        "mlflow.enabled=false", f"featurize.embedding={embedding}", f"featurize.out={work / 'features.parquet'}",
        f"train.out_dir={work / 'train'}", f"train.metrics={work / 'train.json'}",
        f"evaluate.metrics={work / 'evaluate.json'}", f"evaluate.plots_dir={work / 'plots'}"])
    t0 = time.perf_counter()
    fz = featurize(p)
    featurize_s = time.perf_counter() - t0
    tr = train(p)
    ev = evaluate(p)
    keys = ("evaluated_queries", "cv_folds", "apgr", "apgr_ci", "compute_saved_at_iso_accuracy",
            "compute_saved_at_iso_accuracy_ci", "router_accuracy", "router_mean_cost", "apgr_vs_logreg",
            "adaptive_compute_saved_vs_static", "brier", "ece")
    return {"embedding": embedding, "features": fz["features"], "featurized": fz["embedded"],
            "featurize_ms_per_query": round(1000 * featurize_s / fz["embedded"], 2) if fz["embedded"] else None,
            "chosen": tr["chosen"], "cv_brier": tr.get("cv_brier"), "constant_cv_brier": tr.get("constant_cv_brier"),
            **{k: ev.get(k) for k in keys}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", default="all-MiniLM-L6-v2-static,model:gemma3")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    from bench.results_io import start, write_result

    for f in ("data/queries.parquet", "data/outcomes.parquet", "data/tiers.json"):
        if not (REPO / f).exists():
            print(f"{f} is missing: run `dvc repro` first", file=sys.stderr)
            return 2
    started = start()
    rows = [run(e, Path(args.params)) for e in args.embeddings.split(",")]
    res = {"params": Path(args.params).name, "rows": rows}
    print(json.dumps(res, indent=1))
    if args.write:
        print(f"wrote {write_result('model_features', res, started)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
