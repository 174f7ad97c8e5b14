"""Dataset sources -> :class:`~pipelines.queries.Query` objects, plus a gold-answer check CLI.

Sources come from ``params.yaml`` under ``data.sources``; each is a mapping with a ``kind``:

- ``reasoning_gym``: ``tasks: [{name, size, config}]``, generated with a seed derived from the
  global seed, the task name and its config (reproducible; adding a task reseeds no other).
- ``gsm8k``: ``path`` to JSONL with ``question`` and ``answer`` ("solution ... #### N").
- ``math``: ``path`` to JSONL with ``problem``, ``solution`` (with ``\\boxed{}``), optional ``answer``.
- ``jsonl``: ``path`` to JSONL with ``text``, ``answer``, optional ``verifier``, ``split``, ``meta``.
- ``hf``: a Hugging Face ``datasets`` dataset (``name``, optional ``config``, ``split``,
  ``data_files``) whose rows have the ``format`` gsm8k, math or jsonl.

Every source may also have ``limit`` (first N rows) and, except ``hf`` where ``name`` is the
dataset, ``name`` (used as the query ``source``). Bad rows are dropped, never silently: each is
returned with its source, line (1-based for files, the 0-based row index for generated and HF
rows) and reason.

CLI: ``python -m pipelines.datasets check FILE --format gsm8k|math|jsonl [--verifier V]``
checks that every reference solution verifies against its own answer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from pipelines.config import REQUIRED_KEYS, SOURCE_KEYS, ConfigError
from pipelines.queries import SPLITS, Query, split_of
from pipelines.verifiers import (
    VERIFIERS,
    format_number,
    get_verifier,
    gsm8k_solution_values,
    last_boxed,
    parse_number,
    rg_unsafe_reason,
)

log = logging.getLogger(__name__)

DROP_REASONS = ("missing answer", "empty text", "duplicate", "unparseable gold", "bad json")
FORMATS = ("gsm8k", "math", "jsonl")
RG_TASK_KEYS = {"name", "size", "config"}


class _Drop(Exception):
    """A row that cannot become a query; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str) -> None:
        assert reason in DROP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


# ---- row formats: a raw record -> (text, answer, verifier, meta, split) -----------------------

Row = tuple[str, str, str, dict, "str | None"]


