"""The ``prepare`` stage: dataset sources -> ``data/queries.parquet`` + ``data/prepare_report.json``."""

from __future__ import annotations

from collections import Counter

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage

SECTIONS = ("seed", "data", "prepare")


def prepare(params: Params, run=NULL_RUN) -> dict:
    """Load ``params.data.sources``, cap, write the queries table and the report; return the report.

    ``data.max_queries`` keeps the first N queries by ``query_id`` (a stable, source-order
    independent choice); the rest are counted as ``capped``, not listed as dropped, because
    nothing is wrong with them. With ``data.outcomes`` set, the outcome table replaces the
    generators: its texts are the queries and the label stage imports its outcomes.
    """
    if params.data.outcomes:
        from pipelines.outcome_table import import_outcomes

        # the queries are the table's texts; the label stage imports the outcomes themselves
        table = import_outcomes(params.data.outcomes, params)
        queries = table.queries
        dropped = [{"source": f"outcomes:{params.data.outcomes}", **b} for b in table.bad]
        capped = 0
        note = (f"data.outcomes is set ({params.data.outcomes}): the outcome table replaces prepare's "
                "sources and the rollout")
    else:
        from pipelines.datasets import load_sources

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
    artifacts.write_queries(queries, params.prepare.out)
    artifacts.write_json(params.prepare.report, report)
    run.log_metrics({"queries": report["queries"], "dropped": report["dropped_count"],
                     "by_split": report["by_split"]})
    run.log_artifact(params.prepare.report)
    splits = ", ".join(f"{k} {v}" for k, v in report["by_split"].items()) or "none"
    print(f"prepare: {report['queries']} queries ({splits}) from {len(report['by_source'])} source(s); "
          f"dropped {report['dropped_count']}, capped {report['capped']} -> {params.prepare.out}")
    return report


def main(argv: list[str] | None = None) -> dict:
    """``python -m pipelines.prepare [--params FILE] [--set KEY=VALUE ...]``."""
    return run_stage("prepare", prepare, argv, description="prepare: dataset sources -> queries table",
                     sections=SECTIONS, summary=None)


if __name__ == "__main__":
    main()
