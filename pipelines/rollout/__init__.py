"""The rollout stage as a package: the unit of work (``work``), the local and Ray executors,
the planner (``--plan``) and the stage itself (``stage``); ``python -m pipelines.rollout`` runs it."""

from pipelines.rollout.cli import main
from pipelines.rollout.stage import rollout, rollout_metrics
from pipelines.rollout.work import ModelPlan, plan_rollout, rollout_chunk

__all__ = ["main", "rollout", "rollout_metrics", "ModelPlan", "plan_rollout", "rollout_chunk"]
