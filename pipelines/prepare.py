"""The ``prepare`` stage: dataset sources -> ``data/queries.parquet`` + ``data/prepare_report.json``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipelines.config import Params, load_params, stage_args
from pipelines.datasets import load_sources
from pipelines.queries import write_queries


def prepare(params: Params) -> dict:
    """Load ``params.data.sources``, cap, write the queries table and the report; return the report.

    ``data.max_queries`` keeps the first N queries by ``query_id`` (a stable, source-order
    independent choice); the rest are counted as ``capped``, not listed as dropped, because
    nothing is wrong with them. With ``data.outcomes`` set, the outcome table replaces the
    generators: its texts are the queries and the label stage imports its outcomes.
    """
    out, report_path = Path(params.prepare.out), Path(params.prepare.report)
    if params.data.outcomes:
        from pipelines.outcome_table import import_outcomes

        # the queries are the table's texts; the label stage imports the outcomes themselves
        _, _, queries, bad = import_outcomes(params.data.outcomes, params)
        dropped = [{"source": f"outcomes:{params.data.outcomes}", **b} for b in bad]
        capped = 0
        note = (f"data.outcomes is set ({params.data.outcomes}): the outcome table replaces prepare's "
                "sources and the rollout")
    else:
        queries, dropped = load_sources(params.data.sources, params.data.split, params.seed)
        capped = 0
        cap = params.data.max_queries
        if cap is not None:
            if cap < 0:
                raise ValueError(f"data.max_queries must be >= 0, got {cap}")
            kept = {q.query_id for q in sorted(queries, key=lambda q: q.query_id)[:cap]}
            capped = len(queries) - len(kept)
            queries = [q for q in queries if q.query_id in kept]  # keep source order
        note = None
    report = {
        "queries": len(queries),
        "by_split": dict(sorted(Counter(q.split for q in queries).items())),
        "by_source": dict(sorted(Counter(q.source for q in queries).items())),
        "dropped": dropped,
        "dropped_count": len(dropped),
        "dropped_by_reason": dict(sorted(Counter(d["reason"] for d in dropped).items())),
        "capped": capped,
    }
    if note:
        report["outcomes"] = params.data.outcomes
        report["note"] = note
    out.parent.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    if queries:
        write_queries(queries, out)
    else:
        _write_empty(out)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    tmp.replace(report_path)
    return report


def _write_empty(path: Path) -> None:
    """An empty queries table with string columns (an all-empty frame would be typed null)."""
    import pandas as pd

    from pipelines.queries import QUERY_COLUMNS

    df = pd.DataFrame({c: pd.Series([], dtype="string") for c in QUERY_COLUMNS})
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    """``python -m pipelines.prepare [--params FILE]``."""
    args = stage_args("prepare: dataset sources -> queries table", argv)
    params = load_params(args.params)
    from dataclasses import asdict

    from pipelines.tracking import stage_run

    with stage_run(params.mlflow, "prepare", args.params) as run:
        run.log_params({"data": asdict(params.data), "seed": params.seed})
        report = prepare(params)
        run.log_metrics({"queries": report["queries"], "dropped": report["dropped_count"],
                         "by_split": report["by_split"]})
        run.log_artifact(params.prepare.report)
    splits = ", ".join(f"{k} {v}" for k, v in report["by_split"].items()) or "none"
    print(f"prepare: {report['queries']} queries ({splits}) from {len(report['by_source'])} source(s); "
          f"dropped {report['dropped_count']}, capped {report['capped']} -> {params.prepare.out}")
    return report


if __name__ == "__main__":
    main()
