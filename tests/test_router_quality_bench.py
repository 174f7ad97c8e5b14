"""bench.router_quality runs the project's own stages on an outcome table (with a groups file)
and its README renderer shows the router beside its baselines, overall and within groups."""

from __future__ import annotations

import json

import pandas as pd

from tests.pipelines.test_train import outcome_table


def test_router_quality_on_a_small_table_with_groups(tmp_path, capsys):
    from bench import router_quality
    from bench.readme import router_quality_table

    outcome_table(tmp_path / "t.csv", n=60)
    qids = sorted(pd.read_csv(tmp_path / "t.csv")["query_id"].unique())
    pd.DataFrame({"query_id": qids, "group": ["add" if i % 2 else "mul" for i in range(len(qids))]}).to_csv(
        tmp_path / "t.groups.csv", index=False)
    router_quality.main(["--table", str(tmp_path / "t.csv"), "--embeddings", "none", "--cache",
                         str(tmp_path / "cache"), "--no-write"])
    out = capsys.readouterr().out
    assert "| t |" in out and "Within groups" in out and "Routing by group alone" in out
    work = tmp_path / "cache" / "t" / "none"
    ev = json.loads((work / "evaluate.json").read_text())
    assert ev["cv_folds"] == 5 and ev["evaluated_queries"] == 60
    wg = ev["within_groups"]
    assert wg["router"]["groups"] == 2 and set(wg["router"]["per_group"]) == {"add", "mul"}
    assert {"random", "constant", "logreg"} <= set(wg)
    # a second run reuses the cached features
    router_quality.main(["--table", str(tmp_path / "t.csv"), "--embeddings", "none", "--cache",
                         str(tmp_path / "cache"), "--no-write"])
    res = {"meta": {}, "tables": [], "targets": None}
    assert router_quality_table(res).startswith("| table |")
