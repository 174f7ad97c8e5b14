"""MLflow tracking for every stage: one run per stage, nested under a pipeline run.

The store defaults to ``sqlite:///mlflow.db`` in the working directory (MLflow's own
default since 3.7, made explicit). ``MLFLOW_TRACKING_URI`` overrides params, so tests can
point at a temporary SQLite file. MLflow is imported only when a run starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# set by `python -m pipelines all` so stage runs nest under one pipeline run
PARENT_ENV = "DR_MLFLOW_PARENT_RUN_ID"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys (MLflow params are flat strings)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = d if not isinstance(d, (list, tuple)) else json.dumps(list(d))
    return out


def tracking_uri(config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri


def _use_experiment(mlflow, config) -> None:
    """Select the experiment, creating it with artifacts beside a SQLite store.

    MLflow would put artifacts of a new experiment in ./mlruns of whatever the working
    directory is; keeping them next to the database keeps a store self-contained (and keeps
    tests from writing into the work tree).
    """
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(config.experiment) is None and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        try:
            mlflow.create_experiment(config.experiment, artifact_location=(db.parent / "mlartifacts").as_uri())
        except Exception:  # another process created it first
            pass
    mlflow.set_experiment(config.experiment)


class _NullRun:
    """Stands in for a run when tracking is disabled, so stages need no if-statements."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...


class _Run:
    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        # MLflow refuses to change a logged param; stages log each key once per run
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict) -> None:
        clean = {}
        for k, v in flatten(metrics).items():
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)):
                clean[k.replace("@", "_at_")] = float(v)
        if clean:
            self._mlflow.log_metrics(clean)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._mlflow.log_artifacts(str(p), artifact_path)
        elif p.exists():
            self._mlflow.log_artifact(str(p), artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def stage_run(config, stage: str, params_file: str | None = None) -> Iterator[_Run | _NullRun]:
    """Open an MLflow run for ``stage`` (nested under the pipeline run if there is one)."""
    if not config.enabled:
        yield _NullRun()
        return
    import mlflow

    _use_experiment(mlflow, config)
    parent = os.environ.get(PARENT_ENV)
    kwargs: dict[str, Any] = {"run_name": stage}
    if parent:
        kwargs.update(nested=True, parent_run_id=parent)
    with mlflow.start_run(**kwargs) as run:
        r = _Run(mlflow, run)
        r.set_tags({"stage": stage})
        # every stage's run carries the params file it ran with
        if params_file and Path(params_file).exists():
            r.log_artifact(params_file)
        yield r


@contextlib.contextmanager
def pipeline_run(config, name: str = "pipeline") -> Iterator[str | None]:
    """A parent run for `python -m pipelines all`; stage runs nest under it."""
    if not config.enabled:
        yield None
        return
    import mlflow

    _use_experiment(mlflow, config)
    with mlflow.start_run(run_name=name) as run:
        old = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if old is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = old


# ---------------------------------------------------------------- the command line of every stage


def stage_arguments(description: str, add_arguments=None, argv=None):
    """Parse what every stage's command line takes: ``--params FILE`` and ``--set KEY=VALUE``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override one params key, e.g. --set data.max_queries=6 (value parsed as YAML; "
                    "repeat for several; unknown keys fail)")
    if add_arguments is not None:
        add_arguments(ap)
    return ap.parse_args(argv)


def run_stage(name: str, fn, argv=None, *, description: str, sections: tuple[str, ...],
              summary: tuple[str, ...] | None = (), args=None) -> dict:
    """Run stage ``name`` as its command line does: parse arguments, load params, open the
    stage's MLflow run (logging the params file and the ``sections`` the stage reads), call
    ``fn(params, run)`` and print the ``summary`` keys of its result as one JSON line (all of
    it for ``()``; nothing for None, when the stage prints its own line)."""
    from dataclasses import asdict

    from pipelines.config import load_params

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = args or stage_arguments(description, argv=argv)
    params = load_params(args.params, args.overrides)
    with stage_run(params.mlflow, name, args.params) as run:
        run.log_params({s: _section(params, s, asdict) for s in sections})
        if args.overrides:
            run.set_tags({"overrides": " ".join(args.overrides)})
        result = fn(params, run)
    if summary is not None:
        print(json.dumps({k: result.get(k) for k in summary} if summary else result, default=str), flush=True)
    return result


def _section(params, name: str, asdict):
    value = getattr(params, name)
    if isinstance(value, dict):
        return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in value.items()}
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


NULL_RUN = _NullRun()
