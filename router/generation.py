"""What a generation engine is asked and what it returns, and the rules every engine follows.

The pipeline's backends answer one-pass requests (``n`` samples once at the largest budget, an
answer forced at every smaller budget a sample did not finish within); the runtime's executor
and the proxy's upstream engine (``router.upstream``) ask for one budget. Both sides use these
types and rules, so they live in the runtime package: ``router`` never imports ``pipelines``.

The rules, once: sample i of a request seeded ``seed`` is seeded ``seed + i``; the forced answer
of (sample i, budget B) is seeded ``mix_seed(seed, i, B)``; a sample keeps its own answer at B iff
it finished by itself within B tokens (``needs_forcing``). An engine implements two steps on a
``OnePass`` (one call's requests, settings, and the rules as methods), and ``run_one_pass`` is
the template every engine runs through: check the requests, ``sample``, list the forced answers
still missing, ``force`` them (see ``pipelines/backends/base.py`` for why an engine may force
in place during ``sample``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable


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

    @classmethod
    def of(cls, settings) -> "SamplingConfig":
        """The sampling settings of an object with these attributes (the pipeline's rollout
        section): what the rollout drew with and what the bundle's execution settings record."""
        return cls(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                   force_temperature=settings.force_temperature)


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


@dataclass
class Usage:
    """What an upstream server reported for the calls of one request (zero for in-process engines)."""

    prompt_tokens: int = 0  # summed over every call: each call re-sends its prompt
    completion_tokens: int = 0
    calls: int = 0

    def add(self, other: "Usage | dict") -> None:
        get = other.get if isinstance(other, dict) else other.__dict__.get
        self.prompt_tokens += int(get("prompt_tokens") or 0)
        self.completion_tokens += int(get("completion_tokens") or 0)
        self.calls += int(get("calls", 1) or 0)

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "calls": self.calls}


@dataclass(frozen=True)
class OnePassResult:
    key: str
    samples: tuple[SampleResult, ...]
    prompt_tokens: int  # tokens of the rendered prompt (decoded once per query)
    usage: Usage = field(default_factory=Usage)  # what a server reported for this request's calls

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


# ---------------------------------------------------------------- seeds

SEED_MASK = 0xFFFFFFFF  # engines take 32-bit seeds
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp (library and server) reads this seed as "pick a random one"


def seed32(seed: int) -> int:
    """``seed`` as a 32-bit engine seed that no engine reads as "random" (that value maps to 0)."""
    x = seed & SEED_MASK
    return x if x != _RANDOM_SEED else 0


def mix_seed(seed: int, index: int, budget: int) -> int:
    """The seed of the forced answer of (sample ``index``, ``budget``) of a request seeded ``seed``.

    A 32-bit hash, so answers at different budgets of one sample are independent draws; every
    engine uses it, and changing it changes every rollout's forced answers.
    """
    x = ((seed + index) * 0x9E3779B1 + (budget + 1) * 0x85EBCA77 + 0x27D4EB2F) & SEED_MASK
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & SEED_MASK
    x ^= x >> 12
    return seed32(x)


# ---------------------------------------------------------------- one call of an engine


@dataclass
class Completion:
    """One sample as an engine drew it; ``OnePass.results`` turns it into a ``SampleResult``."""

    text: str  # the completion (untrusted), cut before any stop string
    tokens: list  # the kept tokens in the engine's units (ids, or token strings over HTTP)
    finished: bool  # stopped by itself (EOS/stop string) before max_tokens
    forced: dict[int, ForcedAnswer] = field(default_factory=dict)  # budget -> answer
    # the token count when ``tokens`` are not known (an HTTP engine asked for one budget only
    # needs no token strings: see router.upstream); None = len(tokens)
    count: int | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.count is None else self.count


@dataclass(frozen=True)
class ForceJob:
    """One forced answer to compute: sample ``sample`` of request ``request`` cut at ``budget``."""

    request: int  # index into ``OnePass.requests``
    sample: int
    budget: int
    seed: int  # ``mix_seed`` of (request seed, sample, budget)


