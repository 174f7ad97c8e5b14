"""Import a precomputed outcome table (published model responses, your own traffic logs).

Long format, one row per (query, tier) or per (query, tier, sample): ``query_id, text, tier,
correct, cost`` and optional ``split`` and ``answer``. CSV, JSONL or Parquet. Rows that cannot be
used are reported with their line numbers and left out; nothing is guessed.

With an ``answer`` column (each sample's extracted answer; empty: none) and several rows per
(query, tier), a tier's rows are its samples, and the import derives what those samples can
label without new generation (README, "Bring your own outcomes"): majority votes of 2, 4, ...
samples (``<tier>-k<m>``) and an early-stopping vote (``<tier>-a2k<n>``: stop once two answers
agree, at most n), labelled by the same estimators as rollouts (``pipelines.label``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from dataclasses import dataclass, field

from pipelines.artifacts import OUTCOME_COLUMNS
from pipelines.config import Params
from pipelines.queries import SPLITS, Query, split_of
from router.tiers import Tier

log = logging.getLogger(__name__)

REQUIRED = ("query_id", "text", "tier", "correct", "cost")


def read_table(path: str | Path):
    """Read CSV, JSONL or Parquet into a DataFrame with a 1-based ``source_line`` column."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"outcome table not found: {p}")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix == ".gz" else p.suffix.lower()
    if suffix in (".csv", ".csv.gz"):
        df = pd.read_csv(p, dtype={"query_id": str, "text": str, "tier": str, "split": str, "answer": str}, keep_default_na=False,
                         na_values={"correct": [""], "cost": [""]})
        firstsource_line = 2  # line 1 is the header
    elif suffix in (".jsonl", ".json", ".jsonl.gz"):
        df = pd.read_json(p, lines=True, dtype={"query_id": str, "tier": str})
        firstsource_line = 1
    elif suffix == ".parquet":
        df = pd.read_parquet(p)
        firstsource_line = 1
    else:
        raise ValueError(f"{p}: unsupported outcome table format {p.suffix!r}; use .csv, .jsonl or .parquet")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; an outcome table needs {list(REQUIRED)} (+ optional split)")
    df = df.reset_index(drop=True)
    df["source_line"] = df.index + firstsource_line
    return df


