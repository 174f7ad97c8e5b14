"""A scripted backend for unit tests of rollout logic (never what a user runs).

It follows the one-pass contract exactly, through the base class's ``one_pass`` (so the shared
forcing rule, seeds and result assembly are the real ones): sample i of a query "reasons" for a
seeded number of tokens and answers; a cut sample's forced answer depends on how far it got.
"""

from __future__ import annotations

import random

from pipelines.backends.base import Backend, Completion, ForcedAnswer


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, model_id="scripted", config=None, answer="4", calls=None):
        super().__init__(model_id, config)
        self.answer = answer
        self.calls = calls if calls is not None else []
        self.closed = False
        self._scripts: dict[tuple[int, int], tuple[random.Random, int]] = {}

    def sample(self, run):
        self.calls.append([r.key for r in run.requests])
        self._scripts = {}
        for q, r in enumerate(run.requests):
            run.prompt_tokens[q] = len(r.prompt.split())
            for i in range(r.n):
                rng = random.Random(run.sample_seed(q, i))
                length = rng.randint(1, r.max_tokens + 8)
                n_tokens = min(length, r.max_tokens)
                text = "step " * (n_tokens - 1) + f"The final answer is {self.answer if rng.random() < 0.6 else '5'}."
                # the sample's generator goes on drawing its forced answers, budgets ascending
                self._scripts[(q, i)] = (rng, length)
                run.put(q, i, Completion(text, ["step"] * n_tokens, length <= r.max_tokens))

    def force(self, run, jobs):
        answers = []
        for job in jobs:
            rng, length = self._scripts[(job.request, job.sample)]
            ans = self.answer if job.budget >= length // 2 and rng.random() < 0.7 else "7"
            answers.append(ForcedAnswer(f" {ans}.", 2))
        return answers
