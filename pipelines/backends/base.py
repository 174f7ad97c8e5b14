"""The backend base class: one-pass rollouts of a real LLM at many budgets at once.

A backend samples ``n`` completions per prompt once at the largest budget, then, for every
smaller budget a sample did not finish within, forces an answer by appending the
answer-forcing suffix to the sample truncated at that budget and generating a few answer
tokens (budget 0: the direct prefix straight after the prompt).

What every engine shares lives once, here and in ``router.generation`` (the runtime's executor
and the proxy's HTTP engine run decisions by the same rules, and ``router`` never imports
``pipelines``): options (``options_type.from_dict``), the template and its stop strings, request
checks, the forcing decision (``needs_forcing``), the seed rules (sample i: ``seed + i``; the
forced answer of (sample i, budget B): ``mix_seed(seed, i, B)``), the per-sequence capacity rule
with its one error message, and result assembly. An engine implements two steps on a ``OnePass``
(one call's requests, settings and the rules as methods):

- ``sample(run)``: draw every request's n completions at its largest budget and ``run.put`` them;
- ``force(run, jobs)``: the forced answers ``run.missing_answers()`` lists, in that order.

``Backend.one_pass`` is the template (``router.generation.run_one_pass``): check the requests, ``sample``, list the forced answers
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
from typing import Callable

# the interface and the shared rules, re-exported for backends (they live in the runtime package,
# which executes decisions with the same rules)
from router.generation import SEED_MASK, Completion, ForceJob, OnePass, mix_seed, run_one_pass, seed32  # noqa: F401
from router.generation import ForcedAnswer, OnePassRequest, OnePassResult, RolloutError  # noqa: F401
from router.generation import SampleResult, SamplingConfig, check_request, needs_forcing  # noqa: F401
from router.prompts import answer_stops, completion_stops, stop_strings


def check_generate_args(n: int, max_tokens: int) -> None:
    """The arguments ``generate`` accepts, in every backend."""
    if n < 1 or max_tokens < 0:
        raise ValueError(f"generate: needs n >= 1 and max_tokens >= 0, got n={n}, max_tokens={max_tokens}")


def budgets_to_force(sample: SampleResult, budgets: tuple[int, ...]) -> list[int]:
    """The budgets at which ``sample`` needs a forced answer, ascending."""
    return [b for b in budgets if sample.needs_forcing(b)]


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
        return completion_stops(self.template, sampling.stop)

    @property
    def answer_stops(self) -> tuple[str, ...]:
        """Stop strings of a forced answer: the answer is one line."""
        return answer_stops(self.template)

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
        self._check_open()
        run = run_one_pass(self, requests, sampling, self.stops(sampling), self.answer_stops, on_result=on_result)
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

    def _run(self, requests: list[OnePassRequest], sampling: SamplingConfig, *, force: bool) -> OnePass:
        self._check_open()
        run = run_one_pass(self, requests, sampling, self.stops(sampling), self.answer_stops, force=force)
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
