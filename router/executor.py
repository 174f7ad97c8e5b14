"""Execute a decision exactly the way the labels assumed it would run.

The labels (``pipelines/rollout/work.py``, ``result_records``) say what tier (B, k) yields: k
samples drawn with ``max_tokens=B``; a sample that finished within B keeps its own answer,
a cut one gets the answer forced by appending the suffix to its first B tokens (B = 0: the
direct prefix straight after the prompt); then a majority vote over the k answers, ties to
the first sample that gave a tied answer. This module does that with one ``one_pass``
request at the single budget B, so the backend, the seeds and the forcing are the rollout's.
The prompt template, system prompt, forcing text and sampling settings come from the bundle
(``router.execution``: ``Router.execution(model)``), so nothing else needs to be known.

It runs on any one-pass engine: the proxy's HTTP upstream (``router.upstream``) or one of the
pipeline's backends (``router`` itself never imports ``pipelines``).
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


def execute(decision, backend, question, *, execution, seed: int | None = None, system_extra: str = "",
            extract: Callable[[str], str | None] | None = None, tiers=None) -> dict[str, Any]:
    """Run ``decision`` (a ``Decision``: budget B, samples k) on ``backend`` for ``question``.

    ``question``: the question text, or a conversation (``(role, text)`` turns ending with a user
    turn); ``execution``: the decision's model's ``router.execution.ModelExecution`` (a bundle's:
    ``Router.execution(decision.model)``), which renders the prompt and carries the rollout's
    forcing and sampling settings. ``seed``: the request seed (sample i uses ``seed + i``); None
    derives it from the prompt, as the proxy does for a request without ``seed``. ``backend``:
    anything with the one-pass ``one_pass(requests, sampling)`` (a pipeline backend, or
    ``router.upstream.OpenAIUpstream``).

    Returns ``answer`` (the winning answer as first written, None if no sample gave one),
    ``vote_key`` (its normalized form), ``votes`` ({vote_key: count}), ``content`` (the winning
    sample's whole text: its completion, plus the forcing text and forced answer if it was cut),
    ``samples`` (per-sample answer, tokens, whether it was forced), ``tokens`` (generated tokens,
    forced answers included), ``latency_tokens`` (the longest sample's), ``usage`` (what a server
    reported, summed over its calls), ``seed`` and ``prompt``.
    """
    from router.generation import RolloutError

    tier = (tiers or {}).get(decision.tier)
    if tier is not None and tier.adaptive:
        return execute_adaptive(tier, tiers, backend, question, execution=execution, seed=seed,
                                system_extra=system_extra, extract=extract)
    budget, k = int(decision.budget), int(decision.samples)
    if budget < 0 or k < 1:
        raise ValueError(f"decision needs budget >= 0 and samples >= 1, got budget={budget}, samples={k}")
    prompt = execution.prompt(question, system_extra)
    request = execution.request(prompt, budget, k, seed)
    results = backend.one_pass([request], execution.sampling)
    if len(results) != 1 or len(results[0].samples) != k:
        raise RolloutError(f"backend {getattr(backend, 'name', backend)!r} returned {len(results)} result(s) "
                           f"with {len(results[0].samples) if results else 0} sample(s); expected 1 with {k}")
    return summarize(results[0], request, extract)


def summarize(result, request, extract: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """The vote over one executed request's samples (``execute``'s result; the proxy's streamed
    path calls it too): each sample's answer at the request's budget, scored the way the labels
    were, and the majority."""
    from router.vote import vote_key

    budget = request.max_tokens
    extract = extract or extract_answer
    samples, total = [], 0
    for s in result.samples:
        # the same text the labels scored: the completion, or the forcing text + forced answer
        text, tokens, forced = s.at_budget(budget, request)
        answer = extract(text)
        key = vote_key(answer)
        samples.append({"index": s.index, "seed": s.seed, "answer": answer, "vote_key": key, "forced": forced,
                        "finished": s.finished, "tokens": tokens, "text": text,
                        "content": s.text + text if forced else s.text})
        total += tokens
    return {**_vote(samples), "samples": samples, "tokens": total,
            "latency_tokens": max((x["tokens"] for x in samples), default=0), "usage": result.usage.to_dict(),
            "seed": request.seed, "prompt": request.prompt}


def execute_adaptive(tier, tiers, backend, question, *, execution, seed: int | None = None, system_extra: str = "",
                     extract: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Run an adaptive tier (``router.adaptive``) with the rules its labels assumed.

    Sample i is always seeded ``seed + i`` at every budget, so a step or a later cascade stage
    draws exactly the samples (and forced answers) the one-pass rollout drew, in index order: one
    of the orders the labels average over. ``tokens`` counts what the labels count: a cascade
    stage that reruns sample i to a larger budget pays only the tokens past what earlier stages
    generated (an engine with prefix caching reuses them; ``recomputed_tokens`` is what this
    engine actually generated). ``latency_tokens`` sums the steps' (stages') longest samples.
    ``backend`` and ``execution`` may be mappings by model for a cascade over several models.
    """
    from router.adaptive import agreed, unsure, vote_until_steps
    from router.execution import prompt_seed
    from router.generation import RolloutError

    def of(x, model):
        return x[model] if isinstance(x, dict) else x

    if tier.kind == "vote_until":
        stages = [(tier.model, tier.budget, drawn) for drawn in vote_until_steps(tier.samples, tier.step)]
    elif tier.kind == "cascade":
        stages = [(tiers[c].model, tiers[c].budget, tiers[c].samples) for c in tier.chain]
    else:  # pragma: no cover - execute() sends static tiers elsewhere
        raise ValueError(f"tier {tier.name!r} is not adaptive")
    generated: dict[tuple[str, int], int] = {}  # (model, sample) -> reasoning tokens generated so far
    tokens = latency = recomputed = 0
    steps, out, drawn_before = [], None, 0
    for j, (model, budget, k) in enumerate(stages):
        ex = of(execution, model)
        prompt = ex.prompt(question, system_extra)
        base = prompt_seed(prompt) if seed is None else int(seed)
        # vote_until draws only the new samples of this step; a cascade stage reruns its first k
        first = drawn_before if tier.kind == "vote_until" else 0
        request = ex.request(prompt, budget, k - first, base + first)
        results = of(backend, model).one_pass([request], ex.sampling)
        if len(results) != 1 or len(results[0].samples) != k - first:
            raise RolloutError(f"backend returned {len(results)} result(s); expected 1 with {k - first} samples")
        part = summarize(results[0], request, extract)
        step_tokens = []
        for x, s in zip(part["samples"], results[0].samples):
            i = first + x["index"]
            x["index"], x["seed"] = i, base + i
            reasoning = s.n_tokens if not x["forced"] else min(s.n_tokens, budget)
            before = generated.get((model, i), 0) if tier.kind == "cascade" else 0
            step_tokens.append(max(0, reasoning - before) + (x["tokens"] - reasoning))
            generated[(model, i)] = max(before, reasoning)
            recomputed += x["tokens"]
        tokens += sum(step_tokens)
        latency += max(step_tokens)
        if tier.kind == "vote_until":
            out = {**part, "samples": (out["samples"] if out else []) + part["samples"]}
            drawn_before = k
            keys = [x["vote_key"] for x in out["samples"]]
            win = agreed(keys, tier.agree)
            steps.append({"model": model, "budget": budget, "drawn": k, "agreed": win})
            if win is not None:
                first_win = next(x for x in out["samples"] if x["vote_key"] == win)
                out.update(answer=first_win["answer"], vote_key=win, content=first_win["content"])
                break
            if j == len(stages) - 1:  # k drawn without agreement: the majority of all k decides
                out.update(_vote(out["samples"]))
        else:
            out = part
            keys = [x["vote_key"] for x in part["samples"]]
            forced = [x["forced"] for x in part["samples"]]
            go_on = j < len(stages) - 1 and unsure(keys, forced, budget)
            steps.append({"model": model, "budget": budget, "samples": k, "escalated": go_on})
            if not go_on:
                break
    out.update(tokens=tokens, latency_tokens=latency, recomputed_tokens=recomputed, seed=base,
               adaptive={"tier": tier.name, "kind": tier.kind, "steps": steps})
    return out


def _vote(samples: list[dict]) -> dict[str, Any]:
    """The majority over ``samples`` (first appearance breaks ties), as ``summarize`` votes."""
    from router.vote import majority

    keys = [x["vote_key"] for x in samples]
    winner, _ = majority(keys)
    first = next((x for x in samples if x["vote_key"] == winner), samples[0]) if samples else None
    votes = dict(Counter(k_ for k_ in keys if k_ is not None))
    return {"answer": first["answer"] if winner is not None else None, "vote_key": winner, "votes": votes,
            "content": first["content"] if first else ""}
