"""The prepare stage end to end: sources -> queries parquet + report, deterministic, capped, outcomes mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.config import parse_params
from pipelines.prepare import main, prepare
from pipelines.artifacts import read_queries


def make_params(tmp_path: Path, **data) -> dict:
    jl = tmp_path / "extra.jsonl"
    jl.write_text(
        json.dumps({"text": "Capital of France?", "answer": "Paris"}) + "\n"
        + json.dumps({"text": "2 + 2 = ?", "answer": "4", "verifier": "numeric"}) + "\n"
        + "{broken\n"
        + json.dumps({"text": "Capital of France?", "answer": "Paris"}) + "\n"
    )
    return {
        "seed": 3,
        "data": {
            "sources": [
                {"kind": "reasoning_gym", "tasks": [
                    {"name": "chain_sum", "size": 6,
                     "config": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}},
                ]},
                {"kind": "jsonl", "path": str(jl), "name": "extra"},
            ],
            "split": [0.5, 0.25, 0.25],
            **data,
        },
        "prepare": {"out": str(tmp_path / "out" / "data" / "queries.parquet"),
                    "report": str(tmp_path / "out" / "data" / "prepare_report.json")},
    }


def test_prepare_end_to_end_and_deterministic(tmp_path):
    params = parse_params(make_params(tmp_path))
    report = prepare(params)
    out, report_path = Path(params.prepare.out), Path(params.prepare.report)
    assert out.exists() and report_path.exists()
    assert json.loads(report_path.read_text()) == report
    queries = read_queries(out)
    assert report["queries"] == len(queries) == 8
    assert report["by_source"] == {"extra": 2, "reasoning_gym:chain_sum": 6}
    assert sum(report["by_split"].values()) == 8 and set(report["by_split"]) <= {"train", "val", "test"}
    assert report["dropped_count"] == 2
    assert [(d["line"], d["reason"]) for d in report["dropped"]] == [(3, "bad json"), (4, "duplicate")]
    assert report["capped"] == 0
    rg = [q for q in queries if q.verifier == "reasoning_gym"]
    assert rg and all(q.meta["rg_entry"]["metadata"]["source_dataset"] == "chain_sum" for q in rg)

    first_bytes = out.read_bytes()
    again = prepare(params)
    assert again == report
    assert [q.to_row() for q in read_queries(out)] == [q.to_row() for q in queries]
    assert out.read_bytes() == first_bytes


def test_max_queries_caps_by_query_id(tmp_path):
    full = prepare(parse_params(make_params(tmp_path)))
    all_ids = sorted(q.query_id for q in read_queries(tmp_path / "out" / "data" / "queries.parquet"))
    params = parse_params(make_params(tmp_path, max_queries=3))
    report = prepare(params)
    kept = read_queries(params.prepare.out)
    assert report["queries"] == 3 and report["capped"] == full["queries"] - 3
    assert sorted(q.query_id for q in kept) == all_ids[:3]
    assert report["dropped_count"] == full["dropped_count"]  # capped rows are not "dropped"


def test_outcomes_mode_takes_queries_from_the_table(tmp_path):
    import pandas as pd

    rows = [{"query_id": f"q{i}", "text": f"question {i}", "tier": t, "correct": i % 2, "cost": c}
            for i in range(5) for t, c in (("small", 1), ("big", 9))]
    rows.append({"query_id": "q9", "text": "", "tier": "small", "correct": 1, "cost": 1})  # line 12
    pd.DataFrame(rows).to_csv(tmp_path / "outcomes.csv", index=False)
    params = parse_params(make_params(tmp_path, outcomes=str(tmp_path / "outcomes.csv")))
    report = prepare(params)
    assert report["queries"] == 5 and "outcome table" in report["note"]
    assert sorted(q.query_id for q in read_queries(params.prepare.out)) == [f"q{i}" for i in range(5)]
    assert [d["line"] for d in report["dropped"]] == [12]


def test_main_reads_params_file(tmp_path, monkeypatch, capsys):
    raw = make_params(tmp_path)
    raw["prepare"] = {"out": "data/queries.parquet", "report": "data/prepare_report.json"}  # relative
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    report = main(["--params", "params.yaml"])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("prepare: 8 queries")
    assert (tmp_path / "data" / "queries.parquet").exists() and report["queries"] == 8


def test_bad_source_is_a_config_error(tmp_path):
    from pipelines.config import ConfigError

    raw = make_params(tmp_path)
    raw["data"]["sources"].append({"kind": "jsonl", "path": "x", "oops": 1})
    with pytest.raises(ConfigError, match="oops"):
        prepare(parse_params(raw))
