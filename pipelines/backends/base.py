"""The backend base class: one-pass rollouts of a real LLM at many budgets at once.

A backend samples ``n`` completions per prompt once at the largest budget, then, for every
smaller budget a sample did not finish within, forces an answer by appending the
answer-forcing suffix to the sample truncated at that budget and generating a few answer
tokens (budget 0: the direct prefix straight after the prompt).

What every engine shares lives here, once: options (``options_type.from_dict``), the template
and its stop strings, request checks, the forcing decision (``router.generation.needs_forcing``),
the seed rules (sample i: ``seed + i``; the forced answer of (sample i, budget B):
``mix_seed(seed, i, B)``), the per-sequence capacity rule with its one error message, and
result assembly. An engine implements two steps on a ``OnePass`` (one call's requests, settings
and the rules as methods):

- ``sample(run)``: draw every request's n completions at its largest budget and ``run.put`` them;
- ``force(run, jobs)``: the forced answers ``run.missing_answers()`` lists, in that order.

``Backend.one_pass`` is the template: check the requests, ``sample``, list the forced answers
still missing, ``force`` them, assemble results in request order. vLLM and the HTTP backend are
two batched phases and fit it as it is.

Why the rules are methods of the run and not steps of the template: the llama.cpp engine fuses
the two phases. Its scheduler forces a sample's answers the moment that sample ends, inside the
same continuous batch, by truncating the sample's own KV sequence, so a forced answer costs its
suffix and answer tokens only and no sequence waits for the slowest sample of the call (measured:
the loop runs within a few percent of a bare batched loop, bench/llamacpp_bare.py). Two separate
calls would have to keep every sample's KV sequence alive until all samples end, or re-decode
every prefix. So when a sample ends the scheduler asks ``run.budgets_to_force`` and
``run.force_seed`` and puts the completion with its answers; ``one_pass`` then finds nothing
missing and never calls ``force``. Which answers are forced, with which seeds, how much room a
sequence needs and what the results look like are decided here for every engine; an engine only
decides when and how the tokens are computed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines.prompts import stop_strings
# the interface, re-exported for backends
from router.generation import ForcedAnswer, OnePassRequest, OnePassResult, RolloutError  # noqa: F401
from router.generation import SampleResult, SamplingConfig, check_request, needs_forcing  # noqa: F401

SEED_MASK = 0xFFFFFFFF  # engines take 32-bit seeds
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp (library and server) reads this seed as "pick a random one"


def seed32(seed: int) -> int:
    """``seed`` as a 32-bit engine seed that no engine reads as "random" (that value maps to 0)."""
    x = seed & SEED_MASK
    return x if x != _RANDOM_SEED else 0


def mix_seed(seed: int, index: int, budget: int) -> int:
    """The seed of the forced answer of (sample ``index``, ``budget``) of a request seeded ``seed``.

    A 32-bit hash, so answers at different budgets of one sample are independent draws; every
    backend uses it, and changing it changes every rollout's forced answers.
    """
    x = ((seed + index) * 0x9E3779B1 + (budget + 1) * 0x85EBCA77 + 0x27D4EB2F) & SEED_MASK
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & SEED_MASK
    x ^= x >> 12
    return seed32(x)


def check_generate_args(n: int, max_tokens: int) -> None:
    """The arguments ``generate`` accepts, in every backend."""
    if n < 1 or max_tokens < 0:
        raise ValueError(f"generate: needs n >= 1 and max_tokens >= 0, got n={n}, max_tokens={max_tokens}")


def budgets_to_force(sample: SampleResult, budgets: tuple[int, ...]) -> list[int]:
    """The budgets at which ``sample`` needs a forced answer, ascending."""
    return [b for b in budgets if sample.needs_forcing(b)]


@dataclass
class Completion:
    """One sample as an engine drew it; ``OnePass.results`` turns it into a ``SampleResult``."""

    text: str  # the completion (untrusted), cut before any stop string
    tokens: list  # the kept tokens in the engine's units (ids, or token strings over HTTP)
    finished: bool  # stopped by itself (EOS/stop string) before max_tokens
    forced: dict[int, ForcedAnswer] = field(default_factory=dict)  # budget -> answer

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


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
        return OnePassResult(key=r.key, prompt_tokens=int(self.prompt_tokens[q]), samples=tuple(
            SampleResult(index=i, seed=self.sample_seed(q, i), text=c.text, n_tokens=c.n_tokens,
                         finished=c.finished, forced=dict(sorted(c.forced.items())))
            for i, c in enumerate(self.completions[q])
        ))

    def results(self) -> list[OnePassResult]:
        """``OnePassResult`` per request, in request order."""
        return [self.result(q) for q in range(len(self.requests))]


class Backend(ABC):
    """A loaded model that produces one-pass rollouts.

    Subclasses implement ``sample`` and ``force`` (plus their own loading, tokenizer and
    ``close``). Implementations must be deterministic given the request seeds where the engine
    allows, and must never evaluate model output.
    """

    #: registry name, e.g. "llamacpp"
    name: str = "base"
    #: the frozen dataclass ``ModelConfig.options`` is built into, with ``from_dict``
    options_type: type | None = None
    #: True for engines whose ``sample`` puts each sample with all its forced answers (llama.cpp):
    #: ``one_pass_stream`` then hands out each request the moment it completes, over one
    #: continuous batch of every request
    forces_in_place: bool = False

    def __init__(self, model_id: str, config=None):
        self.model_id = model_id
        self.config = config
        options = getattr(config, "options", None)
        self.options = self.options_type.from_dict(options) if self.options_type is not None else None
        self.template = getattr(config, "template", "raw")
        self.template_stops = tuple(s for s in stop_strings(self.template) if s)
        #: kept completion tokens of the last one_pass/generate call, by (key, sample index);
        #: lets tests and tools rebuild exactly what conditioned a forced answer
        self.last_completion_tokens_: dict[tuple[str, int], list] = {}

    # ------------------------------------------------------------------ what an engine implements

    @abstractmethod
    def sample(self, run: OnePass) -> None:
        """Draw ``n`` completions of every request of ``run`` at its largest budget (sample i seeded
        ``run.sample_seed``, stopping at ``run.stops``), ``run.put`` each, and set
        ``run.prompt_tokens``. An engine may force answers in place here (``run.budgets_to_force``,
        ``run.force_seed``, ``run.answer_stops``); those are not asked of ``force`` again."""

    @abstractmethod
    def force(self, run: OnePass, jobs: list[ForceJob]) -> list[ForcedAnswer]:
        """The forced answer of every job, in job order: the completion's first ``budget`` tokens
        after the prompt, then ``forcing_text(budget)``, then at most ``answer_tokens`` tokens at
        ``force_temperature`` seeded ``job.seed``, stopping at ``run.answer_stops``."""

    # ------------------------------------------------------------------ the shared calls

    def stops(self, sampling: SamplingConfig) -> tuple[str, ...]:
        """Stop strings of a completion: the template's, then ``sampling.stop``, each once."""
        return tuple(dict.fromkeys(self.template_stops + tuple(s for s in sampling.stop if s)))

    @property
    def answer_stops(self) -> tuple[str, ...]:
        """Stop strings of a forced answer: the answer is one line."""
        return tuple(dict.fromkeys(("\n",) + self.template_stops))

    def one_pass(self, requests: list[OnePassRequest], sampling: SamplingConfig) -> list[OnePassResult]:
        """Roll out every request at all its budgets; results are in request order."""
        return self._run(requests, sampling, force=True).results()

    def one_pass_stream(self, requests: list[OnePassRequest], sampling: SamplingConfig,
                        on_result: Callable[[OnePassResult], None], *, chunk: int = 8) -> None:
        """Roll out every request, calling ``on_result`` with each request's result as soon as it
        is complete (in completion order, not request order).

        An engine that forces answers in place runs all requests as one continuous batch, so the
        batch stays full across what the caller writes as separate shards. Others run ``one_pass``
        on ``chunk`` requests at a time. Either way a request's result does not depend on which
        other requests shared its batch (the engines' determinism contract).
        """
        if not self.forces_in_place:
            for lo in range(0, len(requests), max(1, chunk)):
                for result in self.one_pass(requests[lo:lo + chunk], sampling):
                    on_result(result)
            return
        run = self._prepare(requests, sampling, force=True)
        run.on_request_done = lambda q: on_result(run.result(q))
        self.sample(run)
        if run.missing_answers():  # pragma: no cover - the in-place contract
            raise RolloutError(f"internal: backend {self.name!r} left forced answers undone while streaming")
        self.last_completion_tokens_ = run.completion_tokens()

    def generate(self, prompt: str, n: int, max_tokens: int, seed: int, temperature: float, stop=(), *,
                 top_p: float = 0.95, top_k: int = 0) -> list[tuple[str, int, bool]]:
        """Sample ``n`` completions of ``prompt``: [(text, n_tokens, finished)], sample i seeded seed + i.

        The same ``sample`` step as ``one_pass``, without forcing, so a decision executed at
        runtime draws the same samples the labels were computed from.
        """
        check_generate_args(n, max_tokens)
        request = OnePassRequest(key="generate", prompt=prompt, n=n, budgets=(int(max_tokens),), seed=int(seed))
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, stop=tuple(stop))
        run = self._run([request], sampling, force=False)
        return [(c.text, c.n_tokens, c.finished) for c in run.completions[0]]

    def _prepare(self, requests: list[OnePassRequest], sampling: SamplingConfig, *, force: bool) -> OnePass:
        self._check_open()
        for r in requests:
            check_request(r)
            if not r.prompt:
                raise ValueError(f"request {r.key!r}: the prompt is empty")
        return OnePass(requests, sampling, self.stops(sampling), self.answer_stops, force=force)

    def _run(self, requests: list[OnePassRequest], sampling: SamplingConfig, *, force: bool) -> OnePass:
        run = self._prepare(requests, sampling, force=force)
        self.sample(run)
        jobs = run.missing_answers()
        if jobs:
            answers = self.force(run, jobs)
            if len(answers) != len(jobs):
                raise RolloutError(f"backend {self.name!r} returned {len(answers)} forced answers for {len(jobs)} jobs")
            for job, answer in zip(jobs, answers):
                run.completions[job.request][job.sample].forced[job.budget] = answer
        self.last_completion_tokens_ = run.completion_tokens()
        return run

    def count_tokens(self, text: str) -> int:  # pragma: no cover - optional
        raise NotImplementedError

    def _check_open(self) -> None:
        """Raise a RolloutError if the backend was closed (engines with resources override it)."""

    def close(self) -> None:
        """Release the model (GPU memory, threads). Safe to call twice."""

    def __del__(self):  # pragma: no cover - best effort at interpreter shutdown
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
