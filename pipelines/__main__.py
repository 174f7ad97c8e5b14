"""``python -m pipelines all --params FILE [--set KEY=VALUE ...]``: the main stages in order
(prepare ... export), without DVC.

Stage runs are nested under one MLflow pipeline run. ``python -m pipelines STAGE`` runs one.
``python -m pipelines TOOL ...`` runs a feedback-loop command with its own arguments (``feedback``,
``drift``, ``recalibrate``, ``retrain``, ``ope``, ``promote``: see ``python -m pipelines TOOL --help``);
the first five are also the DVC stages of the production loop, which ``all`` does not run (they
read the inbox production/, see its README).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipelines import STAGES, TOOLS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:  # its own options (--decisions, --outcomes, ...)
        importlib.import_module(f"pipelines.{argv[0]}").main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    ap.add_argument("stage", choices=["all", *STAGES, *TOOLS],
                    help="a stage, 'all' to run them in order, or a feedback-loop tool (its own --help)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override one params key for every stage (value parsed as YAML; unknown keys fail)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipelines.config import ConfigError, load_params
    from pipelines.tracking import pipeline_run

    try:
        params = load_params(args.params, args.overrides)  # fail on a bad key before any stage runs
    except ConfigError as e:
        print(f"error: {args.params}: {e}", file=sys.stderr)
        return 2
    todo = STAGES if args.stage == "all" else (args.stage,)
    stage_argv = ["--params", args.params, *(f"--set={o}" for o in args.overrides)]
    with pipeline_run(params.mlflow, name="pipeline" if args.stage == "all" else args.stage):
        for s in todo:
            print(f"== {s}", flush=True)
            importlib.import_module(f"pipelines.{s}").main(stage_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
