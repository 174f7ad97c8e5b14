"""Rollout plan mode: hand-computed token figures, query counts, CLI exit codes, no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import yaml

from pipelines.backends import BACKENDS
from pipelines.config import load_params, parse_params
from pipelines.rollout.planner import count_queries, make_plan, options_class
from pipelines.artifacts import write_queries
from pipelines.queries import Query
from pipelines.rollout import main as rollout_main

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "params" / "gpu.yaml"
HEAVY = ("llama_cpp", "vllm", "torch", "ray", "mlflow", "httpx")


def raw_params(tmp: Path, budgets=(0, 8, 16), samples=(1, 2), n_max=2, **rollout_kw) -> dict:
    return {
        "prepare": {"out": str(tmp / "queries.parquet")},
        "models": {"m": {"backend": "llamacpp", "path": "x.gguf", "cost_per_token": 2.0}},
        "tiers": {"grid": [{"model": "m", "budgets": list(budgets), "samples": list(samples)}]},
        "rollout": {"metrics": str(tmp / "rollout.json"), "n_max": n_max, "answer_tokens": 4, **rollout_kw},
    }


def measured(model="m", budgets=(0, 8, 16), **kw) -> dict:
    """A metrics/rollout.json as rollout_metrics writes it: 4 queries x 2 samples, 10 tokens/sample."""
    return {"queries": 4, "samples": 8, "generated_tokens": 80, "naive_tokens": 200.0, "tokens_per_second": 50.0,
            "backend": "llamacpp", "model": model,
            "budgets": {model: list(budgets)}, **kw}


def write_params(tmp: Path, raw: dict) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipelines.rollout", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- the figures -----------------------------------------------------------------------------


def test_tiny_grid_by_hand(tmp_path):
    # 10 queries, budgets 0/8/16 x samples 1/2, n_max 2, 4 answer tokens, 2.0 per token
    plan = make_plan(parse_params(raw_params(tmp_path)), 10)
    (m,) = plan["models"]
    # a separate run of tier (B, k): 10 queries x k x (B + 4)
    assert [(t["tier"], t["prompts"], t["tokens_worst"]) for t in m["tiers"]] == [
        ("m-b0-k1", 10, 40), ("m-b0-k2", 20, 80), ("m-b8-k1", 10, 120),
        ("m-b8-k2", 20, 240), ("m-b16-k1", 10, 200), ("m-b16-k2", 20, 400),
    ]
    assert m["per_tier"] == {"prompts": 90, "tokens_worst": 1080, "cost_worst": 2160.0,
                             "tokens_expected": None, "cost_expected": None}
    # one pass: 10 queries x 2 samples x (16 reasoning + 4 answer tokens at each of 3 budgets)
    assert m["one_pass"] == {"prompts": 20, "tokens_worst": 560, "cost_worst": 1120.0,
                             "tokens_expected": None, "cost_expected": None}
    assert plan["total"]["one_pass"]["tokens_worst"] == 560
    assert plan["total"]["per_tier"]["cost_worst"] == 2160.0
    assert plan["tokens_per_second"] is None and plan["total"]["one_pass"]["seconds_worst"] is None
    assert "--tokens-per-second" in plan["rate_from"]


def test_expected_case_and_rate_from_a_matching_measurement(tmp_path):
    plan = make_plan(parse_params(raw_params(tmp_path)), 10, measured())
    (m,) = plan["models"]
    # 80 tokens / 8 samples = 10 per sample -> 10 queries x 2 samples x 10; 200 / 4 queries = 50 per query
    assert (m["one_pass"]["tokens_expected"], m["one_pass"]["cost_expected"]) == (200, 400)
    assert (m["per_tier"]["tokens_expected"], m["per_tier"]["cost_expected"]) == (500, 1000)
    one, per = plan["total"]["one_pass"], plan["total"]["per_tier"]
    assert plan["tokens_per_second"] == 50.0
    assert (one["seconds_worst"], one["seconds_expected"]) == pytest.approx((11.2, 4.0))
    assert (per["seconds_worst"], per["seconds_expected"]) == pytest.approx((21.6, 10.0))
    given = make_plan(parse_params(raw_params(tmp_path)), 10, measured(), tokens_per_second=100)
    assert given["total"]["one_pass"]["seconds_worst"] == pytest.approx(5.6)


@pytest.mark.parametrize("other, why", [
    (measured(model="other"), "'other'"),
    (measured(budgets=(0, 8)), "budgets [0, 8]"),
    (measured(queries=0, samples=0), "no previous rollout"),
])
def test_a_measurement_of_another_run_is_not_used(tmp_path, other, why):
    plan = make_plan(parse_params(raw_params(tmp_path)), 10, other)
    (m,) = plan["models"]
    assert m["one_pass"]["tokens_expected"] is None and plan["total"]["per_tier"]["tokens_expected"] is None
    assert why in m["expected_from"]
    if other["model"] != "m":
        assert plan["tokens_per_second"] is None


@pytest.mark.parametrize("budgets, samples", [((16, 64), (1,)), ((0, 16, 32, 64), (1, 2, 4, 6)),
                                              ((0, 256, 1024, 4096), (1, 16))])
def test_one_pass_is_cheaper_than_per_tier_with_several_budgets(tmp_path, budgets, samples):
    plan = make_plan(parse_params(raw_params(tmp_path, budgets, samples, n_max=max(samples))), 7)
    total = plan["total"]
    assert total["one_pass"]["tokens_worst"] < total["per_tier"]["tokens_worst"]
    assert total["one_pass"]["prompts"] < total["per_tier"]["prompts"]


def test_one_budget_one_sample_count_costs_the_same_both_ways(tmp_path):
    total = make_plan(parse_params(raw_params(tmp_path, (64,), (4,), n_max=4)), 7)["total"]
    assert total["one_pass"]["tokens_worst"] == total["per_tier"]["tokens_worst"] == 7 * 4 * (64 + 4)


def test_unknown_query_count_gives_per_query_figures(tmp_path):
    plan = make_plan(parse_params(raw_params(tmp_path)), None)
    assert plan["per_query"] and plan["queries"] is None
    assert plan["total"]["one_pass"]["tokens_worst"] == 56


def test_every_registered_backend_has_an_options_class():
    assert all(is_dataclass(options_class(name)) for name in BACKENDS)


# ---- counting queries ------------------------------------------------------------------------


def test_count_from_the_sources(in_tmp):
    (in_tmp / "q.jsonl").write_text('{"text": "a", "answer": "1"}\n\n{"text": "b", "answer": "2"}\n'
                                    '{"text": "c", "answer": "3"}\n')
    raw = raw_params(in_tmp)
    raw["data"] = {"sources": [{"kind": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 5},
                                                                    {"name": "products", "size": 7}]},
                               {"kind": "jsonl", "path": "q.jsonl"}]}
    n, origin = count_queries(parse_params(raw))
    assert n == 15 and "reasoning_gym 12" in origin and "q.jsonl 3" in origin
    raw["data"]["max_queries"] = 10
    assert count_queries(parse_params(raw))[0] == 10
    raw["rollout"]["max_queries"] = 4
    n, origin = count_queries(parse_params(raw))
    assert n == 4 and "rollout.max_queries=4" in origin


def test_count_with_a_missing_file(in_tmp):
    raw = raw_params(in_tmp)
    raw["data"] = {"sources": [{"kind": "gsm8k", "path": "data/gsm8k/train.jsonl"}]}
    n, origin = count_queries(parse_params(raw))
    assert n is None and "file not found" in origin
    raw["data"]["max_queries"] = 300
    n, origin = count_queries(parse_params(raw))
    assert n == 300 and "data.max_queries=300" in origin


def test_count_from_the_prepared_table_unless_stale(in_tmp):
    raw = raw_params(in_tmp)
    raw["data"] = {"sources": [{"kind": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 50}]}]}
    write_queries([Query.create(f"{i} + 1?", str(i + 1), "reasoning_gym", "reasoning_gym:chain_sum")
                   for i in range(6)], in_tmp / "queries.parquet")
    n, origin = count_queries(parse_params(raw))
    assert n == 6 and "prepare.out" in origin
    raw["data"]["sources"][0]["tasks"][0]["name"] = "products"
    n, origin = count_queries(parse_params(raw))
    assert n == 50 and "stale" in origin and "reasoning_gym:chain_sum" in origin


# ---- the command line ------------------------------------------------------------------------


def test_plan_of_the_gpu_profile(tmp_path):
    p = load_params(GPU)
    (block,) = p.tiers["grid"]
    budgets, samples, a, q, n = block["budgets"], block["samples"], p.rollout.answer_tokens, \
        p.data.max_queries, p.rollout.n_max
    one_pass = q * n * (max(budgets) + a * len(budgets))
    per_tier = q * sum(k * (b + a) for b in budgets for k in samples)

    # in an empty folder: no data files, no queries table, no metrics; max_queries bounds the count
    proc = run_cli("--params", str(GPU), "--plan", "--tokens-per-second", "2500", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{one_pass:,}" in proc.stdout and f"{per_tier:,}" in proc.stdout
    assert "2,500.0 tokens/s" in proc.stdout and "file not found" in proc.stdout

    proc = run_cli("--params", str(GPU), "--plan", "--tokens-per-second", "2500", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    total = json.loads(proc.stdout)["total"]
    assert total["one_pass"]["tokens_worst"] == one_pass and total["per_tier"]["tokens_worst"] == per_tier
    assert total["one_pass"]["seconds_worst"] == pytest.approx(one_pass / 2500)


def test_gpu_profile_is_complete_and_writes_the_default_paths():
    gpu, default = load_params(GPU), load_params(REPO / "params.yaml")
    assert gpu.model("qwen2_5-1_5b").backend == "vllm"
    for name in ("prepare", "rollout", "label", "featurize", "train", "evaluate", "export"):
        paths = [{k: v for k, v in asdict(getattr(p, name)).items()
                  if k in ("out", "out_dir", "metrics", "report", "tiers_out", "plots_dir")} for p in (gpu, default)]
        assert paths[0] == paths[1]


def _bad(raw: dict, edit) -> dict:
    edit(raw)
    return raw


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["models"]["m"].update(backend="vlm"), "unknown backend 'vlm'; choose one of ['llamacpp', 'openai', 'vllm']"),
    (lambda r: r["rollout"].update(n_maxx=3), "rollout: unknown key(s) ['n_maxx']"),
    (lambda r: r["rollout"].update(n_max=1), "rollout.n_max=1 is below the largest tier sample count 2"),
    (lambda r: r["models"]["m"].update(options={"n_ctxx": 1}), "models.m.options: llamacpp options: unknown key(s)"),
    (lambda r: r["models"]["m"].update(backend="vllm", options={"max_model_len": 16}),
     "max_model_len=16 leaves no room for a prompt"),
    (lambda r: r["models"]["m"].update(template="hf"), "unknown template 'hf'"),
    (lambda r: r["rollout"].update(executor="slurm"), "unknown rollout.executor 'slurm'"),
])
def test_a_bad_config_exits_2_with_one_line(tmp_path, capsys, edit, message):
    path = write_params(tmp_path, _bad(raw_params(tmp_path), edit))
    assert rollout_main(["--params", str(path), "--plan"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1


def test_exit_status_2_from_the_process(tmp_path):
    path = write_params(tmp_path, _bad(raw_params(tmp_path), lambda r: r["models"]["m"].update(backend="vlm")))
    proc = run_cli("--params", str(path), "--plan", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown backend 'vlm'" in proc.stderr and proc.stdout == ""


def test_an_outcome_table_means_nothing_to_generate(tmp_path, capsys):
    raw = raw_params(tmp_path)
    raw["data"] = {"outcomes": "table.csv"}
    assert rollout_main(["--params", str(write_params(tmp_path, raw)), "--plan"]) == 0
    assert "nothing to generate" in capsys.readouterr().out


def test_plan_mode_imports_no_engine(tmp_path):
    raw = raw_params(tmp_path, executor="ray", ray_address="auto")
    raw["models"]["v"] = {"backend": "vllm", "path": "Qwen/Qwen2.5-1.5B-Instruct", "options": {"dtype": "auto"}}
    raw["models"]["o"] = {"backend": "openai", "path": "served", "options": {"base_url": "http://127.0.0.1:1/v1"}}
    raw["tiers"]["grid"] += [{"model": "v", "budgets": [0, 64], "samples": [1, 2]},
                             {"model": "o", "budgets": [0], "samples": [1]}]
    write_queries([Query.create("1 + 1?", "2", "exact", "t")], tmp_path / "queries.parquet")
    (tmp_path / "rollout.json").write_text(json.dumps(measured()))
    path = write_params(tmp_path, raw)
    code = ("import json, sys; from pipelines.rollout import main; rc = main(['--params', sys.argv[1], '--plan']); "
            f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rc, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0 and heavy == []


def test_plan_counts_adaptive_tiers_worst_and_expected(tmp_path):
    from pipelines.config import parse_params
    from pipelines.rollout.planner import make_plan

    p = parse_params({"models": {"m": {}}, "rollout": {"answer_tokens": 10},
                      "tiers": {"grid": [{"model": "m", "budgets": [0, 32, 64], "samples": [1, 4]}],
                                "adaptive": [{"kind": "vote_until", "model": "m", "budget": 64, "agree": 2,
                                              "max_samples": 6},
                                             {"kind": "cascade", "chain": ["m-b32-k1", "m-b64-k4"]}]}})
    plan = make_plan(p, 10, labelled={"tier_mean_cost": {"m-b64-a2k6": 90.5}})
    by = {a["tier"]: a for a in plan["adaptive"]}
    assert by["m-b64-a2k6"]["tokens_worst_per_query"] == 6 * (64 + 10)
    assert by["m-b64-a2k6"]["cost_expected_per_query"] == 90.5
    # sample 0 reaches 32 then continues to 64 (32 more); samples 1-3 start at 64; 5 forced answers
    assert by["m-b32-k1-then-m-b64-k4"]["tokens_worst_per_query"] == (32 + 10) + (32 + 10) + 3 * (64 + 10)
    assert by["m-b32-k1-then-m-b64-k4"]["cost_expected_per_query"] is None
    # the one pass covers what vote_until needs: 6 samples at budget 64
    assert plan["models"][0]["n_max"] == 6


# ---- the GPU profile broken on the command line: plan mode, the real CLI ------------------------

GPU_MODEL = "models.qwen2_5-1_5b"
# how a process started as `python -m MODULE ARGS...` exits, and which engines it imported by then
WATCHED_MAIN = ("import json, runpy, sys\n"
                "module, sys.argv = sys.argv[1], sys.argv[1:]\n"
                "try:\n    runpy.run_module(module, run_name='__main__', alter_sys=True); rc = 0\n"
                "except SystemExit as e:\n    rc = e.code\n"
                f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))")


def run_watched(module: str, *args: str, cwd: Path) -> tuple[int, list[str], str]:
    """(exit code, engine modules imported, stderr) of ``python -m module args``."""
    proc = subprocess.run([sys.executable, "-c", WATCHED_MAIN, module, *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    rc, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    return rc, heavy, proc.stderr


@pytest.mark.parametrize("override, message", [
    # an option vLLM does not have (its real name: gpu_memory_utilization)
    (f"{GPU_MODEL}.options.gpu_memory_util=0.8",
     f"{GPU_MODEL}.options: vllm options: unknown key(s) ['gpu_memory_util']; valid keys are"),
    (f"{GPU_MODEL}.template=qwen",
     f"{GPU_MODEL}.template: unknown template 'qwen'; choose one of ['chatml', 'fewshot', 'raw']"),
    # the profile's max_model_len is 5120: a budget of 8192 cannot fit one sequence
    ("tiers.grid.0.budgets=[0, 1024, 8192]",
     f"{GPU_MODEL}.options.max_model_len=5120 leaves no room for a prompt at budget 8192 + 32 answer tokens"),
    ("rollout.n_max=8", "rollout.n_max=8 is below the largest tier sample count 16"),
    ("data.max_querys=6", "unknown key 'max_querys' in data; valid keys are ['max_queries', 'outcomes'"),
])
def test_a_broken_gpu_profile_fails_the_plan_with_one_line_and_no_engine(tmp_path, override, message):
    rc, heavy, err = run_watched("pipelines.rollout", "--params", str(GPU), "--plan", "--set", override, cwd=tmp_path)
    assert rc == 2 and heavy == []
    assert err.count("\n") == 1 and err.startswith(f"rollout --plan: {GPU}: ") and message in err, err


def test_plan_takes_set_overrides(tmp_path):
    proc = run_cli("--params", str(GPU), "--plan", "--json", "--set", "data.max_queries=10", "--set",
                   "tiers.grid.0.budgets=[0, 64]", "--set", "tiers.grid.0.samples=[1, 2]", "--set", "rollout.n_max=2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    a = load_params(GPU).rollout.answer_tokens  # 32: what the file says
    assert plan["queries"] == 10 and plan["models"][0]["budgets"] == [0, 64]
    # 10 queries x 2 samples x (64 + 32 answer tokens at each of 2 budgets)
    assert plan["total"]["one_pass"]["tokens_worst"] == 10 * 2 * (64 + a * 2)


def test_pipelines_all_refuses_an_unknown_key_before_any_stage(tmp_path):
    rc, heavy, err = run_watched("pipelines", "all", "--params", str(GPU), "--set", "data.max_querys=6", cwd=tmp_path)
    assert rc == 2 and heavy == [] and err.count("\n") == 1
    assert "unknown key 'max_querys' in data; valid keys are ['max_queries', 'outcomes', 'sources', 'split']" in err
    assert list(tmp_path.iterdir()) == []  # no stage ran: nothing written, no MLflow store