def _text(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise _Drop("empty text")
    return text


def _extra(rec: Mapping, used: set[str]) -> dict:
    """The record's other fields, kept in meta (level, subject, ids ...), as JSON-able values."""
    return {k: _jsonable(v) for k, v in rec.items() if k not in used}


def gsm8k_gold(solution: str) -> str:
    """The canonical number after the last "####" of a GSM8K answer; raises _Drop if none."""
    if "####" not in solution:
        raise _Drop("missing answer")
    tail = solution.rsplit("####", 1)[1].strip()
    if not tail:
        raise _Drop("missing answer")
    x = parse_number(tail)
    if x is None:
        raise _Drop("unparseable gold")
    return format_number(x)


def _row_gsm8k(rec: Mapping, verifier: str | None) -> Row:
    solution = rec.get("answer")
    if solution is None or not str(solution).strip():
        raise _Drop("missing answer")
    text = _text(rec.get("question"))
    gold = gsm8k_gold(str(solution))
    meta = {"solution": str(solution), **_extra(rec, {"question", "answer"})}
    return text, gold, verifier or "gsm8k", meta, None


def _row_math(rec: Mapping, verifier: str | None) -> Row:
    solution = "" if rec.get("solution") is None else str(rec["solution"])
    answer = rec.get("answer")
    if answer is not None and str(answer).strip():
        gold = str(answer).strip()
    elif "\\boxed" in solution or "\\fbox" in solution:
        gold = last_boxed(solution)
        if gold is None:  # \boxed{ with unbalanced braces
            raise _Drop("unparseable gold")
        if not gold:
            raise _Drop("missing answer")
    else:
        raise _Drop("missing answer")
    text = _text(rec.get("problem"))
    meta = {"solution": solution, **_extra(rec, {"problem", "solution", "answer"})}
    return text, gold, verifier or "math", meta, None


def _row_jsonl(rec: Mapping, verifier: str | None) -> Row:
    answer = rec.get("answer")
    if answer is None or not str(answer).strip():
        raise _Drop("missing answer")
    text = _text(rec.get("text"))
    spec = rec.get("verifier") or verifier or "exact"
    if spec not in VERIFIERS:
        raise ValueError(f"unknown verifier {spec!r}; choose one of {sorted(VERIFIERS)}")
    gold = str(answer).strip()
    if spec != "reasoning_gym" and get_verifier(spec).canonical(gold) is None:
        raise _Drop("unparseable gold")
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    meta = {**_extra(rec, {"text", "answer", "verifier", "split", "meta"}), **_jsonable(meta)}
    return text, gold, spec, meta, rec.get("split")


ROW_FORMATS: dict[str, Callable[[Mapping, "str | None"], Row]] = {
    "gsm8k": _row_gsm8k,
    "math": _row_math,
    "jsonl": _row_jsonl,
}


# ---- helpers -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A JSON-able copy of ``value``: containers recursed, anything unknown turned into str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | None]]:
    """``(line number, record)`` for every non-blank line; record is None for bad JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield lineno, None
                continue
            yield lineno, rec if isinstance(rec, dict) else None


def task_seed(seed: int, task: str, config: Mapping | None = None) -> int:
    """Per-task generator seed from the global seed, the task name and its config.

    Stable across runs and independent of the other tasks (adding one reseeds nobody); the
    config is part of it so the same task listed twice with different settings does not
    replay the same random stream (which would mostly produce duplicates).
    """
    key = json.dumps(_jsonable(dict(config or {})), sort_keys=True)
    return int(hashlib.sha256(f"{seed}:{task}:{key}".encode()).hexdigest()[:8], 16)


def _validate(src: Any, i: int) -> dict:
    where = f"data.sources[{i}]"
    if not isinstance(src, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', got {type(src).__name__}")
    kind = src.get("kind")
    if kind not in SOURCE_KEYS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; choose one of {sorted(SOURCE_KEYS)}")
    unknown = set(src) - SOURCE_KEYS[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} for kind {kind!r}; "
                          f"valid keys are {sorted(SOURCE_KEYS[kind])}")
    missing = REQUIRED_KEYS[kind] - set(src)
    if missing:
        raise ConfigError(f"{where}: kind {kind!r} needs key(s) {sorted(missing)}")
    limit = src.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"{where}: limit must be a non-negative integer, got {limit!r}")
    if kind == "hf" and src["format"] not in FORMATS:
        raise ConfigError(f"{where}: unknown format {src['format']!r}; choose one of {list(FORMATS)}")
    if "verifier" in src and src["verifier"] not in VERIFIERS:
        raise ConfigError(f"{where}: unknown verifier {src['verifier']!r}; choose one of {sorted(VERIFIERS)}")
    if kind in ("gsm8k", "math", "jsonl") and not Path(src["path"]).is_file():
        raise ConfigError(f"{where}: file not found: {src['path']} (paths are relative to the working directory)")
    return dict(src)


# ---- per-kind row generators: yield (source, line, record-or-None, format, verifier) ----------

RawRow = tuple[str, int, "dict | None", str, "str | None"]


def _rows_file(src: dict) -> Iterator[RawRow]:
    kind = src["kind"]
    source = src.get("name") or f"{kind}:{Path(src['path']).name}"
    for lineno, rec in iter_jsonl(src["path"]):
        yield source, lineno, rec, kind, src.get("verifier")


def _rows_hf(src: dict) -> Iterator[RawRow]:
    import datasets  # lazy: heavy, and only needed by this source kind

    name, config = src["name"], src.get("config")
    data_files = src.get("data_files")
    source = f"hf:{name}" + (f"/{config}" if config else "")
    if data_files:
        first = data_files if isinstance(data_files, str) else next(iter(
            data_files.values() if isinstance(data_files, Mapping) else data_files))
        first = first if isinstance(first, str) else first[0]
        source += f":{Path(first).name}"
    ds = datasets.load_dataset(name, config, split=src.get("split", "train"), data_files=data_files)
    for idx, rec in enumerate(ds):
        yield source, idx, dict(rec), src["format"], src.get("verifier")


def _rows_reasoning_gym(src: dict, seed: int, where: str) -> Iterator[RawRow]:
    import reasoning_gym  # lazy: heavy

    tasks = src["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{where}: 'tasks' must be a non-empty list of {{name, size, config}}")
    prefix = src.get("name") or "reasoning_gym"
    built = []
    for j, task in enumerate(tasks):  # validate every task before generating any
        where_task = f"{where}.tasks[{j}]"
        if not isinstance(task, Mapping) or "name" not in task:
            raise ConfigError(f"{where_task}: expected a mapping with keys {sorted(RG_TASK_KEYS)}")
        unknown = set(task) - RG_TASK_KEYS
        if unknown:
            raise ConfigError(f"{where_task}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(RG_TASK_KEYS)}")
        name, size, config = task["name"], int(task.get("size", 100)), dict(task.get("config") or {})
        if {"seed", "size"} & set(config):
            raise ConfigError(f"{where_task}: put 'size' next to 'config', not in it; the seed is derived "
                              "from the global seed and the task name")
        unsafe = rg_unsafe_reason(name)
        if unsafe:
            raise ConfigError(f"{where_task}: {unsafe}; choose another task")
        try:
            ds = reasoning_gym.create_dataset(name, seed=task_seed(seed, name, config), size=size, **config)
        except Exception as e:  # unknown task, bad config key or value: all params mistakes
            raise ConfigError(f"{where_task} ({name!r}): {e}") from e
        built.append((name, ds))
    for name, ds in built:
        for idx in range(len(ds)):
            entry = _jsonable(ds[idx])
            rec = {"text": entry.get("question"), "answer": entry.get("answer"), "verifier": "reasoning_gym",
                   "meta": {"rg_entry": entry, "task": name}}
            yield f"{prefix}:{name}", idx, rec, "jsonl", "reasoning_gym"


def _raw_rows(src: dict, seed: int, where: str) -> Iterator[RawRow]:
    kind = src["kind"]
    if kind == "reasoning_gym":
        rows = _rows_reasoning_gym(src, seed, where)
    elif kind == "hf":
        rows = _rows_hf(src)
    else:
        rows = _rows_file(src)
    limit = src.get("limit")
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


# ---- the loader --------------------------------------------------------------------------------


def load_sources(sources: Iterable[Mapping], fractions: Iterable[float] = (0.6, 0.2, 0.2),
                 seed: int = 0) -> tuple[list[Query], list[dict]]:
    """Load every source into queries; return ``(queries, dropped rows)``.

    Queries keep source order; a query whose ``query_id`` was already seen is dropped as a
    duplicate (the first one is kept). The split comes from hashing the ``query_id`` unless the
    row names a valid split itself.
    """
    try:
        fractions = tuple(float(f) for f in fractions)
        split_of("0", fractions)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.split: {e}") from e
    checked = [_validate(src, i) for i, src in enumerate(sources or [])]
    queries: list[Query] = []
    dropped: list[dict] = []
    seen: set[str] = set()
    bad_splits: dict[str, int] = {}
    for i, src in enumerate(checked):
        for source, line, rec, fmt, verifier in _raw_rows(src, seed, f"data.sources[{i}]"):
            if rec is None:
                dropped.append({"source": source, "line": line, "reason": "bad json"})
                continue
            try:
                text, answer, spec, meta, split = ROW_FORMATS[fmt](rec, verifier)
            except _Drop as d:
                dropped.append({"source": source, "line": line, "reason": d.reason})
                continue
            except ValueError as e:  # e.g. a row naming an unknown verifier: fix the data
                raise ValueError(f"{source} line {line}: {e}") from e
            if split is not None and split not in SPLITS:
                bad_splits[source] = bad_splits.get(source, 0) + 1
                split = None
            q = Query.create(text, answer, spec, source, meta=meta, fractions=fractions, split=split)
            if q.query_id in seen:
                dropped.append({"source": source, "line": line, "reason": "duplicate", "query_id": q.query_id})
                continue
            seen.add(q.query_id)
            queries.append(q)
    for source, n in bad_splits.items():
        log.warning("%s: %d row(s) named a split outside %s; they were split by hash instead", source, n, SPLITS)
    return queries, dropped


# ---- the gold check ---------------------------------------------------------------------------


def check_file(path: str | Path, fmt: str, verifier: str | None = None) -> dict:
    """Check that every reference solution in ``path`` verifies against its own answer.

    - ``gsm8k``: the "#### N" value parses as a number and the solution without that line
      arrives at it (:meth:`pipelines.verifiers.NumericVerifier.check_gold`: N is the last
      ``<<expr=X>>`` result or a number stated on the solution's last line with a number, up
      to a factor of 100 for dollars -> cents and fraction -> percent).
    - ``math``: with an ``answer`` field, the last ``\\boxed{}`` of the solution verifies
      against it (math-verify, gold first); without one, the boxed answer must parse.
    - ``jsonl``: with a ``solution`` field, the verifier's ``check_gold``; otherwise the answer
      must be a valid gold answer for the row's verifier.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    rows = 0
    verified = 0
    failures: list[dict] = []
    for line, rec in iter_jsonl(path):
        rows += 1
        if rec is None:
            failures.append({"line": line, "reason": "bad json", "gold": None, "extracted": None})
            continue
        try:
            _, gold, spec, _, _ = ROW_FORMATS[fmt](rec, verifier)
        except _Drop as d:
            failures.append({"line": line, "reason": d.reason, "gold": None, "extracted": None})
            continue
        except ValueError as e:  # e.g. a row naming an unknown verifier
            failures.append({"line": line, "reason": str(e), "gold": None, "extracted": None})
            continue
        try:
            ok, extracted, reason = _check_row(fmt, rec, gold, get_verifier(spec))
        except ValueError as e:  # unknown verifier in the row, a verifier without reference checks
            ok, extracted, reason = False, None, str(e)
        if ok:
            verified += 1
        else:
            failures.append({"line": line, "reason": reason, "gold": gold, "extracted": extracted})
    return {"rows": rows, "gold_verified": verified, "failures": failures}


def _check_row(fmt: str, rec: Mapping, gold: str, v) -> tuple[bool, str | None, str]:
    if fmt == "gsm8k":
        body = str(rec["answer"]).rsplit("####", 1)[0]
        values = gsm8k_solution_values(body)
        return v.check_gold(body, gold), (values[0] if values else None), "solution disagrees with answer"
    if fmt == "math":
        solution = str(rec.get("solution") or "")
        extracted = last_boxed(solution)
        if rec.get("answer") is not None and str(rec["answer"]).strip():
            if extracted is None:
                return False, None, "solution has no boxed answer"
            return v.is_correct(extracted, gold, {}), extracted, "solution disagrees with answer"
        parses = getattr(v, "parses", None)
        ok = parses(gold) if parses else v.canonical(gold) is not None
        return ok, gold, "unparseable gold"
    solution = rec.get("solution")
    if solution is not None and str(solution).strip():
        extracted = v.extract(str(solution))
        return v.is_correct(extracted, gold, rec.get("meta") or {}), extracted, "solution disagrees with answer"
    extracted = v.canonical(gold)
    return extracted is not None, extracted, "unparseable gold"


def main(argv: list[str] | None = None) -> int:
    """``check FILE --format F [--verifier V]``: print the JSON report; exit 1 on any failure."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.datasets", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="does every reference solution verify against its own answer")
    check.add_argument("file")
    check.add_argument("--format", required=True, choices=FORMATS)
    check.add_argument("--verifier", choices=sorted(VERIFIERS), default=None,
                       help="gsm8k/math: replaces the format's verifier; jsonl: for rows without their own "
                            "(default: exact)")
    args = ap.parse_args(argv)
    if not Path(args.file).is_file():
        ap.error(f"file not found: {args.file}")
    report = check_file(args.file, args.format, args.verifier)
    print(json.dumps(report, indent=1))
    return 0 if report["gold_verified"] == report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
