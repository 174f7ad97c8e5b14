"""What a generation engine is asked and what it returns, shared by the pipeline and the runtime.

The pipeline's backends answer one-pass requests (``n`` samples once at the largest budget, an
answer forced at every smaller budget a sample did not finish within); the runtime's executor
asks the same backends for one budget. Both sides use these types, so they live in the
runtime package: ``router`` never imports ``pipelines``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class RolloutError(RuntimeError):
    """Generation could not be produced (backend failure, bad model file, bad request)."""


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

    def forcing_text(self, budget: int) -> str:
        """What is appended before a forced answer: the direct prefix at budget 0, else the suffix."""
        return self.direct_prefix if budget == 0 else self.force_suffix


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
        return needs_forcing(self.finished, self.n_tokens, budget)

    def at_budget(self, budget: int, request: OnePassRequest) -> tuple[str, int, bool]:
        """(answer text, tokens spent, forced) of this sample run with ``max_tokens=budget``.

        The answer text is the completion itself if the sample finished within the budget, else
        the forcing text plus the forced continuation: exactly what the labels score and what
        the executor votes over.
        """
        if not self.needs_forcing(budget):
            return self.text, self.n_tokens, False
        fa = self.forced.get(budget)
        if fa is None:
            raise RolloutError(f"backend returned no forced answer for sample {self.index} at budget {budget}")
        return request.forcing_text(budget) + fa.text, min(self.n_tokens, budget) + fa.n_tokens, True


@dataclass(frozen=True)
class OnePassResult:
    key: str
    samples: tuple[SampleResult, ...]
    prompt_tokens: int  # tokens of the rendered prompt (decoded once per query)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated for this request: completions plus every forced answer."""
        return sum(s.n_tokens + sum(f.n_tokens for f in s.forced.values()) for s in self.samples)


def needs_forcing(finished: bool, n_tokens: int, budget: int) -> bool:
    """The one forcing rule: a completion keeps its own answer at budget B iff it finished
    by itself within B tokens; otherwise its answer at B is forced."""
    return not (finished and n_tokens <= budget)


def check_request(r: OnePassRequest) -> None:
    """Refuse a malformed request before any engine work: the rules every backend shares."""
    if r.n < 1 or not r.budgets:
        raise ValueError(f"request {r.key!r}: needs n >= 1 and at least one budget")
    if list(r.budgets) != sorted(set(r.budgets)) or r.budgets[0] < 0:
        raise ValueError(f"request {r.key!r}: budgets must be unique, ascending and >= 0, got {r.budgets}")