class OnePass:
    """One ``one_pass`` (or ``generate``) call: its requests and settings, what the engine has
    produced so far, and the shared rules the engine asks while it works."""

    def __init__(self, requests: list[OnePassRequest], sampling: SamplingConfig, stops: tuple[str, ...],
                 answer_stops: tuple[str, ...], *, force: bool = True):
        self.requests = list(requests)
        self.sampling = sampling
        self.stops = stops  # what ends a completion: the template's stops + sampling.stop
        self.answer_stops = answer_stops  # what ends a forced answer: a newline + the template's stops
        self.force = force  # False for ``generate``: samples only, no forced answers
        self.prompts: list[Any] = [None] * len(self.requests)  # the engine's form of each prompt, for force
        self.prompt_tokens = [0] * len(self.requests)
        self.completions: list[list[Completion | None]] = [[None] * r.n for r in self.requests]
        self.usage = [Usage() for _ in self.requests]
        self._lock = threading.Lock()
        # set by ``Backend.one_pass_stream`` on engines that force in place: called with a request's
        # index the moment its last sample (with every forced answer) is put
        self.on_request_done: Callable[[int], None] | None = None
        self._left = [r.n for r in self.requests]

    # ------------------------------------------------------------------ the rules

    def sample_seed(self, request: int, index: int) -> int:
        """Sample i of a request is seeded ``seed + i`` (vLLM derives its n children the same way)."""
        return self.requests[request].seed + index

    def force_seed(self, request: int, index: int, budget: int) -> int:
        return mix_seed(self.requests[request].seed, index, budget)

    def budgets_to_force(self, request: int, finished: bool, n_tokens: int) -> list[int]:
        """The budgets, ascending, at which a completion (finished?, n_tokens) needs a forced answer."""
        if not self.force:
            return []
        return [b for b in self.requests[request].budgets if needs_forcing(finished, n_tokens, b)]

    def sequence_tokens(self, request: int, prompt_tokens: int, count: Callable[[str], int]) -> int:
        """Tokens one sample's sequence can reach: the prompt + the largest budget or, where an
        answer may be forced, the prompt + B + the forcing text (``count`` tokenizes it) +
        ``answer_tokens`` at the costliest budget B."""
        r = self.requests[request]
        if prompt_tokens == 0:
            raise ValueError(f"request {r.key!r}: the prompt is empty")
        tail = r.max_tokens
        if self.force:
            tail = max([tail] + [b + count(r.forcing_text(b)) + r.answer_tokens for b in r.budgets])
        return prompt_tokens + tail

    def check_capacity(self, request: int, prompt_tokens: int, need: int, limit: int, *, room: str, option: str,
                       parallel: int = 1) -> None:
        """Refuse, before any work, a request whose sequences do not fit the engine.

        ``need`` is ``sequence_tokens``; ``parallel`` samples that share one prompt need it once
        plus their own tails within ``limit``. ``room`` says what ``limit`` is, ``option`` which
        engine option raises it: the one error every engine gives.
        """
        r = self.requests[request]
        tail = need - prompt_tokens
        total = prompt_tokens + parallel * tail
        if total <= limit:
            return
        what = f"{parallel} samples sharing the prompt" if parallel > 1 else "one sequence"
        shape = f"{parallel} x {tail}" if parallel > 1 else str(tail)
        parts = f"max_tokens {r.max_tokens}"
        if self.force:
            parts += f", forcing text and answer_tokens {r.answer_tokens}"
        raise RolloutError(
            f"request {r.key!r} needs {total} tokens for {what} (prompt {prompt_tokens} + {shape} for {parts}) "
            f"but {room} holds {limit}; raise options.{option}"
        )

    # ------------------------------------------------------------------ what the engine produced

    def put(self, request: int, index: int, completion: Completion) -> None:
        if self.completions[request][index] is None:
            self._left[request] -= 1
        self.completions[request][index] = completion
        if self.on_request_done is not None and self._left[request] == 0:
            self.on_request_done(request)

    def add_usage(self, request: int, usage: dict | Usage) -> None:
        """Count one server call's reported usage for ``request`` (thread-safe)."""
        with self._lock:
            self.usage[request].add(usage)

    def missing_answers(self) -> list[ForceJob]:
        """Every forced answer the rule asks for that the engine has not given yet, in request,
        sample and budget order."""
        jobs = []
        for q, comps in enumerate(self.completions):
            for i, c in enumerate(comps):
                if c is None:
                    raise RolloutError(f"backend produced no sample {i} for request {self.requests[q].key!r}")
                jobs += [ForceJob(q, i, b, self.force_seed(q, i, b))
                         for b in self.budgets_to_force(q, c.finished, c.n_tokens) if b not in c.forced]
        return jobs

    def completion_tokens(self) -> dict[tuple[str, int], list]:
        """Kept completion tokens by (key, sample index): what conditioned each forced answer."""
        return {(r.key, i): c.tokens for r, comps in zip(self.requests, self.completions)
                for i, c in enumerate(comps)}

    def result(self, q: int) -> OnePassResult:
        """The ``OnePassResult`` of request ``q`` (every sample must have been put)."""
        r = self.requests[q]
        return OnePassResult(key=r.key, prompt_tokens=int(self.prompt_tokens[q]), usage=self.usage[q], samples=tuple(
            SampleResult(index=i, seed=self.sample_seed(q, i), text=c.text, n_tokens=c.n_tokens,
                         finished=c.finished, forced=dict(sorted(c.forced.items())))
            for i, c in enumerate(self.completions[q])
        ))

    def results(self) -> list[OnePassResult]:
        """``OnePassResult`` per request, in request order."""
        return [self.result(q) for q in range(len(self.requests))]


def run_one_pass(engine, requests: list[OnePassRequest], sampling: SamplingConfig, stops: tuple[str, ...],
                 answer_stops: tuple[str, ...], *, force: bool = True,
                 on_result: Callable[[OnePassResult], None] | None = None) -> OnePass:
    """The template every engine runs through: check the requests, ``engine.sample(run)``, then
    ``engine.force(run, jobs)`` for the forced answers still missing; returns the filled run.

    ``on_result`` (engines that force in place only): called with each request's result the moment
    its last sample is put, while the engine goes on with the others (``Backend.one_pass_stream``).
    """
    for r in requests:
        check_request(r)
        if not r.prompt:
            raise ValueError(f"request {r.key!r}: the prompt is empty")
    run = OnePass(requests, sampling, stops, answer_stops, force=force)
    if on_result is not None:
        run.on_request_done = lambda q: on_result(run.result(q))
    engine.sample(run)
    jobs = run.missing_answers()
    if jobs:
        answers = engine.force(run, jobs)
        if len(answers) != len(jobs):
            raise RolloutError(f"backend {engine.name!r} returned {len(answers)} forced answers for {len(jobs)} jobs")
        for job, answer in zip(jobs, answers):
            run.completions[job.request][job.sample].forced[job.budget] = answer
    return run
