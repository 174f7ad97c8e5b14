"""Plan mode of the rollout stage: what a rollout would generate, cost and take, without running it.

``python -m pipelines.rollout --params FILE --plan [--tokens-per-second X] [--json]`` validates
the params as the stage would (tier grid, n_max, backend names, templates, backend options),
counts the queries and compares the two ways of labelling the tier grid:

- **one pass** (what the stage does): ``n_max`` samples per query at the model's largest budget
  ``B_max``, plus a forced answer of ``rollout.answer_tokens`` at every budget a sample was cut
  at (``B_max`` included): ``n_max * (B_max + answer_tokens * len(budgets))`` per query;
- **per tier**: every tier (B, k) run on its own, ``k * (B + answer_tokens)`` per query.

Both in the worst case, every sample using its whole budget. A previous ``metrics/rollout.json``
of the same model and budgets adds the expected case from its measured tokens.

Nothing heavy is imported: backend modules import their engines (llama_cpp, vllm, httpx) only
when a backend is built, and no MLflow run is opened, so a plan is safe on a busy machine.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, Params
from pipelines.rollout.work import ModelPlan, plan_rollout

def check_models(params: Params, plans: list[ModelPlan]) -> None:
    """Every planned model names a registered backend, a known template and valid options."""
    from pipelines.backends import BACKENDS  # the registry: names -> "module:Class" strings
    from router.prompts import TEMPLATES

    answer_tokens = params.rollout.answer_tokens
    for plan in plans:
        m, where = plan.config, f"models.{plan.model}"
        if m.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend: unknown backend {m.backend!r}; choose one of {sorted(BACKENDS)}")
        if m.template not in TEMPLATES:
            raise ConfigError(f"{where}.template: unknown template {m.template!r}; choose one of {list(TEMPLATES)}")
        try:
            opts = options_class(m.backend).from_dict(m.options)
        except ValueError as e:  # ConfigError included
            raise ConfigError(f"{where}.options: {e}") from e
        # the vLLM engine refuses such a request only after loading the model onto the GPU
        max_len = getattr(opts, "max_model_len", None)
        if max_len is not None and plan.budgets[-1] + answer_tokens >= max_len:
            raise ConfigError(f"{where}.options.max_model_len={max_len} leaves no room for a prompt at budget "
                              f"{plan.budgets[-1]} + {answer_tokens} answer tokens; raise it")


def options_class(backend: str):
    """The options dataclass of a registered backend (its module imports no engine at import)."""
    from pipelines.backends import backend_class

    return backend_class(backend).options_type


# ---- how many queries ------------------------------------------------------------------------


def count_queries(params: Params) -> tuple[int | None, str]:
    """How many queries the rollout would see, and where that number comes from.

    The prepared table if it holds what params declare; else an upper bound from the sources
    (before duplicates and bad rows are dropped); ``None`` if neither gives a number.
    """
    for i, src in enumerate(params.data.sources or []):
        _check_source(src, i)
    n, origin = _prepared_count(params)
    if n is None:
        n, estimate = _estimate_from_sources(params)
        origin = f"{origin}; {estimate}" if origin else estimate
    cap = params.rollout.max_queries
    if n is not None and cap is not None and cap < n:
        n, origin = cap, f"{origin}; capped by rollout.max_queries={cap}"
    return n, origin


def _prepared_count(params: Params) -> tuple[int | None, str]:
    """Queries in ``prepare.out`` if it exists and matches the params' sources (else why not)."""
    from pipelines.artifacts import read_queries

    path = Path(params.prepare.out)
    if not path.exists():
        return None, ""
    queries = read_queries(path)
    exact, prefixes = _source_labels(params.data.sources)
    foreign = sorted({q.source for q in queries} - exact)
    foreign = [s for s in foreign if not s.startswith(prefixes)]
    cap = params.data.max_queries
    if foreign:
        return None, (f"{path} holds queries of other sources ({', '.join(foreign[:3])}) than data.sources "
                      f"declares: a stale prepare, not counted")
    if cap is not None and len(queries) > cap:
        return None, f"{path} holds {len(queries)} queries, more than data.max_queries={cap}: stale, not counted"
    return len(queries), f"{path} (prepare.out)"


