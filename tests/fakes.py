"""A scripted backend for unit tests of rollout logic (never what a user runs).

It follows the one-pass contract exactly: sample i of a query "reasons" for a seeded number
of tokens and answers; a cut sample's forced answer depends on how far it got.
"""

from __future__ import annotations

import random

from pipelines.backends.base import Backend, ForcedAnswer, OnePassResult, SampleResult


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, model_id="scripted", config=None, answer="4", calls=None):
        super().__init__(model_id)
        self.answer = answer
        self.calls = calls if calls is not None else []
        self.closed = False

    def one_pass(self, requests, sampling):
        self.calls.append([r.key for r in requests])
        out = []
        for r in requests:
            samples = []
            for i in range(r.n):
                rng = random.Random(r.seed + i)
                length = rng.randint(1, r.max_tokens + 8)
                finished = length <= r.max_tokens
                n_tokens = min(length, r.max_tokens)
                text = "step " * (n_tokens - 1) + f"The final answer is {self.answer if rng.random() < 0.6 else '5'}."
                s = SampleResult(i, r.seed + i, text, n_tokens, finished)
                forced = {}
                for b in r.budgets:
                    if s.needs_forcing(b):
                        ans = self.answer if b >= length // 2 and rng.random() < 0.7 else "7"
                        forced[b] = ForcedAnswer(f" {ans}.", 2)
                samples.append(SampleResult(i, r.seed + i, text, n_tokens, finished, forced))
            out.append(OnePassResult(r.key, tuple(samples), prompt_tokens=len(r.prompt.split())))
        return out
