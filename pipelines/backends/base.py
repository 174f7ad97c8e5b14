"""The backend interface: one-pass rollouts of a real LLM at many budgets at once.

A backend samples ``n`` completions per prompt once at the largest budget, then, for every
smaller budget a sample did not finish within, forces an answer by appending the
answer-forcing suffix to the sample truncated at that budget and generating a few answer
tokens. Backends that keep the KV cache between calls (llama.cpp) do the forcing in place;
backends with prefix caching (vLLM, an HTTP server) do it with ``continue_prefixes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class RolloutError(RuntimeError):
    """A rollout could not be produced (backend failure, bad model file, bad request)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn. Defaults suit small instruction models on short math problems."""

    temperature: float = 0.8  # >0 so the n samples differ: width scaling needs diversity
    top_p: float = 0.95
    top_k: int = 0  # 0 = disabled
    # forced answers are sampled too (not greedy) so k direct answers at budget 0 are k
    # independent draws and majority vote over them means something
    force_temperature: float = 0.8
    stop: tuple[str, ...] = ()  # extra stop strings for the reasoning completion


@dataclass(frozen=True)
class OnePassRequest:
    """Everything a backend needs to roll out one query at every budget."""

    key: str  # query_id: identifies the request in results
    prompt: str  # the rendered prompt (chat template applied), ends where the model speaks
    n: int  # samples to draw at the largest budget
    budgets: tuple[int, ...]  # sorted ascending, unique; the last is max_tokens of the sample
    seed: int  # per-query seed; sample i uses seed + i
    force_suffix: str = "\nThe final answer is"  # appended to a cut sample to force its answer
    direct_prefix: str = "The final answer is"  # what budget 0 appends straight after the prompt
    answer_tokens: int = 12  # max tokens of a forced answer

    @property
    def max_tokens(self) -> int:
        return self.budgets[-1]


@dataclass(frozen=True)
class ForcedAnswer:
    """The answer forced at one budget of a sample that had not finished within it."""

    text: str  # the generated continuation after the suffix (the answer, untrusted)
    n_tokens: int  # generated answer tokens (what forcing cost)


@dataclass(frozen=True)
class SampleResult:
    """One completion at the largest budget, with the forced answers at smaller budgets."""

    index: int  # sample index in 0..n-1
    seed: int
    text: str  # the completion (untrusted), at most max_tokens tokens
    n_tokens: int  # generated tokens of the completion
    finished: bool  # True if it stopped by itself (EOS/stop) before max_tokens
    forced: dict[int, ForcedAnswer] = field(default_factory=dict)  # budget -> forced answer

    def needs_forcing(self, budget: int) -> bool:
        """A sample keeps its own answer at budget B iff it finished within B tokens."""
        return not (self.finished and self.n_tokens <= budget)


@dataclass(frozen=True)
class OnePassResult:
    key: str
    samples: tuple[SampleResult, ...]
    prompt_tokens: int  # tokens of the rendered prompt (decoded once per query)


def check_request(r: OnePassRequest) -> None:
    """Refuse a malformed request before any engine work: the rules every backend shares."""
    if r.n < 1 or not r.budgets:
        raise ValueError(f"request {r.key!r}: needs n >= 1 and at least one budget")
    if list(r.budgets) != sorted(set(r.budgets)) or r.budgets[0] < 0:
        raise ValueError(f"request {r.key!r}: budgets must be unique, ascending and >= 0, got {r.budgets}")


def check_generate_args(n: int, max_tokens: int) -> None:
    """The arguments ``generate`` accepts, in every backend."""
    if n < 1 or max_tokens < 0:
        raise ValueError(f"generate: needs n >= 1 and max_tokens >= 0, got n={n}, max_tokens={max_tokens}")


def budgets_to_force(sample: SampleResult, budgets: tuple[int, ...]) -> list[int]:
    """The budgets at which ``sample`` needs a forced answer."""
    return [b for b in budgets if sample.needs_forcing(b)]


class Backend(ABC):
    """A loaded model that produces one-pass rollouts.

    Implementations must be deterministic given the request seeds where the engine allows,
    and must never evaluate model output.
    """

    #: registry name, e.g. "llamacpp"
    name: str = "base"
    #: the frozen dataclass ``ModelConfig.options`` is built into, with ``from_dict``
    options_type: type | None = None

    def __init__(self, model_id: str):
        self.model_id = model_id

    @abstractmethod
    def one_pass(self, requests: list[OnePassRequest], sampling: SamplingConfig) -> list[OnePassResult]:
        """Roll out every request; results are in request order."""

    def count_tokens(self, text: str) -> int:  # pragma: no cover - optional
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (GPU memory, threads). Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
