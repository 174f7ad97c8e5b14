"""``python -m pipelines feedback``: the proxy's decision logs joined with observed outcomes.

    python -m pipelines feedback --decisions logs/decisions.jsonl --outcomes outcomes.csv [--out data/production]

Each ``--decisions`` path is a log: its rotated files (``router.decision_log.log_files``) are read
too, oldest first. The outcomes file (CSV with a header, or JSONL; by extension) has one row per
request: ``request_id`` and ``correct`` in [0, 1] (a verifier's 0/1, a user's thumbs, a judge's
score), optionally ``source``. The result, ``<out>/feedback.parquet``, has one row per logged
request (the decision, its propensity and predictions, what it cost, and ``correct``, NaN where
no outcome came), and ``<out>/feedback_report.json`` accounts for every line read.

Nothing is dropped silently. Every line that is not used is listed in the report with its file and
line number (up to ``MAX_LISTED`` per kind; the counts are always complete): decision lines that do
not parse (a torn last line included), records without a usable ``request_id`` or ``propensity``,
a request id logged twice (the first record is kept); outcome lines that do not parse, lack a field,
carry a ``correct`` outside [0, 1] or not a number, name a request id no log has (unknown), or
repeat one (the first is kept).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipelines import artifacts
from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

log = logging.getLogger(__name__)

SECTIONS = ("feedback",)
MAX_LISTED = 1000  # issues listed per kind in the report (counted in full)
TABLE = "feedback.parquet"
OUTCOME_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson")
REPORT = "feedback_report.json"
# the decision-log fields copied as they are (README, "Decision log")
COPIED = ("request_id", "time", "ts", "endpoint", "requested_model", "status", "chosen", "executed", "reason",
          "explored", "explore", "greedy", "propensity", "p_correct", "expected_cost", "expected_latency_ms",
          "lambda", "tokens", "observed_cost", "latency_tokens", "features_sha256", "seed", "text")


class Issues:
    """Lines not used, by kind, each with where it was; counts complete, lists capped."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.items: dict[str, list[dict]] = {}

    def add(self, kind: str, **where) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        listed = self.items.setdefault(kind, [])
        if len(listed) < MAX_LISTED:
            listed.append(where)

    def to_dict(self) -> dict:
        return {k: {"count": n, "listed": self.items[k], "truncated": n > len(self.items[k])}
                for k, n in sorted(self.counts.items())}

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _by_age(files: Iterable[Path]) -> list[Path]:
    return sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))


def decision_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every file of the given logs (rotated ones first), each once; a missing log is an error.
    A folder (the pipeline's inbox, ``production/decisions``) stands for every ``*.jsonl`` in it,
    oldest first, and may be empty: no traffic yet."""
    from router.decision_log import log_files

    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        files = _by_age(Path(p).glob("*.jsonl")) if Path(p).is_dir() else log_files(p)
        if not files and Path(p).is_dir():
            continue
        if not files:
            raise FileNotFoundError(f"decision log {p}: no such file (nor rotated files beside it)")
        for f in files:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    for i, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if line.strip():
            yield i, line


def read_decisions(files: list[Path], issues: Issues) -> list[dict[str, Any]]:
    """The usable decision records, first occurrence of each request id, with ``log_file``/``log_line``."""
    first: dict[str, str] = {}
    rows = []
    for f in files:
        for n, line in _lines(f):
            where = {"file": str(f), "line": n}
            try:
                rec = json.loads(line)
            except ValueError as e:
                issues.add("decision_unparseable", **where, error=str(e)[:200])
                continue
            rid = rec.get("request_id") if isinstance(rec, dict) else None
            if not isinstance(rid, str) or not rid:
                issues.add("decision_without_request_id", **where)
                continue
            prop = rec.get("propensity")
            if isinstance(prop, bool) or not isinstance(prop, (int, float)) or not 0 < prop <= 1:
                issues.add("decision_bad_propensity", **where, request_id=rid, propensity=prop)
                continue
            if rid in first:
                issues.add("decision_duplicate", **where, request_id=rid, first=first[rid])
                continue
            first[rid] = f"{f}:{n}"
            rows.append({**rec, "log_file": str(f), "log_line": n})
    return rows


def _outcome_rows(path: Path, issues: Issues) -> Iterator[tuple[int, dict]]:
    """(line number, mapping) per outcome row; CSV by its header, JSONL one object a line."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"request_id", "correct"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}:1: the header lacks column(s) {sorted(missing)}; it has {reader.fieldnames}")
            start = reader.line_num + 1
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        return
    if path.suffix.lower() not in OUTCOME_SUFFIXES:
        raise ValueError(f"{path}: outcomes must be .csv or .jsonl")
    for n, line in _lines(path):
        try:
            obj = json.loads(line)
        except ValueError as e:
            issues.add("outcome_unparseable", file=str(path), line=n, error=str(e)[:200])
            continue
        if not isinstance(obj, dict):
            issues.add("outcome_unparseable", file=str(path), line=n, error="not a JSON object")
            continue
        yield n, obj


