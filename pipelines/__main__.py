"""``python -m pipelines all --params FILE``: run every stage in order without DVC.

Stage runs are nested under one MLflow pipeline run. ``python -m pipelines STAGE`` runs one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipelines import STAGES


def available_stages() -> list[str]:
    """Stages whose module exists in this checkout (later issues add the rest)."""
    out = []
    for s in STAGES:
        try:
            importlib.import_module(f"pipelines.{s}")
        except ModuleNotFoundError as e:
            if e.name == f"pipelines.{s}":
                continue
            raise
        out.append(s)
    return out


def main(argv=None) -> int:
    stages = available_stages()
    ap = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    ap.add_argument("stage", choices=["all", *stages], help="a stage, or 'all' to run them in order")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipelines.config import load_params
    from pipelines.tracking import pipeline_run

    params = load_params(args.params)
    todo = stages if args.stage == "all" else [args.stage]
    with pipeline_run(params.mlflow, name="pipeline" if args.stage == "all" else args.stage):
        for s in todo:
            print(f"== {s}", flush=True)
            importlib.import_module(f"pipelines.{s}").main(["--params", args.params])
    return 0


if __name__ == "__main__":
    sys.exit(main())
