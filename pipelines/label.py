"""The label stage: per (query, tier), the probability of a correct answer and its cost.

Rollout records hold what the model produced at each budget (its own completion, or the answer
forced on its truncated prefix); this stage extracts each answer and checks it with the query's
verifier, so a verifier fix relabels without generating anything. Width tiers come from subsets
of the n samples (exact average over k-subsets, see ``pipelines.estimators``), depth tiers from
the records at their budget. ``data.outcomes`` instead imports a precomputed long table
(published model responses, your own logs): ``query_id, text, tier, correct, cost`` and
optional ``split``.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING, Any

from pipelines import artifacts
from pipelines.config import Params
from pipelines.queries import Query
from pipelines.tracking import NULL_RUN, run_stage
from router.tiers import Tier

if TYPE_CHECKING:
    from pipelines.adaptive import Samples

log = logging.getLogger(__name__)

SECTIONS = ("data", "prepare", "models", "tiers", "rollout", "label")


def score_records(df, queries: dict[str, Query]):
    """Add ``answer``, ``vote_key`` and ``correct`` to rollout records with the queries' verifiers.

    Forced answers repeat a lot ("The final answer is 12."): each distinct (query, text) is
    verified once.
    """
    from pipelines.verifiers import score
    from router.vote import vote_key

    # a sample that finished within a budget answers there with its own completion (stored once)
    own = df.dropna(subset=["completion"]).set_index(["query_id", "model", "sample"])["completion"]
    own = own[~own.index.duplicated()].to_dict()
    cache: dict[tuple[str, str], tuple[str | None, bool]] = {}
    answers, keys, correct = [], [], []
    for qid, model, sample, forced, text in zip(df["query_id"], df["model"], df["sample"], df["forced"],
                                                df["answer_text"]):
        if not forced:
            text = own.get((qid, model, sample))
            if text is None:
                raise ValueError(f"rollout records of query {qid} sample {sample} ({model}) lack the completion; "
                                 f"rerun the rollout stage")
        k = (qid, text if isinstance(text, str) else "")
        if k not in cache:
            cache[k] = score(queries[qid], k[1])
        a, c = cache[k]
        answers.append(a)
        keys.append(vote_key(a))
        correct.append(bool(c))
    df = df.copy()
    df["answer"], df["vote_key"], df["correct"] = answers, keys, correct
    return df


def outcomes_from_records(df, tiers: list[Tier], split_of: dict[str, str]):
    """Outcome rows from scored rollout records (one row per query, sample, budget)."""
    import pandas as pd

    from pipelines.estimators import expected_subset_max, majority_vote_accuracy

    rows = []
    by_model = {m: g for m, g in df.groupby("model")}
    for t in (t for t in tiers if not t.adaptive):
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
    rows += adaptive_rows(df, tiers, split_of)
    return pd.DataFrame(rows, columns=list(artifacts.OUTCOME_COLUMNS))


def samples_of(df) -> dict[tuple[str, str], "Samples"]:
    """Per (query, model): its n samples at every budget, as the adaptive labels read them."""
    from pipelines.adaptive import Samples

    out = {}
    for (qid, model), g in df.groupby(["query_id", "model"], sort=True):
        n = int(g["sample"].nunique())
        s = Samples(n=n, correct_keys={k for k, c in zip(g["vote_key"], g["correct"]) if c and isinstance(k, str)})
        for b, gb in g.groupby("budget"):
            gb = gb.sort_values("sample")
            if len(gb) != n:
                raise ValueError(f"query {qid} ({model}): {len(gb)} records at budget {b}, expected {n}")
            s.keys[int(b)] = [k if isinstance(k, str) else None for k in gb["vote_key"]]
            s.tokens[int(b)] = gb["tokens"].astype(float).tolist()
            s.reasoning[int(b)] = gb["reasoning_tokens"].astype(float).tolist()
            s.forced[int(b)] = gb["forced"].astype(bool).tolist()
        out[(qid, model)] = s
    return out


def adaptive_rows(df, tiers: list[Tier], split_of: dict[str, str]) -> list[dict]:
    """Outcome rows of the adaptive tiers: expectations over sample arrival orders, from the
    same records (``pipelines/adaptive.py``); nothing is generated for them."""
    from pipelines.adaptive import Stage, cascade, vote_until

    adaptive = [t for t in tiers if t.adaptive]
    if not adaptive:
        return []
    by_name = {t.name: t for t in tiers}
    samples = samples_of(df)
    queries = sorted({q for q, _ in samples})
    rows = []
    for t in adaptive:
        for qid in queries:
            seed = zlib.crc32(f"{qid}:{t.name}".encode())
            if t.kind == "vote_until":
                o = vote_until(samples[(qid, t.model)], t.budget, t.agree, t.samples, t.step,
                               price=t.cost_per_token, seed=seed)
            else:
                stages = [by_name[c] for c in t.chain]
                o = cascade([Stage(s.model, s.budget, s.samples, s.cost_per_token, s.budget) for s in stages],
                            {s.model: samples[(qid, s.model)] for s in stages}, seed=seed)
            rows.append({"query_id": qid, "split": split_of[qid], "tier": t.name, "model": t.model,
                         "budget": t.budget, "samples": t.samples, "p_correct": o.p_correct,
                         "cost_tokens": o.cost_tokens, "latency_tokens": o.latency_tokens, "cost": o.cost})
    return rows


def tier_order(out) -> list[str]:
    """Tiers cheapest first by mean cost over all queries (then by name, so ties are stable)."""
    mean = out.groupby("tier")["cost"].mean()
    return sorted(mean.index, key=lambda t: (float(mean[t]), t))


def add_query_labels(out, threshold: float):
    """Per query: the cheapest tier reaching ``threshold`` (or "none") and a difficulty bin.

    Tiers are ranked by their mean cost over all queries, so "cheapest" is a property of
    the tier, not of one query's noisy token count. Difficulty is where that tier falls in
    the cost order: "easy" (the cheapest third of tiers), "medium", "hard", or "unsolved".
    """
    rank = {t: i for i, t in enumerate(tier_order(out))}
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


def outcomes_from_rollouts(params: Params):
    """Outcome rows and tiers from the rollout shards, scored here."""
    import pandas as pd

    queries = {q.query_id: q for q in artifacts.read_queries(params.prepare.out)}
    tiers = params.tier_list()
    frames = [artifacts.read_records(f"{params.rollout.out}/{m}", set(queries))
              for m in sorted({t.model for t in tiers})]
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise ValueError(f"no rollout records under {params.rollout.out}; run the rollout stage first")
    df = score_records(df, queries)
    split = {qid: q.split for qid, q in queries.items()}
    # one sample's accuracy at each budget, over every sample: how much depth alone buys
    single = {f"{m}-b{b}": round(float(g["correct"].mean()), 4) for (m, b), g in df.groupby(["model", "budget"])}
    return outcomes_from_records(df, tiers, split), tiers, single


def label(params: Params, run=NULL_RUN) -> dict[str, Any]:
    """Run the label stage; returns its report."""
    cfg = params.label
    if params.data.outcomes:
        from pipelines.outcome_table import import_outcomes

        imported = import_outcomes(params.data.outcomes, params)
        out, tiers, bad, single = imported.outcomes, imported.tiers, imported.bad, None
        if imported.derived:  # votes and early-stopping votes over the table's own samples
            import pandas as pd

            split = dict(zip(out["query_id"], out["split"]))
            out = pd.concat([out, outcomes_from_records(imported.records, imported.derived, split)],
                            ignore_index=True)
            tiers = [*tiers, *imported.derived]
        splits_from = "table" if imported.own_split else "hash"
    else:
        (out, tiers, single), bad = outcomes_from_rollouts(params), []
        splits_from = "queries"
    out = add_query_labels(out, cfg.threshold)
    artifacts.write_outcomes(out, cfg.out, splits_from=splits_from)
    order = tier_order(out)
    by_name = {t.name: t for t in tiers}
    artifacts.write_tiers([by_name[n].to_dict() for n in order], cfg.tiers_out)
    mean_p = out.groupby("tier")["p_correct"].mean()
    mean_c = out.groupby("tier")["cost"].mean()
    per_query = out.drop_duplicates("query_id")
    report = {
        "queries": int(out["query_id"].nunique()),
        "tiers": len(order),
        "rows": len(out),
        "by_split": per_query["split"].value_counts().to_dict(),
        "splits_from": splits_from,
        "tier_accuracy": {t: round(float(mean_p[t]), 4) for t in order},
        "tier_mean_cost": {t: round(float(mean_c[t]), 2) for t in order},
        "difficulty": per_query["difficulty"].value_counts().to_dict(),
        "unsolved_queries": int((per_query["cheapest_tier"] == "none").sum()),
        "single_sample_accuracy": single,
        "bad_rows": bad,
    }
    artifacts.write_json(cfg.report, report)
    artifacts.write_json(cfg.metrics, {**{k: v for k, v in report.items() if k != "bad_rows"},
                                       "bad_rows": len(bad)})
    run.log_metrics({"queries": report["queries"], "rows": report["rows"],
                     "unsolved_queries": report["unsolved_queries"]})
    run.log_metrics({"tier_accuracy": report["tier_accuracy"]})
    run.log_artifact(cfg.report)
    run.log_artifact(cfg.metrics)
    run.log_artifact(cfg.tiers_out)
    return report


def main(argv=None) -> dict:
    return run_stage("label", label, argv, description="label: p_correct and cost per (query, tier)",
                     sections=SECTIONS, summary=("queries", "tiers", "rows", "unsolved_queries"))


if __name__ == "__main__":
    main()