def _source_labels(sources) -> tuple[set[str], tuple[str, ...]]:
    """The ``source`` names prepare gives each source's queries: exact names, and prefixes (hf)."""
    exact, prefixes = set(), []
    for src in sources or []:
        kind = src["kind"]
        if kind == "reasoning_gym":
            exact |= {f"{src.get('name') or 'reasoning_gym'}:{t['name']}" for t in src["tasks"]}
        elif kind == "hf":
            prefixes.append(f"hf:{src['name']}")
        else:
            exact.add(src.get("name") or f"{kind}:{Path(src['path']).name}")
    return exact, tuple(prefixes)


def _estimate_from_sources(params: Params) -> tuple[int | None, str]:
    """An upper bound on the query count from the sources' sizes, capped by data.max_queries."""
    counts = [_source_count(src) for src in params.data.sources or []]
    parts = [f"{label} {'unknown' if n is None else n}" + (f" ({why})" if why else "") for label, n, why in counts]
    known = sum(n for _, n, _ in counts if n is not None)
    unknown = any(n is None for _, n, _ in counts)
    cap = params.data.max_queries
    text = "estimated from data.sources (an upper bound: duplicates and bad rows are dropped by prepare): "
    text += ", ".join(parts) or "no sources"
    if cap is not None and (unknown or known > cap):
        what = "assuming the sources fill it" if unknown and known < cap else "capped"
        return cap, f"{text}; data.max_queries={cap} ({what})"
    if unknown:
        return None, f"{text}; no data.max_queries to bound it"
    return known, text


def _check_source(src: Any, i: int) -> None:
    """The keys prepare needs; files may be missing still (a plan is made before downloading)."""
    from pipelines.config import REQUIRED_KEYS, SOURCE_KEYS

    where = f"data.sources[{i}]"
    if not isinstance(src, dict) or src.get("kind") not in SOURCE_KEYS:
        raise ConfigError(f"{where}: expected a mapping with a 'kind' in {sorted(SOURCE_KEYS)}")
    kind = src["kind"]
    unknown, missing = set(src) - SOURCE_KEYS[kind], REQUIRED_KEYS[kind] - set(src)
    if unknown or missing:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)} "
                          f"for kind {kind!r}; valid keys are {sorted(SOURCE_KEYS[kind])}")
    tasks = src.get("tasks")
    if kind == "reasoning_gym" and not (isinstance(tasks, list) and tasks
                                        and all(isinstance(t, dict) and "name" in t for t in tasks)):
        raise ConfigError(f"{where}: 'tasks' must be a non-empty list of {{name, size, config}}")


def _source_count(src: dict) -> tuple[str, int | None, str]:
    """(label, rows or None, why unknown) of one source, without generating or downloading it."""
    kind, limit = src["kind"], src.get("limit")
    if kind == "reasoning_gym":
        label, n, why = "reasoning_gym", sum(int(t.get("size", 100)) for t in src["tasks"]), ""
    elif kind == "hf":
        label, n, why = f"hf:{src['name']}", None, "no row count without downloading it"
    elif Path(src["path"]).is_file():
        with open(src["path"], encoding="utf-8") as f:
            label, n, why = src["path"], sum(1 for line in f if line.strip()), ""
    else:
        label, n, why = src["path"], None, "file not found"
    if limit is not None:
        return label, limit if n is None else min(n, limit), ""
    return label, n, why


# ---- the plan --------------------------------------------------------------------------------