def _number(value) -> float:
    """``value`` as a float, NaN if it is not a number (reported as a bad row, never guessed)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _bad(line: int, reason: str, **extra) -> dict[str, Any]:
    return {"line": int(line), "reason": reason, **extra}


def validate_rows(df, declared: set[str] | None):
    """Split rows into usable ones and a report of the rest (with line numbers).

    Vectorized (MMLU-Pro's 71,154 rows: seconds, not a minute); a row's first problem, in the
    order below, is its reason."""
    import pandas as pd

    text = df["text"].map(lambda t: t if isinstance(t, str) else ("" if t is None or (isinstance(t, float)
                                                                                      and math.isnan(t)) else str(t)))
    qid = df["query_id"].map(lambda q: "" if q is None else str(q).strip())
    tier = df["tier"].astype(str)
    correct = pd.to_numeric(df["correct"], errors="coerce")
    cost = pd.to_numeric(df["cost"], errors="coerce")
    checks = [
        (text.str.strip() == "", lambda i: _bad(df["source_line"][i], "missing text", query_id=str(df["query_id"][i]))),
        (qid.isin(["", "nan", "None"]), lambda i: _bad(df["source_line"][i], "missing query_id")),
        (~tier.isin(declared) if declared is not None else pd.Series(False, index=df.index),
         lambda i: _bad(df["source_line"][i], f"tier {tier[i]!r} not declared in params", query_id=qid[i])),
        (~correct.between(0.0, 1.0), lambda i: _bad(df["source_line"][i], f"correct must be in [0, 1], got "
                                                    f"{df['correct'][i]!r}", query_id=qid[i])),
        (~(cost >= 0), lambda i: _bad(df["source_line"][i], f"missing or negative cost {df['cost'][i]!r}",
                                      query_id=qid[i])),
    ]
    bad, flagged = [], pd.Series(False, index=df.index)
    for mask, report in checks:
        new = mask & ~flagged
        bad += [report(i) for i in new[new].index]
        flagged |= new
    ok = ~flagged
    split = df["split"] if "split" in df.columns else pd.Series(None, index=df.index)
    split = split.map(lambda v: str(v) if isinstance(v, str) and v in SPLITS else None)
    keep = pd.DataFrame({"query_id": qid[ok], "text": text[ok], "tier": tier[ok], "correct": correct[ok].astype(float),
                         "cost": cost[ok].astype(float), "split": split[ok], "source_line": df["source_line"][ok]})
    if "answer" in df.columns:
        keep["answer"] = df["answer"][ok].map(lambda a: None if a is None or (isinstance(a, float) and math.isnan(a))
                                              or str(a).strip() == "" else str(a))
    return keep.reset_index(drop=True), sorted(bad, key=lambda b: b["line"])


@dataclass
class ImportedOutcomes:
    """What an outcome table yields: outcome rows, tiers (cost order), queries, bad-row report."""

    outcomes: Any  # DataFrame with OUTCOME_COLUMNS
    tiers: list[Tier]
    queries: list[Query]
    bad: list[dict[str, Any]]
    own_split: bool = False  # the table gave its queries' splits (else: by hash of query_id)
    records: Any = None  # per-sample records (label's format) of tiers with answers and several samples
    derived: list[Tier] = field(default_factory=list)  # the tiers to label from ``records``


def import_outcomes(path: str, params: Params) -> ImportedOutcomes:
    """Outcome rows, tiers, queries and the bad-row report of a table.

    The table's tiers are ordered by mean cost (cheapest first) unless params declare them.
    """
    declared_tiers = params.tier_list()
    table = read_table(path)
    if declared_tiers and not {t.name for t in declared_tiers} & set(table["tier"].astype(str)):
        # the grid in params describes rollouts (e.g. the CPU default), not this table: a table
        # is only checked against declared tiers when it uses at least one of their names
        log.warning("%s: none of the %d tiers declared in params appears in the table; using the "
                    "table's own tiers", path, len(declared_tiers))
        declared_tiers = []
    declared = {t.name for t in declared_tiers} or None
    df, bad = validate_rows(table, declared)
    if df.empty:
        raise ValueError(f"{path}: no usable rows ({len(bad)} bad rows, first: {bad[:3]})")
    agg = df.groupby(["query_id", "tier"], sort=True).agg(
        p_correct=("correct", "mean"), cost=("cost", "mean"), text=("text", "first"), split=("split", "first"))
    agg = agg.reset_index()
    if declared_tiers:
        tiers = declared_tiers
    else:
        # the table's own tiers, cheapest first (mean cost, then name); a table says nothing of
        # budgets or models, so each tier is its own "model" at budget 0 with one sample, priced
        # by the table's cost column
        mean_cost = agg.groupby("tier")["cost"].mean()
        order = sorted(mean_cost.index, key=lambda t: (float(mean_cost[t]), t))
        tiers = [Tier(name=t, model=t, budget=0, samples=1, cost_per_token=1.0) for t in order]
    names = [t.name for t in tiers]
    if len(names) < 2:
        raise ValueError(f"{path}: the table has {len(names)} tier ({names}); routing chooses between at least "
                         f"two tiers")
    # every query needs every tier, or policies cannot be compared on it
    have = agg.groupby("query_id")["tier"].apply(set)
    incomplete = have[have.apply(lambda s: not set(names) <= s)]
    for qid, s in incomplete.items():
        line = int(df.loc[df["query_id"] == qid, "source_line"].min())
        bad.append(_bad(line, f"query lacks tier(s) {sorted(set(names) - s)}", query_id=qid))
    agg = agg[~agg["query_id"].isin(incomplete.index)]
    if agg.empty:
        raise ValueError(f"{path}: no query has every tier {names}")
    fractions = tuple(params.data.split)
    per_query = agg.groupby("query_id", sort=True).agg(text=("text", "first"), split=("split", "first"))
    source = f"outcomes:{Path(path).name}"
    queries, split_by_id = [], {}
    for qid, text, given in zip(per_query.index, per_query["text"], per_query["split"]):
        split = given if isinstance(given, str) else split_of(qid, fractions)
        split_by_id[qid] = split
        queries.append(Query(qid, str(text), "", "exact", source, split, {}))
    by_name = {t.name: t for t in tiers}
    agg["split"] = agg["query_id"].map(split_by_id)
    agg["model"] = agg["tier"].map(lambda n: by_name[n].model)
    agg["budget"] = agg["tier"].map(lambda n: by_name[n].budget)
    agg["samples"] = agg["tier"].map(lambda n: by_name[n].samples)
    price = agg["tier"].map(lambda n: by_name[n].cost_per_token or 1.0)
    agg["cost_tokens"] = agg["cost"] / price
    agg["latency_tokens"] = agg["cost_tokens"]  # the table has no sequence lengths: assume serial
    out = agg[list(OUTCOME_COLUMNS)].reset_index(drop=True)
    own = bool(df["split"].notna().any())
    records, derived = None, []
    if "answer" in df.columns and not declared_tiers:
        records, derived = sample_records(df[df["query_id"].isin(set(split_by_id))], tiers)
    return ImportedOutcomes(out, tiers, queries, sorted(bad, key=lambda b: b["line"]), own_split=own,
                            records=records, derived=derived)


def sample_records(df, tiers: list[Tier]):
    """Per-sample records of every table tier with at least two samples of every query, and the
    tiers they label: votes of 2, 4, ... up to n samples and an early-stopping vote over n.

    A tier's n is its smallest sample count over queries (a query's first n rows in table order
    are used); a tier is a "model" at budget 0 whose samples cost the table's cost column.
    """
    import pandas as pd

    from router.vote import vote_key

    frames, derived = [], []
    for t in tiers:
        g = df[df["tier"] == t.name].sort_values("source_line")
        n = int(g.groupby("query_id").size().min()) if len(g) else 0
        if n < 2:
            continue
        g = g.assign(sample=g.groupby("query_id").cumcount())
        g = g[g["sample"] < n]
        tokens = g["cost"] / (t.cost_per_token or 1.0)  # a table sample is all reasoning: nothing forced
        frames.append(pd.DataFrame({
            "query_id": g["query_id"], "model": t.model, "sample": g["sample"], "budget": 0,
            "vote_key": g["answer"].map(lambda a: vote_key(a) if isinstance(a, str) else None), "correct": g["correct"] >= 0.5,
            "tokens": tokens, "reasoning_tokens": tokens, "forced": False}))
        sizes = sorted({m for m in (2, 4, 8, 16, 32, 64) if m < n} | {n})
        derived += [Tier(f"{t.name}-k{m}", t.model, 0, m, t.cost_per_token) for m in sizes]
        derived.append(Tier(f"{t.name}-a2k{n}", t.model, 0, n, t.cost_per_token, kind="vote_until", agree=2))
    if not frames:
        return None, []
    return pd.concat(frames, ignore_index=True), derived
