"""How a bundle's decisions are executed: the settings the labels were made with, per model.

The labels say what tier (B, k) of a model yields when run one particular way: the question
rendered with the model's template and system prompt, k samples at ``max_tokens=B`` with the
rollout's sampling settings and seeds, a cut sample's answer forced with the rollout's suffix
and answer-token limit, a majority vote. ``pipelines/export.py`` writes those settings into the
bundle's ``manifest.json`` under ``execution`` (keys documented in the README, "Serve it"), so the
proxy and ``router.executor.execute`` need nothing else:

    "execution": {
      "seed_rule": "seed+i;mix_seed/v1",
      "models": {
        "smollm2": {"template": "chatml", "system_prompt": "...", "force_suffix": "\\nThe final answer is",
                    "direct_prefix": "The final answer is", "answer_tokens": 10,
                    "sampling": {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "force_temperature": 0.8,
                                 "stop": []},
                    "stop": ["<|im_end|>", "<|im_start|>"], "answer_stop": ["\\n", "<|im_end|>", "<|im_start|>"],
                    "tokens_per_second": 92.8}}}

A bundle without the section (made before it existed) still loads and routes; executing a
decision then fails with one ``BundleError`` naming the model and the missing keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from router.bundle import BundleError
from router.generation import OnePassRequest, SamplingConfig
from router.prompts import answer_stops, check_template, completion_stops, render_conversation

# Sample i of a request seeded s is seeded s + i; the forced answer of sample i at budget B is
# seeded mix_seed(s, i, B) (router.generation). A bundle made under another rule is refused.
SEED_RULE = "seed+i;mix_seed/v1"
SEED_LIMIT = 2**31 - 1024  # request seeds below this: seed + i stays a valid 32-bit engine seed
_SAMPLING_KEYS = {f.name for f in fields(SamplingConfig)}


def prompt_seed(prompt: str) -> int:
    """The request seed when a client gives none: a hash of the rendered prompt, so the same
    request gets the same samples (and answer) every time, like a query's seed in the rollout."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % SEED_LIMIT


@dataclass(frozen=True)
class ModelExecution:
    """What executing a tier of one model needs. Defaults are the rollout's defaults."""

    template: str = "raw"  # chatml | fewshot | raw (router.prompts)
    system_prompt: str = ""
    force_suffix: str = "\nThe final answer is"  # appended to a cut sample to force its answer
    direct_prefix: str = "The final answer is"  # what budget 0 appends straight after the prompt
    answer_tokens: int = 12  # max tokens of a forced answer
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # the upstream's generated tokens per second when the rollout ran (metrics/rollout.json): the
    # proxy's first latency estimate, replaced by what it measures. None: not measured
    tokens_per_second: float | None = None

    def __post_init__(self):
        check_template(self.template)
        if int(self.answer_tokens) < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if self.tokens_per_second is not None and not float(self.tokens_per_second) > 0:
            raise ValueError(f"tokens_per_second must be > 0, got {self.tokens_per_second}")

    @property
    def stops(self) -> tuple[str, ...]:
        return completion_stops(self.template, self.sampling.stop)

    @property
    def answer_stops(self) -> tuple[str, ...]:
        return answer_stops(self.template)

    def prompt(self, conversation: str | Sequence[tuple[str, str]], system_extra: str = "") -> str:
        """The rendered prompt of a question (a string) or a conversation (``(role, text)`` turns
        ending with a user turn). ``system_extra`` (a client's own system message) follows the
        bundle's system prompt, after a blank line."""
        turns = [("user", conversation)] if isinstance(conversation, str) else list(conversation)
        system = self.system_prompt + (f"\n\n{system_extra}" if system_extra else "")
        return render_conversation(self.template, system, turns)

    def request(self, prompt: str, budget: int, samples: int, seed: int | None = None,
                key: str = "execute") -> OnePassRequest:
        """The one-budget request that executes tier (``budget``, ``samples``) on ``prompt``."""
        return OnePassRequest(key=key, prompt=prompt, n=int(samples), budgets=(int(budget),),
                              seed=prompt_seed(prompt) if seed is None else int(seed),
                              force_suffix=self.force_suffix, direct_prefix=self.direct_prefix,
                              answer_tokens=int(self.answer_tokens))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sampling"]["stop"] = list(self.sampling.stop)
        d["stop"], d["answer_stop"] = list(self.stops), list(self.answer_stops)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "execution") -> "ModelExecution":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"stop", "answer_stop"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        s = d["sampling"]
        if not isinstance(s, Mapping) or set(s) - _SAMPLING_KEYS:
            raise ValueError(f"{where}.sampling: expected a mapping with keys from {sorted(_SAMPLING_KEYS)}")
        sampling = SamplingConfig(**{**s, "stop": tuple(s.get("stop") or ())})
        out = cls(**{**{k: d[k] for k in names}, "sampling": sampling})
        # the stop strings the labels were made with must be the ones this runtime would send
        for key, ours in (("stop", out.stops), ("answer_stop", out.answer_stops)):
            if key in d and tuple(d[key]) != ours:
                raise ValueError(f"{where}.{key}: the bundle was made with {d[key]!r}, this runtime's "
                                 f"template {out.template!r} stops at {list(ours)!r}")
        return out


def execution_of(manifest: Mapping[str, Any], path: str = "manifest.json") -> dict[str, ModelExecution]:
    """The per-model execution settings of a bundle manifest ({} for a bundle without them).

    A section that is there but wrong (bad keys, another seed rule) is a ``BundleError``."""
    section = manifest.get("execution")
    if section is None:
        return {}
    try:
        if not isinstance(section, Mapping) or not isinstance(section.get("models"), Mapping):
            raise ValueError("execution: expected {'seed_rule': ..., 'models': {model: settings}}")
        if section.get("seed_rule") != SEED_RULE:
            raise ValueError(f"execution.seed_rule {section.get('seed_rule')!r} is not this runtime's "
                             f"{SEED_RULE!r}: samples would not be the ones the labels describe")
        return {str(m): ModelExecution.from_dict(d, f"execution.models.{m}") for m, d in section["models"].items()}
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: {e}") from e


def execution_section(models: Mapping[str, ModelExecution]) -> dict[str, Any]:
    """The manifest's ``execution`` value for these models (what ``execution_of`` reads back)."""
    return {"seed_rule": SEED_RULE, "models": {m: e.to_dict() for m, e in models.items()}}


def require(executions: Mapping[str, ModelExecution], models: Sequence[str], path: str = "manifest.json") -> None:
    """A ``BundleError`` naming every model in ``models`` the bundle cannot execute."""
    missing = [m for m in models if m not in executions]
    if missing:
        keys = ", ".join(f.name for f in fields(ModelExecution))
        raise BundleError(f"{path}: no execution settings for model(s) {missing} (manifest key "
                          f"execution.models.<model>: {keys}); re-export the bundle with this version "
                          f"(python -m pipelines.export) to serve or execute it")