def measured_for(measured: dict | None, plan: ModelPlan) -> tuple[dict | None, str]:
    """Mean tokens a previous rollout of this model measured, or why they do not apply.

    ``metrics/rollout.json`` sums over every model of its run and does not split by model, and
    how long samples run depends on the budgets, so only a run of this model alone at the same
    budgets counts. Its ``naive_tokens`` also depend on the tiers' sample counts, which the file
    does not record: the expected per-tier figure assumes they are unchanged.
    """
    if not measured or not measured.get("samples") or not measured.get("queries"):
        return None, "no previous rollout measured it"
    if measured.get("model") != plan.model or measured.get("backend") != plan.config.backend:
        return None, f"the previous rollout measured {measured.get('model')!r} ({measured.get('backend')}), not this model"
    budgets = sorted(int(b) for b in (measured.get("budgets") or {}).get(plan.model, []))
    if tuple(budgets) != plan.budgets:
        return None, f"the previous rollout ran budgets {budgets}, not {list(plan.budgets)}"
    return {
        "sample_tokens": measured["generated_tokens"] / measured["samples"],
        "per_tier_query_tokens": measured["naive_tokens"] / measured["queries"],
    }, f"measured by the previous rollout over {measured['queries']} queries"


def _figures(prompts: int, tokens: float, price: float) -> dict[str, Any]:
    return {"prompts": prompts, "tokens_worst": tokens, "cost_worst": tokens * price}


def _expected(tokens: float | None, price: float) -> dict[str, Any]:
    return {"tokens_expected": tokens, "cost_expected": None if tokens is None else tokens * price}


def model_figures(plan: ModelPlan, n_queries: int, answer_tokens: int, measured: dict | None = None) -> dict[str, Any]:
    """One model's tiers, its one pass and its per-tier generation, for ``n_queries`` queries."""
    price, bmax, q = plan.config.cost_per_token, plan.budgets[-1], n_queries
    tiers = [{"tier": t.name, "budget": t.budget, "samples": t.samples,
              **_figures(q * t.samples, q * t.samples * (t.budget + answer_tokens), price)}
             for t in plan.tiers]
    used, note = measured_for(measured, plan)
    one_pass = q * plan.n * (bmax + answer_tokens * len(plan.budgets))
    per_tier = sum(t["tokens_worst"] for t in tiers)
    return {
        "model": plan.model, "backend": plan.config.backend, "cost_per_token": price, "n_max": plan.n,
        "budgets": list(plan.budgets), "tiers": tiers,
        "one_pass": {**_figures(q * plan.n, one_pass, price),
                     **_expected(None if used is None else q * plan.n * used["sample_tokens"], price)},
        "per_tier": {**_figures(sum(t["prompts"] for t in tiers), per_tier, price),
                     **_expected(None if used is None else q * used["per_tier_query_tokens"], price)},
        "expected_from": note,
    }


def adaptive_figures(params: Params, labelled: dict | None = None) -> list[dict[str, Any]]:
    """What serving each adaptive tier costs per query: worst case (no early stop, every cascade
    stage runs, every sample to its budget with a forced answer at every stage; a cascade's later
    stage of the same model continues the earlier stage's samples) and expected case (the mean cost
    a previous label stage measured for the tier, ``metrics/label.json``). Adaptive tiers are
    labelled from the one pass's samples: they add nothing to the rollout."""
    answer = params.rollout.answer_tokens
    tiers = params.tier_list()
    by_name = {t.name: t for t in tiers}
    measured = (labelled or {}).get("tier_mean_cost") or {}
    out = []
    for t in (t for t in tiers if t.adaptive):
        if t.kind == "vote_until":
            tokens = t.samples * (t.budget + answer)
            price = t.cost_per_token
            cost = tokens * price
        else:
            reach: dict[tuple[str, int], int] = {}  # (model, sample) -> deepest budget reached
            cost = tokens = 0.0
            for stage in (by_name[c] for c in t.chain):
                for i in range(stage.samples):
                    before = reach.get((stage.model, i), 0)
                    new = max(0, stage.budget - before) + answer
                    reach[(stage.model, i)] = max(before, stage.budget)
                    tokens += new
                    cost += new * stage.cost_per_token
        out.append({"tier": t.name, "kind": t.kind, "tokens_worst_per_query": tokens, "cost_worst_per_query": cost,
                    "cost_expected_per_query": measured.get(t.name)})
    return out


