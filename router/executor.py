"""Execute a decision exactly the way the labels assumed it would run.

The labels (``pipelines/rollout/work.py``, ``result_records``) say what tier (B, k) yields: k
samples drawn with ``max_tokens=B``; a sample that finished within B keeps its own answer,
a cut one gets the answer forced by appending the suffix to its first B tokens (B = 0: the
direct prefix straight after the prompt); then a majority vote over the k answers, ties to
the first sample that gave a tied answer. This module does that with one ``one_pass``
request at the single budget B, so the backend, the seeds and the forcing are the rollout's.

The pipeline's backends are imported only when a decision is executed: ``router`` itself
never imports ``pipelines``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

# "The final answer is 42", "answer: 7", "Final Answer = 3.5"
_PHRASE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\b\s*:?|:|=)[ \t]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def extract_answer(text: str | None) -> str | None:
    """A plain answer extractor: the number (else the text) after the last "final answer is",
    else the last number in ``text``. Pattern matching only; nothing is evaluated.

    Pass the pipeline's verifier instead (``pipelines.verifiers.get_verifier(spec).extract``)
    to get exactly the answers the labels were scored with.
    """
    if not text:
        return None
    for m in reversed(list(_PHRASE.finditer(text))):
        value = m.group(1)
        end = _SENTENCE_END.search(value)
        value = (value[: end.start()] if end else value).strip().strip("*$ ").strip()
        if not value:
            continue
        num = _NUMBER.search(value)
        return num.group(0).replace(" ", "") if num else value
    nums = _NUMBER.findall(text)
    return nums[-1].replace(" ", "") if nums else None


def execute(decision, backend, prompt: str, *, force_suffix: str = "\nThe final answer is",
            direct_prefix: str = "The final answer is", answer_tokens: int = 12, seed: int = 0,
            sampling=None, extract: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Run ``decision`` (a ``Decision``: budget B, samples k) on ``backend`` for ``prompt``.

    ``prompt`` is the rendered prompt (chat template applied), as in the rollout;
    ``force_suffix``, ``direct_prefix``, ``answer_tokens`` and ``sampling`` should be the
    rollout's settings, or the labels describe a different procedure. Returns ``answer``
    (the winning answer as first written, None if no sample gave one), ``vote_key`` (its
    normalized form), ``votes`` ({vote_key: count}), ``samples`` (per-sample answer, tokens,
    whether it was forced) and ``tokens`` (generated tokens, forced answers included).
    """
    from router.generation import OnePassRequest, RolloutError, SamplingConfig
    from router.vote import majority, vote_key

    budget, k = int(decision.budget), int(decision.samples)
    if budget < 0 or k < 1:
        raise ValueError(f"decision needs budget >= 0 and samples >= 1, got budget={budget}, samples={k}")
    extract = extract or extract_answer
    request = OnePassRequest(key="execute", prompt=prompt, n=k, budgets=(budget,), seed=int(seed),
                             force_suffix=force_suffix, direct_prefix=direct_prefix, answer_tokens=answer_tokens)
    results = backend.one_pass([request], sampling or SamplingConfig())
    if len(results) != 1 or len(results[0].samples) != k:
        raise RolloutError(f"backend {getattr(backend, 'name', backend)!r} returned {len(results)} result(s) "
                           f"with {len(results[0].samples) if results else 0} sample(s); expected 1 with {k}")
    samples, keys, total = [], [], 0
    for s in results[0].samples:
        # the same text the labels scored: the completion, or the forcing text + forced answer
        text, tokens, forced = s.at_budget(budget, request)
        answer = extract(text)
        key = vote_key(answer)
        samples.append({"index": s.index, "seed": s.seed, "answer": answer, "vote_key": key, "forced": forced,
                        "finished": s.finished, "tokens": tokens, "text": text})
        keys.append(key)
        total += tokens
    winner, _ = majority(keys)
    answer = next((x["answer"] for x in samples if x["vote_key"] == winner), None) if winner is not None else None
    votes = dict(Counter(k_ for k_ in keys if k_ is not None))
    return {"answer": answer, "vote_key": winner, "votes": votes, "samples": samples, "tokens": total}
