"""The label stage: per (query, tier), the probability of a correct answer and its cost.

From rollout records, width tiers come from subsets of the n samples (exact average over
k-subsets, see ``pipelines.estimators``), depth tiers from the records at their budget.
``data.outcomes`` instead imports a precomputed long table (published model responses, your
own logs): ``query_id, text, tier, correct, cost`` and optional ``split``.
"""

from __future__ import annotations

import json
import zlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import Params
from router.tiers import Tier

log = logging.getLogger(__name__)

OUTCOME_COLUMNS = ("query_id", "split", "tier", "model", "budget", "samples", "p_correct",
                   "cost_tokens", "latency_tokens", "cost")


@dataclass(frozen=True)
class LabelConfig:
    out: str = "data/outcomes.parquet"
    tiers_out: str = "data/tiers.json"  # the tier list the labels use, in cost order

    report: str = "data/label_report.json"
    threshold: float = 0.5  # "solved by a tier" means p_correct >= threshold: a vote-worthy majority


def label_config(params: Params) -> LabelConfig:
    from pipelines.config import build

    return build(LabelConfig, params.extra.get("label"), "label")


def outcomes_from_records(df, tiers: list[Tier], split_of: dict[str, str]):
    """Outcome rows from rollout records (one row per query, sample, budget)."""
    import pandas as pd

    from pipelines.estimators import expected_subset_max, majority_vote_accuracy

    rows = []
    by_model = {m: g for m, g in df.groupby("model")}
    for t in tiers:
        g = by_model.get(t.model)
        if g is None:
            raise ValueError(f"tier {t.name}: no rollout records for model {t.model!r}")
        gb = g[g["budget"] == t.budget]
        if gb.empty:
            raise ValueError(f"tier {t.name}: rollout has no records at budget {t.budget}; rerun rollout")
        for qid, q in gb.groupby("query_id", sort=True):
            q = q.sort_values("sample")
            n = len(q)
            if t.samples > n:
                raise ValueError(f"tier {t.name} needs {t.samples} samples; query {qid} has {n}")
            keys = [k if isinstance(k, str) else None for k in q["vote_key"]]
            p = majority_vote_accuracy(keys, q["correct"].tolist(), t.samples, seed=zlib.crc32(str(qid).encode()))
            tokens = q["tokens"].astype(float).tolist()
            cost_tokens = t.samples * sum(tokens) / n
            rows.append({
                "query_id": qid,
                "split": split_of[qid],
                "tier": t.name,
                "model": t.model,
                "budget": t.budget,
                "samples": t.samples,
                "p_correct": p,
                "cost_tokens": cost_tokens,
                "latency_tokens": expected_subset_max(tokens, t.samples),
                "cost": cost_tokens * t.cost_per_token,
            })
    return pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))


def add_query_labels(out, threshold: float):
    """Per query: the cheapest tier reaching ``threshold`` (or "none") and a difficulty bin.

    Tiers are ranked by their mean cost over all queries, so "cheapest" is a property of
    the tier, not of one query's noisy token count. Difficulty is where that tier falls in
    the cost order: "easy" (the cheapest third of tiers), "medium", "hard", or "unsolved".
    """
    order = out.groupby("tier")["cost"].mean().sort_values()
    rank = {t: i for i, t in enumerate(order.index)}
    ok = out[out["p_correct"] >= threshold].copy()
    ok["rank"] = ok["tier"].map(rank)
    first = ok.sort_values(["rank", "tier"]).groupby("query_id")["tier"].first()
    n = max(len(rank), 1)

    def difficulty(tier) -> str:
        if not isinstance(tier, str):
            return "unsolved"
        return ("easy", "medium", "hard")[min(2, 3 * rank[tier] // n)]

    out = out.copy()
    out["cheapest_tier"] = out["query_id"].map(first).fillna("none")
    out["difficulty"] = out["query_id"].map(first).map(difficulty).fillna("unsolved")
    return out


def label(params: Params) -> dict[str, Any]:
    """Run the label stage; returns its report."""
    import pandas as pd

    from pipelines.queries import read_queries
    from pipelines.tracking import stage_run

    cfg = label_config(params)
    with stage_run(params.mlflow, "label") as run:
        run.log_params({"label": cfg.__dict__, "outcomes_table": params.data.outcomes})
        if params.data.outcomes:
            from pipelines.outcome_table import import_outcomes

            out, tiers, queries, bad = import_outcomes(params.data.outcomes, params)
        else:
            from pipelines.shards import read_records

            queries = read_queries(params.prepare.out)
            split = {q.query_id: q.split for q in queries}
            tiers = params.tier_list()
            frames = [read_records(Path(params.rollout.out) / m, set(split)) for m in sorted({t.model for t in tiers})]
            df = pd.concat(frames, ignore_index=True)
            if df.empty:
                raise ValueError(f"no rollout records under {params.rollout.out}; run the rollout stage first")
            out = outcomes_from_records(df, tiers, split)
            bad = []
        out = add_query_labels(out, cfg.threshold)
        for p in (cfg.out, cfg.tiers_out, cfg.report):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        out.to_parquet(cfg.out + ".tmp", index=False)
        Path(cfg.out + ".tmp").replace(cfg.out)
        tier_order = out.groupby("tier")["cost"].mean().sort_values().index.tolist()
        by_name = {t.name: t for t in tiers}
        Path(cfg.tiers_out).write_text(json.dumps([by_name[n].to_dict() for n in tier_order], indent=2) + "\n")
        mean_p = out.groupby("tier")["p_correct"].mean()
        report = {
            "queries": int(out["query_id"].nunique()),
            "tiers": len(tier_order),
            "rows": len(out),
            "by_split": out.drop_duplicates("query_id")["split"].value_counts().to_dict(),
            "tier_accuracy": {t: round(float(mean_p[t]), 4) for t in tier_order},
            "tier_mean_cost": {t: round(float(out[out["tier"] == t]["cost"].mean()), 2) for t in tier_order},
            "difficulty": out.drop_duplicates("query_id")["difficulty"].value_counts().to_dict(),
            "unsolved_queries": int((out.drop_duplicates("query_id")["cheapest_tier"] == "none").sum()),
            "bad_rows": bad,
        }
        Path(cfg.report).write_text(json.dumps(report, indent=2) + "\n")
        run.log_metrics({"queries": report["queries"], "rows": report["rows"],
                         "unsolved_queries": report["unsolved_queries"]})
        run.log_metrics({"tier_accuracy": report["tier_accuracy"]})
        run.log_artifact(cfg.report)
        run.log_artifact(cfg.tiers_out)
    return report


def main(argv=None) -> None:
    from pipelines.config import load_params, stage_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_args("label: p_correct and cost per (query, tier)", argv)
    report = label(load_params(args.params))
    print(json.dumps({k: report[k] for k in ("queries", "tiers", "rows", "unsolved_queries")}))


if __name__ == "__main__":
    main()