def _total(models: list[dict], way: str, rate: float | None) -> dict[str, Any]:
    blocks = [m[way] for m in models]
    total = {k: sum(b[k] for b in blocks) for k in ("prompts", "tokens_worst", "cost_worst")}
    for k in ("tokens_expected", "cost_expected"):
        total[k] = None if any(b[k] is None for b in blocks) else sum(b[k] for b in blocks)
    for case in ("worst", "expected"):
        tokens = total[f"tokens_{case}"]
        total[f"seconds_{case}"] = None if rate is None or tokens is None else tokens / rate
    return total


def _rate(plans: list[ModelPlan], measured: dict | None, tokens_per_second: float | None) -> tuple[float | None, str]:
    """Generation rate for the time estimate: given, else measured on these models, else unknown."""
    if tokens_per_second is not None:
        if tokens_per_second <= 0:
            raise ValueError(f"--tokens-per-second must be > 0, got {tokens_per_second}")
        return float(tokens_per_second), "--tokens-per-second"
    # the file's model and backend fields are comma-joined over its run, as rollout_metrics writes them
    models, backends = ",".join(p.model for p in plans), ",".join(sorted({p.config.backend for p in plans}))
    same_run = measured is not None and (measured.get("model"), measured.get("backend")) == (models, backends)
    if same_run and measured.get("tokens_per_second"):
        return float(measured["tokens_per_second"]), "measured by the previous rollout of these models"
    return None, "unknown: give --tokens-per-second X (no previous rollout of these models measured one)"


def make_plan(params: Params, n_queries: int | None, measured: dict | None = None,
              tokens_per_second: float | None = None, labelled: dict | None = None) -> dict[str, Any]:
    """Tokens, cost and time of labelling the tier grid in one pass vs one run per tier.

    ``n_queries=None`` (unknown) gives the figures of one query. ``measured`` is a previous
    ``metrics/rollout.json``; it adds the expected case (and a rate) where it matches.
    """
    plans = plan_rollout(params)
    check_models(params, plans)
    q = 1 if n_queries is None else n_queries
    models = [model_figures(p, q, params.rollout.answer_tokens, measured) for p in plans]
    rate, rate_from = _rate(plans, measured, tokens_per_second)
    one_pass, per_tier = _total(models, "one_pass", rate), _total(models, "per_tier", rate)
    return {
        "queries": n_queries,
        "per_query": n_queries is None,
        "answer_tokens": params.rollout.answer_tokens,
        "models": models,
        "total": {"one_pass": one_pass, "per_tier": per_tier},
        "tokens_per_second": rate,
        "rate_from": rate_from,
        "adaptive": adaptive_figures(params, labelled),
    }


# ---- output ----------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _ratio(way: dict, case: str) -> str:
    one, per = way["one_pass"][f"tokens_{case}"], way["per_tier"][f"tokens_{case}"]
    if not one or per is None:
        return "-"
    return f"{per / one:.2f}x ({1 - one / per:.0%} saved)"