def outcome_files(path: str | Path) -> list[Path]:
    """The outcome file, or every outcome file of a folder (the pipeline's inbox,
    ``production/outcomes``: ``*.csv``, ``*.jsonl``, ``*.ndjson``) by name; missing is an error."""
    path = Path(path)
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in OUTCOME_SUFFIXES)
    if not path.exists():
        raise FileNotFoundError(f"outcomes {path}: no such file or folder")
    return [path]


def read_outcomes(paths: str | Path | Iterable[str | Path], known: set[str], issues: Issues) -> dict[str, dict[str, Any]]:
    """request id -> {correct, source, outcome_file, outcome_line} for valid rows naming a logged
    request, over one file or several (a request id in two files is a duplicate too)."""
    out: dict[str, dict[str, Any]] = {}
    for path in [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]:
        _read_outcome_file(path, known, issues, out)
    return out


def _read_outcome_file(path: Path, known: set[str], issues: Issues, out: dict[str, dict[str, Any]]) -> None:
    for n, row in _outcome_rows(path, issues):
        where = {"file": str(path), "line": n}
        rid = row.get("request_id")
        rid = rid.strip() if isinstance(rid, str) else rid
        if not isinstance(rid, str) or not rid:
            issues.add("outcome_without_request_id", **where)
            continue
        raw = row.get("correct")
        try:
            if isinstance(raw, bool):
                value = float(raw)
            elif isinstance(raw, (int, float)) or (isinstance(raw, str) and raw.strip()):
                value = float(raw)
            else:
                raise ValueError
        except ValueError:
            issues.add("outcome_not_a_number", **where, request_id=rid, correct=raw)
            continue
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            issues.add("outcome_out_of_range", **where, request_id=rid, correct=raw)
            continue
        if rid not in known:
            issues.add("outcome_unknown_request_id", **where, request_id=rid)
            continue
        if rid in out:
            issues.add("outcome_duplicate", **where, request_id=rid, first_file=out[rid]["outcome_file"],
                       first_line=out[rid]["outcome_line"], same_value=out[rid]["correct"] == value)
            continue
        source = row.get("source")
        out[rid] = {"correct": value, "outcome_source": None if source in (None, "") else str(source),
                    "outcome_file": str(path), "outcome_line": n}


