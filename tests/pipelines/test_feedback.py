"""``python -m pipelines feedback``: a real proxy's rotated decision log (scripted upstream, exploring)
joined with CSV and JSONL outcomes; every unused line reported with its file and line number."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.__main__ import main as pipelines_main
from pipelines.config import ConfigError, parse_params
from router import Router
from router.decision_log import log_files, read_records
from tests.router.bundle_fixture import session_proxy_bundle, synthetic_queries
from tests.traffic import proxy_traffic

REPO = Path(__file__).resolve().parents[2]
N = 40
NO_MLFLOW = ["--set", "mlflow.enabled=false"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A decision log of N requests through the proxy, small enough rotation to span several files."""
    router = Router.load(session_proxy_bundle(tmp_path_factory).path)
    d = tmp_path_factory.mktemp("logs")
    answers = proxy_traffic(router, synthetic_queries(N, seed=5)[0], d / "decisions.jsonl", explore=0.3,
                            log_max_bytes=8192)
    assert all(status == 200 for status, _, _ in answers)
    records = list(read_records(d / "decisions.jsonl"))
    assert len(records) == N and len(log_files(d / "decisions.jsonl")) > 2  # rotated
    return d / "decisions.jsonl", records


def write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["request_id", "correct", "source"])
        w.writerows(rows)
    return path


def run(log, outcomes, out) -> dict:
    pipelines_main(["feedback", "--decisions", str(log), "--outcomes", str(outcomes), "--out", str(out), *NO_MLFLOW])
    return json.loads((out / "feedback_report.json").read_text())


def test_csv_outcomes_join_and_every_bad_line_is_reported(logged, tmp_path):
    log, records = logged
    ids = [r["request_id"] for r in records]
    good = {rid: (i % 3) / 2 for i, rid in enumerate(ids[:30])}  # 0, 0.5, 1
    rows = [[rid, v, "verifier"] for rid, v in good.items()]
    bad = [["not-a-logged-id", 1, "user"],  # line 32: unknown
           [ids[0], 1 - good[ids[0]], "user"],  # line 33: duplicate (conflicting)
           [ids[31], 1.5, "judge"],  # line 34: out of range
           [ids[32], "yes", "judge"],  # line 35: not a number
           [ids[33], "", "judge"],  # line 36: empty
           ["", 1, "judge"],  # line 37: no request id
           [ids[34], "nan", "judge"]]  # line 38: not finite
    outcomes = write_csv(tmp_path / "outcomes.csv", rows + bad)
    report = run(log, outcomes, tmp_path / "prod")
    df = pd.read_parquet(tmp_path / "prod" / "feedback.parquet")

    assert len(df) == N and df["request_id"].is_unique and set(df["request_id"]) == set(ids)
    assert report["requests"] == N and report["with_outcome"] == 30 and report["without_outcome"] == N - 30
    assert len(report["decision_files"]) == len(log_files(log))
    joined = df.set_index("request_id")["correct"]
    assert all(joined[rid] == v for rid, v in good.items())  # the first of the duplicates is kept
    assert joined[ids[31:]].isna().all()
    issues = report["issues"]
    where = {k: [(x["line"], x.get("request_id")) for x in v["listed"]] for k, v in issues.items()}
    assert where == {"outcome_unknown_request_id": [(32, "not-a-logged-id")],
                     "outcome_duplicate": [(33, ids[0])],
                     "outcome_out_of_range": [(34, ids[31]), (38, ids[34])],
                     "outcome_not_a_number": [(35, ids[32]), (36, ids[33])],
                     "outcome_without_request_id": [(37, None)]}
    assert issues["outcome_duplicate"]["listed"][0]["first_line"] == 2
    assert report["issues_total"] == len(bad)
    # the decision's own fields travel with it
    by_id = {r["request_id"]: r for r in records}
    for row in df.itertuples():
        rec = by_id[row.request_id]
        assert row.chosen == rec["chosen"] and row.propensity == pytest.approx(rec["propensity"])
        assert bool(row.explored) == rec["explored"] and row.tokens == rec["tokens"]
        assert json.loads(row.allowed) == rec["allowed"] and row.bundle_id == rec["bundle"]["id"]
    assert df["explored"].sum() == report["explored"] == sum(r["explored"] for r in records)
    assert sum(t["requests"] for t in report["by_executed_tier"].values()) == N


def test_jsonl_outcomes_and_a_damaged_log(logged, tmp_path):
    log, records = logged
    # a copy of the log with a duplicated record and a garbage line in the middle, and a torn last line
    d = tmp_path / "logs"
    d.mkdir()
    files = log_files(log)
    for f in files:
        (d / f.name).write_bytes(f.read_bytes())
    current = d / log.name
    lines = current.read_bytes().split(b"\n")
    first_rotated = (d / files[0].name).read_bytes().split(b"\n")[0]
    damaged = [lines[0], first_rotated, b"{garbage", *lines[1:-1], b'{"request_id": "torn'] if len(lines) > 2 else None
    assert damaged is not None
    current.write_bytes(b"\n".join(damaged) + b"\n")
    outcomes = tmp_path / "o.jsonl"
    ids = [r["request_id"] for r in records]
    outcomes.write_text("\n".join([json.dumps({"request_id": ids[0], "correct": True}),
                                   "not json", json.dumps([1, 2]),
                                   json.dumps({"request_id": ids[1], "correct": 0})]) + "\n")
    report = run(current, outcomes, tmp_path / "prod")
    df = pd.read_parquet(tmp_path / "prod" / "feedback.parquet")
    assert len(df) == N and report["with_outcome"] == 2
    assert df.set_index("request_id")["correct"][ids[:2]].tolist() == [1.0, 0.0]
    issues = report["issues"]
    assert [(x["file"], x["line"]) for x in issues["decision_duplicate"]["listed"]] == [(str(current), 2)]
    assert issues["decision_duplicate"]["listed"][0]["first"] == f"{d / files[0].name}:1"
    unparseable = [(x["file"], x["line"]) for x in issues["decision_unparseable"]["listed"]]
    assert unparseable == [(str(current), 3), (str(current), len(damaged))]  # the torn last line is reported too
    assert [x["line"] for x in issues["outcome_unparseable"]["listed"]] == [2, 3]


def test_a_missing_log_or_a_header_without_correct_fails_clearly(logged, tmp_path):
    log, _ = logged
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(tmp_path / "nope.jsonl", write_csv(tmp_path / "o.csv", []), tmp_path / "out")
    (tmp_path / "bad.csv").write_text("request_id,score\nx,1\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: the header lacks column\(s\) \['correct'\]"):
        run(log, tmp_path / "bad.csv", tmp_path / "out")


def test_the_command_line_runs_in_its_own_process(logged, tmp_path):
    log, records = logged
    outcomes = write_csv(tmp_path / "o.csv", [[r["request_id"], 1, "v"] for r in records[:5]])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "pipelines", "feedback", "--decisions", str(log), "--outcomes",
                        str(outcomes), "--out", str(tmp_path / "prod"), *NO_MLFLOW], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["requests"] == N and summary["with_outcome"] == 5 and summary["issues_total"] == 0


def test_policy_explore_is_validated():
    assert parse_params({"policy": {"explore": 0.05}}).policy.explore == 0.05
    with pytest.raises(ConfigError, match="explore"):
        parse_params({"policy": {"explore": 1.0}})
