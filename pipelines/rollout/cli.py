"""The rollout command line: ``python -m pipelines.rollout [--params FILE] [--set KEY=VALUE ...] [--plan [--tokens-per-second X] [--json]]``."""

from __future__ import annotations

from pipelines.tracking import run_stage, stage_arguments

DESCRIPTION = "rollout: one pass of the LLM over every query at every budget"
SUMMARY = ("queries", "samples", "generated_tokens", "naive_tokens", "tokens_per_second", "wall_seconds")


def _plan_arguments(ap) -> None:
    ap.add_argument("--plan", action="store_true",
                    help="validate params and print what the rollout would generate, cost and take; generate nothing")
    ap.add_argument("--tokens-per-second", type=float, default=None, metavar="X",
                    help="with --plan: generation rate for the time estimate (default: the measured one, if any)")
    ap.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")


def main(argv=None) -> int:
    args = stage_arguments(DESCRIPTION, _plan_arguments, argv)
    if args.plan:
        from pipelines.rollout.planner import run_plan  # imports no backend engine: safe before a GPU is free

        return run_plan(args.params, args.tokens_per_second, as_json=args.json, overrides=args.overrides)
    if args.json or args.tokens_per_second is not None:
        raise SystemExit("rollout: --json and --tokens-per-second apply only with --plan")
    from pipelines.rollout.stage import SECTIONS, rollout

    run_stage("rollout", rollout, description=DESCRIPTION, sections=SECTIONS, summary=SUMMARY, args=args)
    return 0