def feedback_table(decisions: list[dict[str, Any]], outcomes: dict[str, dict[str, Any]]):
    """One row per request: the decision's fields, its admitted tiers as JSON, and the outcome."""
    import pandas as pd

    rows = []
    for rec in decisions:
        row = {k: rec.get(k) for k in COPIED}
        bundle = rec.get("bundle") or {}
        row.update(bundle_id=bundle.get("id"), bundle_sha256=bundle.get("sha256"),
                   upstream_status=(rec.get("upstream") or {}).get("status"),
                   latency_ms=(rec.get("latency_ms") or {}).get("total"),
                   allowed=json.dumps(rec.get("allowed") or []), caps=json.dumps(rec.get("caps") or {}),
                   log_file=rec["log_file"], log_line=rec["log_line"])
        o = outcomes.get(rec["request_id"])
        row.update(correct=math.nan if o is None else o["correct"],
                   **{k: None if o is None else o[k] for k in ("outcome_source", "outcome_file", "outcome_line")})
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*COPIED, "bundle_id", "bundle_sha256", "upstream_status", "latency_ms",
                                     "allowed", "caps", "log_file", "log_line", "correct", "outcome_source",
                                     "outcome_file", "outcome_line"])
    for c in ("propensity", "p_correct", "expected_cost", "expected_latency_ms", "lambda", "tokens", "observed_cost",
              "latency_tokens", "latency_ms", "correct", "ts", "explore"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("log_line", "outcome_line", "status"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["explored"] = df["explored"].fillna(False).astype(bool)  # logs from before exploration existed
    for c in ("request_id", "time", "endpoint", "requested_model", "chosen", "executed", "reason", "greedy",
              "features_sha256", "text", "bundle_id", "bundle_sha256", "upstream_status", "outcome_source",
              "outcome_file"):
        df[c] = df[c].astype("string")
    return df


def join_feedback(decision_paths: Iterable[str | Path], outcomes_path: str | Path | None):
    """The feedback table and its report (pure: reads, writes nothing)."""
    issues = Issues()
    files = decision_files(decision_paths)
    if not files:
        log.warning("no decision log in %s: the feedback table is empty (no production traffic yet)",
                    ", ".join(map(str, decision_paths)))
    decisions = read_decisions(files, issues)
    known = {r["request_id"] for r in decisions}
    outcome_paths = outcome_files(outcomes_path) if outcomes_path is not None else []
    outcomes = read_outcomes(outcome_paths, known, issues)
    df = feedback_table(decisions, outcomes)
    has = df["correct"].notna()
    by_tier = {}
    for tier, g in df.groupby("executed", dropna=False):
        h = g["correct"].notna()
        by_tier[str(tier)] = {"requests": int(len(g)), "with_outcome": int(h.sum()),
                              "accuracy": float(g.loc[h, "correct"].mean()) if h.any() else None,
                              "predicted_p_correct": float(g["p_correct"].mean()) if g["p_correct"].notna().any() else None}
    report = {
        "decision_files": [str(f) for f in files], "outcome_files": [str(f) for f in outcome_paths],
        "requests": int(len(df)), "with_outcome": int(has.sum()), "without_outcome": int((~has).sum()),
        "explored": int(df["explored"].sum()), "bundles": sorted(str(b) for b in df["bundle_id"].dropna().unique()),
        "accuracy": float(df.loc[has, "correct"].mean()) if has.any() else None,
        "by_executed_tier": by_tier, "issues_total": issues.total, "issues": issues.to_dict(),
    }
    return df, report


def feedback(params: Params, run=NULL_RUN, decisions=None, outcomes=None, out_dir=None) -> dict:
    """Join, write ``feedback.parquet`` and ``feedback_report.json`` under the out folder."""
    cfg = params.feedback
    df, report = join_feedback(decisions or cfg.decisions, outcomes if outcomes is not None else cfg.outcomes)
    out = Path(out_dir or cfg.out_dir)
    artifacts.write_feedback(df, out / TABLE, {"report": {k: report[k] for k in ("requests", "with_outcome")}})
    artifacts.write_json(out / REPORT, report)
    run.log_metrics({k: report[k] for k in ("requests", "with_outcome", "without_outcome", "explored", "issues_total")})
    run.log_artifact(out / REPORT)
    if report["issues_total"]:
        log.warning("%d line(s) not used: %s (listed in %s)", report["issues_total"],
                    {k: v["count"] for k, v in report["issues"].items()}, out / REPORT)
    return {**report, "table": str(out / TABLE), "report": str(out / REPORT)}


def _arguments(ap) -> None:
    ap.add_argument("--decisions", nargs="+", default=None, metavar="LOG",
                    help="decision log(s); rotated files beside each are read too (default: feedback.decisions)")
    ap.add_argument("--outcomes", default=None, metavar="FILE", help="CSV or JSONL: request_id, correct in [0, 1]")
    ap.add_argument("--out", default=None, metavar="DIR", help="output folder (default: feedback.out_dir)")


def main(argv=None) -> dict:
    description = "feedback: decision logs joined with observed outcomes"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("feedback", lambda params, run: feedback(params, run, args.decisions, args.outcomes, args.out),
                     description=description, sections=SECTIONS, args=args,
                     summary=("requests", "with_outcome", "without_outcome", "explored", "issues_total", "table"))


if __name__ == "__main__":
    main()