def format_plan(plan: dict[str, Any], queries_from: str) -> str:
    """The plan as the table ``--plan`` prints."""
    if plan.get("skipped"):
        return f"rollout plan: nothing to generate: {plan['skipped']}"
    q = "unknown (figures are per query)" if plan["per_query"] else f"{plan['queries']:,}"
    lines = [f"queries: {q}", textwrap.fill(f"from {queries_from}", 110, initial_indent="  ", subsequent_indent="  "),
             f"worst case: every sample runs to its budget and gets a forced answer of "
             f"{plan['answer_tokens']} tokens (rollout.answer_tokens)", ""]
    row = "  {:<28}{:>7}{:>8}{:>13}{:>17}{:>17}"
    for m in plan["models"]:
        lines.append(f"model {m['model']} ({m['backend']}, cost {m['cost_per_token']:g} per token): one pass = "
                     f"{m['n_max']} samples/query at budget {m['budgets'][-1]}, forced answers at {len(m['budgets'])} "
                     f"budget(s)")
        lines.append(row.format("tier", "budget", "samples", "prompts", "tokens (worst)", "cost (worst)"))
        for t in m["tiers"]:
            lines.append(row.format(t["tier"], t["budget"], t["samples"], _num(t["prompts"]),
                                    _num(t["tokens_worst"]), _num(t["cost_worst"])))
        for label, way in (("per-tier generation", "per_tier"), ("one pass", "one_pass")):
            f = m[way]
            lines.append(row.format(label, "", "", _num(f["prompts"]), _num(f["tokens_worst"]), _num(f["cost_worst"])))
        expected = (f"one pass {_num(m['one_pass']['tokens_expected'])}, per-tier "
                    f"{_num(m['per_tier']['tokens_expected'])} tokens ({m['expected_from']})"
                    if m["one_pass"]["tokens_expected"] is not None else f"not known: {m['expected_from']}")
        lines += [f"  expected case: {expected}", ""]
    total = plan["total"]
    head = "  {:<22}{:>13}{:>17}{:>17}{:>19}{:>14}{:>17}"
    lines.append("total")
    lines.append(head.format("", "prompts", "tokens (worst)", "cost (worst)", "tokens (expected)",
                             "time (worst)", "time (expected)"))
    for label, way in (("one pass", "one_pass"), ("per-tier generation", "per_tier")):
        t = total[way]
        lines.append(head.format(label, _num(t["prompts"]), _num(t["tokens_worst"]), _num(t["cost_worst"]),
                                 _num(t["tokens_expected"]), _duration(t["seconds_worst"]),
                                 _duration(t["seconds_expected"])))
    lines.append(f"  per-tier / one pass: worst {_ratio(total, 'worst')}, expected {_ratio(total, 'expected')}")
    rate = plan["tokens_per_second"]
    lines.append(f"rate: {rate:,.1f} tokens/s ({plan['rate_from']})" if rate else f"rate: {plan['rate_from']}")
    if plan.get("adaptive"):
        lines += ["", "adaptive tiers (labelled from the one pass: no extra rollout; cost of serving one query)",
                  "  {:<44}{:>12}{:>14}{:>16}".format("tier", "kind", "cost (worst)", "cost (expected)")]
        for a in plan["adaptive"]:
            exp = a["cost_expected_per_query"]
            lines.append("  {:<44}{:>12}{:>14}{:>16}".format(a["tier"], a["kind"], _num(a["cost_worst_per_query"]),
                                                             "-" if exp is None else f"{exp:,.1f}"))
    return "\n".join(lines)


def _read_measured(path: Path) -> dict | None:
    """A previous ``metrics/rollout.json`` (or ``metrics/label.json``), if there is one."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rerun the rollout") from e


def run_plan(params_file: str, tokens_per_second: float | None = None, as_json: bool = False,
             overrides=()) -> int:
    """``rollout --plan``: print the plan; 0 if the params are valid, 2 (one line on stderr) if not."""
    import yaml

    from pipelines.config import load_params

    try:
        params = load_params(params_file, overrides)
        if params.data.outcomes:
            plan = {"skipped": f"data.outcomes ({params.data.outcomes}) replaces the rollout"}
            queries_from = ""
        else:
            n, queries_from = count_queries(params)
            plan = make_plan(params, n, _read_measured(Path(params.rollout.metrics)), tokens_per_second,
                             _read_measured(Path(params.label.metrics)))
    except (ConfigError, ValueError, yaml.YAMLError) as e:
        print(f"rollout --plan: {params_file}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({**plan, "queries_from": queries_from}, indent=1))
    else:
        print(f"rollout plan for {params_file}\n{format_plan(plan, queries_from)}")
    return 0
