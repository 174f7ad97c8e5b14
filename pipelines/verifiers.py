"""Answer extraction and checking: the place silent label errors come from, so it is strict.

Model output is untrusted input. Nothing here evaluates it: numbers are parsed with regular
expressions and :class:`fractions.Fraction`, MATH answers go to ``math-verify`` (which parses
LaTeX with its own grammar) inside a separate worker process with a deadline, and
reasoning-gym answers go to the task's own ``score_answer``.

Extraction order (:meth:`Verifier.extract`), the same for every verifier:

1. the LAST "final answer is X" / "the answer is X" / "answer: X" phrase with a usable X
   (the rest of its line up to a sentence end, or a ``\\boxed{}`` right after it),
2. the last "#### X" line (GSM8K's reference format),
3. the last ``\\boxed{...}`` (balanced braces),
4. per verifier: the last number (numeric, reasoning_gym), ``<answer>`` tags
   (reasoning_gym), "(B)" / "B)" (choice), a bare one-line text (exact).

Each verifier then reduces the raw candidate to its own canonical form (a number, a letter,
a normalized string), so majority votes group equivalent answers together.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.queries import Query

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# raw candidate extraction (shared by all verifiers)

# "The final answer is 42", "the answer is: (B)", "Final Answer: 3/4", "answer = 7"
_PHRASE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\b\s*:?|:|=)[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number as people and models write it: thousands separators only in groups of three (so
# "3, 4, 5" stays a list), an optional decimal part, /denominator and exponent, a sign only
# where it cannot be a minus between two operands ("5-3" holds 5 and 3).
_NUMBER_FIND = re.compile(
    r"(?<![\w.])(?:[-+\u2212](?=\s?\$?\s?\.?\d))?\s?\$?\s?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?\d+(?![\d.,]\d))?"
    r"(?:[eE][-+]?\d+)?"
)
_EXPONENT = re.compile(r"[eE]([-+]?\d+)$")
_MAX_EXPONENT = 300  # Fraction("1e999999999") would build a billion-digit integer
_MAX_DIGITS = 300  # longer digit runs are not answers (and int() refuses > 4300 digits)
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of every ``{`` -> index of its matching ``}``, in one pass (escaped braces skipped).

    One pass keeps untrusted text with thousands of unclosed ``\\boxed{`` linear, where
    scanning forward from each of them would be quadratic.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # \{ and \} are literal braces; \\ is a LaTeX line break
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    pairs = _brace_pairs(text)
    for m in reversed(list(_BOXED.finditer(text))):
        close = pairs.get(m.end() - 1)
        if close is not None:
            return text[m.end():close].strip()
    return None


_MAX_PHRASES = 20  # answer phrases tried, from the last; a model that keeps going is not answering
_MAX_VALUE = 500  # characters of a phrase's line that can hold its answer


def _phrase_values(text: str):
    """Values after the answer phrases, last first (lazy), each cut at its line's end.

    A boxed value right after the phrase is taken whole, even across lines, because LaTeX
    answers may span them. Only the last :data:`_MAX_PHRASES` phrases and the first
    :data:`_MAX_VALUE` characters of each line count, so adversarial text stays linear.
    """
    pairs = None
    for m in reversed(list(_PHRASE.finditer(text))[-_MAX_PHRASES:]):
        start = m.end()
        while start < len(text) and text[start] in "$ \t":
            start += 1
        boxed = _BOXED.match(text, start)
        if boxed:
            if pairs is None:
                pairs = _brace_pairs(text)
            close = pairs.get(boxed.end() - 1)
            if close is not None:
                yield text[boxed.end():close].strip()
                continue
        end = text.find("\n", m.end(), m.end() + _MAX_VALUE)
        line = text[m.end(): end if end >= 0 else m.end() + _MAX_VALUE]
        # up to a sentence end: "42. Next, ..." -> "42" (a decimal point has no space after it)
        yield _SENTENCE_END.split(line, 1)[0]


def _answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` (reasoning-gym's format), or None."""
    close = text.rfind("</answer>")
    if close < 0:
        return None
    open_ = text.rfind("<answer>", 0, close)
    return None if open_ < 0 else text[open_ + len("<answer>"):close].strip()


