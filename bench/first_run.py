"""The README's first command, timed from a fresh clone, as a new user runs it.

    python -m bench.first_run [--repo .] [--keep DIR] [--fresh-venv-only]

Clones the repository (the committed HEAD) into a temporary folder and runs, in one shell,
``bash scripts/setup.sh && . .venv/bin/activate && dvc repro`` with a fresh MLflow store, timing
the install and the pipeline separately. pip's wheel cache is whatever the machine has (a first
build of llama-cpp-python adds about 3.5 minutes; ``pip_cache_had_llama_cpp`` says which case this
was). Writes ``bench/results/first_run.json`` with the wall times, the stage times DVC printed and
the pipeline's metrics files of that run, so the README can show that the committed metrics are
what a fresh clone reproduces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("rollout.json", "label.json", "train.json", "evaluate.json")


def _pip_cache_has_llama_cpp() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python*"], capture_output=True,
                         text=True)
    return "llama_cpp_python" in out.stdout


def run(repo: Path, work: Path) -> dict:
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "MLFLOW_", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    phases = {}
    t0 = time.time()
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, capture_output=True, text=True)
    phases["install_seconds"] = round(time.time() - t0, 1)
    if setup.returncode:
        raise RuntimeError(f"setup.sh failed:\n{setup.stdout[-2000:]}\n{setup.stderr[-2000:]}")
    t1 = time.time()
    repro = subprocess.run(["bash", "-c", ". .venv/bin/activate && dvc repro"], cwd=clone, env=env,
                           capture_output=True, text=True)
    phases["dvc_repro_seconds"] = round(time.time() - t1, 1)
    if repro.returncode:
        raise RuntimeError(f"dvc repro failed:\n{repro.stdout[-3000:]}\n{repro.stderr[-3000:]}")
    phases["total_seconds"] = round(time.time() - t0, 1)
    metrics = {m: json.loads((clone / "metrics" / m).read_text()) for m in METRICS if (clone / "metrics" / m).exists()}
    same = {m: metrics[m] == json.loads((repo / "metrics" / m).read_text())
            for m in metrics if (repo / "metrics" / m).exists() and m != "rollout.json"}
    stages = re.findall(r"Running stage '(\w+)'", repro.stdout)
    return {"phases": phases, "stages_run": stages, "metrics": metrics,
            "metrics_equal_to_committed": same, "command": "bash scripts/setup.sh && . .venv/bin/activate && dvc repro"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="the repository to clone (default: this checkout)")
    ap.add_argument("--keep", default=None, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)

    from bench.results_io import start, write_result

    started = start()
    cached = _pip_cache_has_llama_cpp()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = {"pip_cache_had_llama_cpp": cached, **run(Path(args.repo), work)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    if args.write:
        write_result("first_run", result, started)
    return result


if __name__ == "__main__":
    main()
