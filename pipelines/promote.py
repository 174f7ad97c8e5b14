"""``python -m pipelines promote``: move an alias of the registered model by hand, on the record.

    python -m pipelines promote --version 7 [--alias champion] --reason "rollback: v8 regressed on X"

The manual override of the promotion gate (``pipelines.promotion``). The reason is required. The
move is recorded three ways: tags on the model version (``override.<alias>.reason``, ``.time``,
``.user``, ``.previous``), tags on this command's MLflow run, and one line appended to the audit
log ``export.promotion_audit`` (which the gate's own moves go to as well).
"""

from __future__ import annotations

from pipelines.config import Params
from pipelines.tracking import NULL_RUN, run_stage, stage_arguments

SECTIONS = ("export",)


def promote(params: Params, version: str, alias: str | None, reason: str, run=NULL_RUN) -> dict:
    from mlflow.exceptions import MlflowException

    from pipelines.promotion import client, move_alias

    cfg = params.export
    if not reason or not reason.strip():
        raise ValueError("--reason is required: say why the gate is overridden")
    cl = client(params)
    try:
        cl.get_model_version(cfg.registered_model, str(version))
    except MlflowException as e:
        raise ValueError(f"{cfg.registered_model} has no version {version}") from e
    record = move_alias(cl, cfg, alias or cfg.alias, str(version), "override", reason.strip())
    run.set_tags({f"override.{k}": v for k, v in record.items()})
    return {**record, "audit": cfg.promotion_audit}


def _arguments(ap) -> None:
    ap.add_argument("--version", required=True, help="the registered model version the alias moves to")
    ap.add_argument("--alias", default=None, help="default: export.alias (champion)")
    ap.add_argument("--reason", required=True, help="why: recorded in the version's tags and the audit log")


def main(argv=None) -> dict:
    description = "promote: point an alias of the registered model at a version by hand (logged)"
    args = stage_arguments(description, _arguments, argv)
    return run_stage("promote", lambda params, run: promote(params, args.version, args.alias, args.reason, run),
                     description=description, sections=SECTIONS, args=args)


if __name__ == "__main__":
    main()