def _tidy(value: str) -> str:
    """Strip the wrapping a model puts around an answer: markdown, $...$, quotes, a period."""
    v = value.strip()
    for _ in range(3):
        before = v
        v = v.strip().strip("*_`\"'").strip()
        if v.startswith("\\(") and v.endswith("\\)"):
            v = v[2:-2]
        if v.startswith("\\[") and v.endswith("\\]"):
            v = v[2:-2]
        if len(v) >= 2 and v[0] == "$" and v.rstrip(".")[-1:] == "$" and v.count("$") == 2:
            v = v.rstrip(".")[1:-1]
        v = v.rstrip(".;,!").strip()
        if v == before:
            break
    return v


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` as an exact :class:`Fraction`, or None.

    Commas in thousands groups, ``$``, ``%`` and trailing units are ignored ("$1,000.00
    dollars" -> 1000); ``3/4`` and ``\\frac{3}{4}`` are fractions. No eval: regex + Fraction.
    """
    if text is None:
        return None
    m = _FRAC.search(text)
    if m and not _NUMBER_FIND.search(text[: m.start()]):
        try:
            num, den = Fraction(m.group(1)), Fraction(m.group(2))
            sign = -1 if text[: m.start()].rstrip().endswith(("-", "\u2212")) else 1
            return sign * num / den if den else None
        except (ValueError, ZeroDivisionError):
            return None
    m = _NUMBER_FIND.search(text)
    if not m:
        return None
    return _to_fraction(m.group(0))


def _to_fraction(token: str) -> Fraction | None:
    s = token.replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    e = _EXPONENT.search(s)
    if (e and abs(int(e.group(1))) > _MAX_EXPONENT) or sum(c.isdigit() for c in s) > _MAX_DIGITS:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            d = Fraction(den)
            return Fraction(num) / d if d else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _last_number(text: str) -> Fraction | None:
    matches = list(_NUMBER_FIND.finditer(text))
    for m in reversed(matches):
        value = _to_fraction(m.group(0))
        if value is not None:
            return value
    return None


def format_number(x: Fraction) -> str:
    """Canonical text of a number: ``1000``, ``0.75``, ``-1/3`` (exact, never a rounded float)."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # a terminating decimal: write it out exactly
        sign = "-" if x < 0 else ""
        a = abs(x)
        digits = 0
        while (a * 10**digits).denominator != 1:
            digits += 1
        scaled = (a * 10**digits).numerator
        whole, frac = divmod(scaled, 10**digits)
        return f"{sign}{whole}.{frac:0{digits}d}"
    return f"{x.numerator}/{x.denominator}"


# --------------------------------------------------------------------------------------------
# verifiers


class Verifier:
    """Extracts a final answer from a completion and checks it against the gold answer."""

    name = "base"

    def extract(self, text: str) -> str | None:
        """The final answer in ``text`` (a completion or a forced answer), canonicalized."""
        if not text:
            return None
        for raw in self._candidates(text):
            value = self.canonical(raw)
            if value is not None:
                return value
        return None

    def _candidates(self, text: str):
        """Raw answer strings in priority order (lazy: the first good one wins)."""
        for v in _phrase_values(text):
            if v.strip():
                yield v
        hashes = _HASHES.findall(text)
        if hashes:
            yield hashes[-1]
        boxed = last_boxed(text)
        if boxed is not None:
            yield boxed

    def canonical(self, raw: str) -> str | None:
        """Reduce a raw candidate to this verifier's answer form; None if it is not one."""
        v = _tidy(raw)
        return v or None

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        """Whether ``pred`` (from :meth:`extract`) matches ``gold``. None is never correct."""
        raise NotImplementedError

    def check_gold(self, solution: str, gold: str) -> bool:
        """Whether a dataset's reference ``solution`` verifies against its own ``gold``."""
        return self.is_correct(self.extract(solution), gold, {})


class NumericVerifier(Verifier):
    """GSM8K-style numbers: compared exactly as fractions after stripping $, %, commas, units."""

    name = "numeric"

    def _candidates(self, text: str):
        yield from super()._candidates(text)
        last = _last_number(text)
        if last is not None:
            yield format_number(last)

    def canonical(self, raw: str) -> str | None:
        # "16 - 3 - 4 = 9 eggs": the result is what follows the last "="
        x = parse_number(raw.rsplit("=", 1)[-1])
        return None if x is None else format_number(x)

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        if pred is None:
            return False
        a, b = parse_number(pred), parse_number(str(gold))
        return a is not None and b is not None and a == b

    def check_gold(self, solution: str, gold: str) -> bool:
        """Whether the GSM8K-style ``solution`` arrives at ``gold``.

        True when ``gold`` equals one of :func:`gsm8k_solution_values`, or 100 times / one
        hundredth of one: GSM8K solutions often compute dollars or a fraction and the answer
        line gives cents or percent ("$0.25 each" -> "#### 25").
        """
        g = parse_number(str(gold))
        if g is None:
            return False
        for v in gsm8k_solution_values(solution):
            x = parse_number(v)
            if x is not None and g in (x, 100 * x, x / 100):
                return True
        return False


_CALC = re.compile(r"<<([^<>]*?)=([^<>=]*)>>")
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d])")
_NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split())
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def gsm8k_solution_values(solution: str) -> list[str]:
    """The values a GSM8K reference solution states as its result, *without* its "#### N" line.

    GSM8K solutions end with the line that states the result, but not always as its last
    number ("... = $6 for 2 tubs and 4 packets", "1600 > 1200", "it took three days",
    "$118 000"). So the candidates, best first, are: the result of the last ``<<expr=X>>``
    calculator annotation on the last line that has a number, then every number on that line
    (last first; digits with comma or space thousands, and number words up to twenty), then
    the result of the last annotation anywhere. Nothing is evaluated: an annotation's
    right-hand side is read as a number.
    """
    body = "\n".join(line for line in solution.splitlines() if not line.lstrip().startswith("####"))
    lines = [line for line in body.splitlines() if line.strip()]
    out: list[str] = []

    def add(x: Fraction | None) -> None:
        if x is not None and format_number(x) not in out:
            out.append(format_number(x))

    for line in reversed(lines):
        prose = _CALC.sub("", line)  # the displayed number after an annotation repeats its result
        numbers = [Fraction(_NUMBER_WORDS[w.lower()]) for w in _NUMBER_WORD.findall(prose)]
        numbers += [Fraction(m.group(0).replace(" ", "")) for m in _SPACED_THOUSANDS.finditer(prose)]
        numbers += [_to_fraction(m.group(0)) for m in _NUMBER_FIND.finditer(prose)]
        calcs = _CALC.findall(line)
        if not numbers and not calcs:
            continue
        if calcs:
            add(parse_number(calcs[-1][1]))
        for x in reversed(numbers):
            add(x)
        break
    calcs = _CALC.findall(body)
    if calcs:
        add(parse_number(calcs[-1][1]))
    return out


class ExactVerifier(Verifier):
    """Whitespace- and case-normalized string equality.

    Without an answer phrase or marker, a one-line text is its own answer (a bare " Paris.").
    """

    name = "exact"

    def _candidates(self, text: str):
        yield from super()._candidates(text)
        bare = text.strip()
        if "\n" not in bare and len(bare) <= _MAX_VALUE:
            yield bare

    def canonical(self, raw: str) -> str | None:
        v = " ".join(_tidy(raw).split()).lower()
        return v or None

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        if pred is None:
            return False
        return self.canonical(pred) == self.canonical(str(gold))


_CHOICE_VALUE = re.compile(r"^\(?([A-E])\)?(?:$|[\s.:,)])")
_CHOICE_PAREN = re.compile(r"\(([A-E])\)")
_CHOICE_CLOSE = re.compile(r"(?<![A-Za-z(])([A-E])\)")
_CHOICE_LINE = re.compile(r"(?m)^\s*([A-E])[.:](?:\s|$)")


class ChoiceVerifier(Verifier):
    """Multiple choice: a letter A-E, from "answer is (B)", "(B)", "B)" or a bare letter."""

    name = "choice"

    def extract(self, text: str) -> str | None:
        value = super().extract(text)
        if value is not None or not text:
            return value
        for pattern in (_CHOICE_PAREN, _CHOICE_CLOSE, _CHOICE_LINE):
            found = pattern.findall(text)
            if found:
                return found[-1]
        return self.canonical(text)

    def canonical(self, raw: str) -> str | None:
        v = _tidy(raw)
        if len(v) == 1 and v in "abcde":  # a lone lowercase letter; "a" inside prose is an article
            return v.upper()
        m = _CHOICE_VALUE.match(v)
        return m.group(1) if m else None

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        if pred is None:
            return False
        g = self.canonical(str(gold).strip().upper())
        return g is not None and self.canonical(pred) == g


# ---- math: math-verify in a worker process ---------------------------------------------------

_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\s+")


def _normalize_latex(s: str) -> str:
    return _LATEX_NOISE.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))


_PLAIN_INT = re.compile(r"^[-+]?\d+$")


class MathVerifier(Verifier):
    """MATH-style answers (``\\boxed{}``), compared with math-verify in a worker process.

    math-verify's own timeouts use ``signal.alarm``, which only works on the main thread, so
    they are switched off and the deadline is enforced here instead: each check runs in a
    persistent worker process that is killed and restarted when it overruns ``timeout``
    seconds. A check that times out counts as incorrect and logs a warning.
    """

    name = "math"

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout

    def canonical(self, raw: str) -> str | None:
        v = _tidy(raw)
        return v or None

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        if pred is None:
            return False
        gold = str(gold)
        a, b = _normalize_latex(_tidy(pred)), _normalize_latex(_tidy(gold))
        if not a:
            return False
        if a == b:
            return True
        # fast path for the common "42" vs "43": two integers differ in every notation
        if _PLAIN_INT.match(a) and _PLAIN_INT.match(b):
            return int(a) == int(b)
        return _math_worker().call("verify", (gold, pred), self.timeout)

    def parses(self, text: str) -> bool:
        """Whether math-verify can parse ``text`` as a mathematical answer."""
        return _math_worker().call("parses", (text,), self.timeout)

    def check_gold(self, solution: str, gold: str) -> bool:
        """The last ``\\boxed{}`` of ``solution`` verifies against ``gold``."""
        boxed = last_boxed(solution)
        return boxed is not None and self.is_correct(boxed, gold)


def _as_math(s: str) -> str:
    """One ``$...$``-delimited expression, as math-verify's LaTeX extractor expects it.

    The input is an already extracted answer, so stray dollar signs are currency or leftover
    delimiters, never structure.
    """
    s = s.strip().replace("\\$", "").replace("$", "")
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2]
    return f"${s.strip()}$"


def _mv_parse(text: str, fallback: bool = True) -> list:
    """math-verify's parse, LaTeX only, signal timeout off (the caller owns the deadline).

    Only the LaTeX extractor: it parses with latex2sympy's grammar, whereas the plain-expression
    extractor hands text to sympy's ``parse_expr``, which is ``eval``.
    """
    from math_verify import LatexExtractionConfig, parse

    return parse(_as_math(text), extraction_config=[LatexExtractionConfig()],
                 fallback_mode="first_match" if fallback else "no_fallback", parsing_timeout=None)


def _verify_in_process(gold: str, pred: str) -> bool:
    from math_verify import verify

    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return False
    # asymmetric: the gold answer comes first
    return bool(verify(g, p, timeout_seconds=None))


def _parses_in_process(text: str) -> bool:
    return bool(_mv_parse(text, fallback=False))


_OPS = {"verify": _verify_in_process, "parses": _parses_in_process}


def _worker_main(conn) -> None:  # runs in the child process
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we own it
    import math_verify  # noqa: F401  (import before "ready" so the first check's deadline is fair)

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        op, args = msg
        try:
            result = bool(_OPS[op](*args))
        except Exception:  # a parser crash on odd input is a wrong answer, not a crash
            result = False
        conn.send(result)


class _MathWorker:
    """One lazily started worker process, shared by all threads (checks are serialized)."""

    startup_timeout = 120.0  # importing sympy + math-verify in a cold process

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        import multiprocessing as mp

        # never fork: the parent may hold threads (llama.cpp, torch) whose locks a fork copies
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="math-verify")
        proc.start()
        child.close()
        try:
            ready = parent.poll(self.startup_timeout) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            proc.kill()
            parent.close()
            raise RuntimeError("the math-verify worker process did not start; is math-verify installed "
                               "(the pipeline extra)? Its stderr above says why")
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, op: str, args: tuple, timeout: float) -> bool:
        """Run ``op`` in the worker; False (and a warning) if it dies or overruns ``timeout``."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._kill()
                self._start()
            try:
                self._conn.send((op, args))
                if self._conn.poll(timeout):
                    return bool(self._conn.recv())
                what = f"timed out after {timeout:.1f}s"
            except (EOFError, OSError):
                what = "worker died"
            self._kill()  # the next call starts a fresh worker
            log.warning("math-verify %s: %s on %s; counted as incorrect",
                        op, what, ", ".join(repr(a[:200]) for a in args))
            return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
            self._kill()


_WORKER: _MathWorker | None = None
_WORKER_LOCK = threading.Lock()


def _math_worker() -> _MathWorker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _MathWorker()
        return _WORKER


def shutdown() -> None:
    """Stop the math-verify worker process, if one was started (it also dies with its parent)."""
    with _WORKER_LOCK:
        if _WORKER is not None:
            _WORKER.close()


# ---- reasoning-gym -------------------------------------------------------------------------


# Tasks whose scorer (reasoning-gym 0.1.25, audited) runs ``eval``/``parse_expr`` on the
# model's answer, or ``eval`` on the stored entry: scoring untrusted text with them would run
# it. They are refused; :func:`rg_unsafe_reason` also scans newer versions' scorers.
RG_UNSAFE_TASKS = frozenset({
    "binary_matrix", "n_queens", "spiral_matrix", "string_insertion",  # eval(answer)
    "countdown", "puzzle24", "polynomial_multiplication",  # sympy parse_expr(answer)
    "simple_integration", "intermediate_integration",  # sympy parse_expr(answer)
    "bitwise_arithmetic", "number_sorting",  # eval of the entry's problem/answer
})
_EVALS = re.compile(r"\beval\(|\bexec\(|parse_expr|sympify")


def rg_unsafe_reason(task: str) -> str | None:
    """Why ``task``'s reasoning-gym scorer must not see model output, or None if it may."""
    if task in RG_UNSAFE_TASKS:
        return f"reasoning-gym task {task!r} scores answers with eval/parse_expr (runs the text as code)"
    import inspect

    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        return None  # reasoning-gym itself reports unknown tasks
    try:
        source = inspect.getsource(DATASETS[task][0].score_answer)
    except (OSError, TypeError):
        return None
    if _EVALS.search(source):
        return f"reasoning-gym task {task!r}: its score_answer calls eval/exec/parse_expr/sympify"
    return None


class ReasoningGymVerifier(Verifier):
    """reasoning-gym tasks, scored by the task's own ``score_answer``; correct only at 1.0.

    The generated entry is stored in ``meta["rg_entry"]`` (see ``pipelines/datasets.py``).
    Extraction also reads reasoning-gym's ``<answer>...</answer>`` tags and falls back to the
    last number, which suits the arithmetic and counting tasks this project uses; on other
    tasks a wrong fallback only ever produces an incorrect mark. Tasks whose scorer evaluates
    its input (:data:`RG_UNSAFE_TASKS`) are refused with a ValueError.
    """

    name = "reasoning_gym"

    def _candidates(self, text: str):
        yield from super()._candidates(text)
        tag = _answer_tag(text)
        if tag:
            yield tag
        last = _LAST_NUMBER_TOKEN(text)
        if last is not None:
            yield last

    def canonical(self, raw: str) -> str | None:
        v = _tidy(raw)
        if not v:
            return None
        # "$1,000 apples" scores as "1000", but a number keeps its own notation ("3/4",
        # "0.50"): task scorers compare strings and fractions differently
        m = _NUMBER_ONLY.match(v)
        if m:
            return m.group(1).replace(",", "").replace(" ", "").replace("\u2212", "-")
        return v

    def is_correct(self, pred: str | None, gold: str, meta: dict | None = None) -> bool:
        if pred is None:
            return False
        entry = (meta or {}).get("rg_entry")
        if not isinstance(entry, dict):
            raise ValueError("reasoning_gym verifier needs meta['rg_entry'] (the generated entry)")
        fn = _rg_score_fn(entry["metadata"]["source_dataset"])
        try:
            score = fn(pred, entry)
        except Exception as e:  # a task scorer choking on odd model output is a wrong answer
            log.debug("reasoning-gym scorer raised %r on %r", e, pred[:200])
            return False
        return score is not None and float(score) == 1.0

    def check_gold(self, solution: str, gold: str) -> bool:
        raise ValueError("reasoning_gym entries carry no reference solution; score entries instead")


_NUMBER_ONLY = re.compile(
    r"^\$?\s?([-+\u2212]?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?|[-+\u2212]?\.\d+)"
    r"\s?%?(?:\s+[A-Za-z]+){0,2}$"
)


def _LAST_NUMBER_TOKEN(text: str) -> str | None:
    matches = list(_NUMBER_FIND.finditer(text))
    return matches[-1].group(0).strip() if matches else None


_RG_FNS: dict[str, Any] = {}


def _rg_score_fn(task: str):
    if task not in _RG_FNS:
        reason = rg_unsafe_reason(task)
        if reason:
            raise ValueError(f"{reason}; it cannot score untrusted model output")
        import reasoning_gym

        _RG_FNS[task] = reasoning_gym.get_score_answer_fn(task)
    return _RG_FNS[task]


# --------------------------------------------------------------------------------------------
# registry

VERIFIERS: dict[str, type[Verifier]] = {
    "gsm8k": NumericVerifier,
    "numeric": NumericVerifier,
    "math": MathVerifier,
    "exact": ExactVerifier,
    "choice": ChoiceVerifier,
    "reasoning_gym": ReasoningGymVerifier,
}
_INSTANCES: dict[str, Verifier] = {}


def get_verifier(spec: str) -> Verifier:
    """The verifier registered as ``spec`` (instances are shared; verifiers hold no state)."""
    if spec not in VERIFIERS:
        raise ValueError(f"unknown verifier {spec!r}; choose one of {sorted(VERIFIERS)}")
    if spec not in _INSTANCES:
        _INSTANCES[spec] = VERIFIERS[spec]()
    return _INSTANCES[spec]


def score(query: "Query", text: str) -> tuple[str | None, bool]:
    """Extract the answer from ``text`` and check it with ``query``'s verifier."""
    v = get_verifier(query.verifier)
    pred = v.extract(text)
    return pred, v.is_correct(pred, query.answer, query.meta)
