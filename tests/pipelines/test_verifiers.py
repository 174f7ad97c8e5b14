"""Verifiers: answer extraction, numeric/math/choice/exact equivalence, untrusted input, timeouts, reasoning-gym."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipelines import verifiers as V
from pipelines.queries import Query
from pipelines.verifiers import get_verifier, score

# ---- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("\nThe final answer is 42.", "42"),
    ("The final answer is 42", "42"),
    ("Step 1 gives 7.\nThe answer is 12 apples.", "12"),
    ("The answer is 5. Wait, no.\nThe final answer is 6.", "6"),  # the LAST phrase wins
    ("First 3 then 4.\n#### 1,600", "1600"),
    ("so we get \\boxed{18} dollars", "18"),
    ("\\boxed{3} then \\boxed{4}", "4"),
    ("She has 3 apples and buys 4 more, 7 in total", "7"),  # last number, numeric only
    ("The final answer is $1,000.00.", "1000"),
    ("The final answer is 16 - 3 - 4 = 9 eggs.", "9"),
    ("The final answer is: **-5**", "-5"),
    ("The final answer is 3/4", "0.75"),
    ("The final answer is \\frac{1}{3}", "1/3"),
    ("The final answer is 50%", "50"),
    ("The final answer is 2.50 dollars. Next question: 7 + 1", "2.5"),
    ("Answer: 12", "12"),
    ("The final answer is unclear, maybe 8", "8"),  # no number after the phrase: fall back
    ("no digits at all", None),
    ("", None),
])
def test_numeric_extract(text, expected):
    assert get_verifier("gsm8k").extract(text) == expected


def test_phrase_beats_hashes_beats_boxed_beats_last_number():
    v = get_verifier("numeric")
    assert v.extract("\\boxed{1}\n#### 2\nThe answer is 3. Then 4") == "3"
    assert v.extract("\\boxed{1}\n#### 2\nthen 4") == "2"
    assert v.extract("\\boxed{1} then 4") == "1"


def test_boxed_balanced_braces():
    assert V.last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert V.last_boxed("\\boxed{a} \\boxed{\\sqrt{x^{2}}}") == "\\sqrt{x^{2}}"
    assert V.last_boxed("\\boxed{unbalanced") is None
    assert get_verifier("math").extract("The final answer is $\\boxed{x^2 + 1}$.") == "x^2 + 1"


@pytest.mark.parametrize("pred, gold, ok", [
    ("1,000", "1000", True),
    ("1000.00", "1000", True),
    ("$1,000", "1000.00", True),
    ("0.75", "3/4", True),
    ("-5", "-5.0", True),
    ("50%", "50", True),
    ("12 apples", "12", True),
    ("13", "12", False),
    ("1/0", "0", False),
    ("", "0", False),
    (None, "0", False),
])
def test_numeric_equivalence(pred, gold, ok):
    assert get_verifier("gsm8k").is_correct(pred, gold, {}) is ok


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"),
    ("I would pick C) because", "C"),
    ("the answer is B", "B"),
    ("Final answer: d", "D"),
    ("(A) is wrong, (E) is right", "E"),
    ("The answer is a mystery", None),
])
def test_choice_extract(text, expected):
    assert get_verifier("choice").extract(text) == expected


def test_choice_and_exact_compare():
    c, e = get_verifier("choice"), get_verifier("exact")
    assert c.is_correct("B", "(B)", {}) and c.is_correct("b", "B", {}) and not c.is_correct("C", "B", {})
    assert e.is_correct(e.extract("The final answer is **New  York**."), "new york", {})
    assert not e.is_correct("York", "New York", {})
    assert not e.is_correct(None, "x", {})


def test_registry():
    assert get_verifier("gsm8k") is get_verifier("gsm8k")
    with pytest.raises(ValueError, match=r"unknown verifier 'nope'; choose one of \["):
        get_verifier("nope")


def test_score_uses_query_verifier():
    q = Query.create("What is 2+2?", "4", "gsm8k", "test")
    assert score(q, "2+2=4\nThe final answer is 4.") == ("4", True)
    assert score(q, "The final answer is 5.") == ("5", False)
    assert score(q, "I don't know") == (None, False)


def test_numeric_is_fast():
    v = get_verifier("gsm8k")
    text = "Let me think. 12 * 3 = 36, then 36 + 4 = 40.\nThe final answer is 40."
    t0 = time.perf_counter()
    for _ in range(2000):
        v.is_correct(v.extract(text), "40", {})
    assert (time.perf_counter() - t0) / 2000 < 1e-3


# ---- math (math-verify in a worker process) ---------------------------------------------------


@pytest.mark.parametrize("pred, gold, ok", [
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\frac12", "\\dfrac{1}{2}", True),
    ("x^2+1", "1+x^2", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.5", False),
])
def test_math_equivalence(pred, gold, ok):
    assert get_verifier("math").is_correct(pred, gold, {}) is ok


def test_math_check_gold_and_parses():
    m = get_verifier("math")
    assert m.check_gold("So the result is $\\boxed{\\frac{3}{4}}$.", "0.75")
    assert not m.check_gold("So the result is $\\boxed{\\frac{3}{5}}$.", "0.75")
    assert m.parses("\\frac{3}{4}")


UNTRUSTED = [
    "The final answer is __import__('os').system('touch PWNED')",
    "\\boxed{__import__('os').system('touch PWNED')}",
    "The answer is eval(\"__import__('os').system('touch PWNED')\")",
    "#### exec(\"open('PWNED','w').write('x')\")",
    "The final answer is (lambda: __import__('os').system('touch PWNED'))()",
]


@pytest.mark.parametrize("spec", ["gsm8k", "numeric", "exact", "choice", "math"])
def test_untrusted_output_is_never_executed(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v = get_verifier(spec)
    for text in UNTRUSTED:
        pred = v.extract(text)
        assert v.is_correct(pred, "0", {}) is False
        if pred is not None and spec == "math":
            v.is_correct(pred, "__import__('os').system('touch PWNED')", {})
            v.parses(pred)
    assert not (tmp_path / "PWNED").exists()


def test_untrusted_reasoning_gym(tmp_path, monkeypatch):
    import reasoning_gym

    monkeypatch.chdir(tmp_path)
    entry = reasoning_gym.create_dataset("chain_sum", seed=1, size=1)[0]
    q = Query.create(entry["question"], entry["answer"], "reasoning_gym", "rg", meta={"rg_entry": entry})
    for text in UNTRUSTED:
        assert score(q, text)[1] is False
    assert not (tmp_path / "PWNED").exists()


# (x+y+z+1)^30 vs (x+y+z+2)^30 takes math-verify ~20 s of sympy expansion on this machine
SLOW_GOLD, SLOW_PRED = "(x+y+z+1)^{30}", "(x+y+z+2)^{30}"


def test_math_timeout_off_the_main_thread(caplog):
    m = V.MathVerifier(timeout=1.0)
    assert m.is_correct("0.5", "1/2", {})  # warm the worker, so the deadline measures the check
    results: dict = {}

    def run():
        t0 = time.perf_counter()
        try:
            results["ok"] = m.is_correct(SLOW_PRED, SLOW_GOLD, {})
        except Exception as e:  # surfaced below; a thread would swallow it
            results["error"] = e
        results["seconds"] = time.perf_counter() - t0

    with caplog.at_level(logging.WARNING, logger="pipelines.verifiers"):
        t = threading.Thread(target=run)
        t.start()
        t.join(60)
    assert not t.is_alive()
    assert "error" not in results, results.get("error")
    assert results["ok"] is False
    assert results["seconds"] < 10
    assert any("timed out" in r.getMessage() for r in caplog.records)
    # the killed worker is replaced: the next check, also off the main thread, works
    later: dict = {}
    t2 = threading.Thread(target=lambda: later.setdefault("ok", m.is_correct("\\frac{1}{2}", "0.5", {})))
    t2.start()
    t2.join(120)
    assert later.get("ok") is True


# ---- reasoning-gym ---------------------------------------------------------------------------


def test_reasoning_gym_scoring_on_a_generated_entry():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("leg_counting", seed=3, size=1, max_animals=3)[0]
    q = Query.create(entry["question"], entry["answer"], "reasoning_gym", "reasoning_gym:leg_counting",
                     meta={"rg_entry": entry, "task": "leg_counting"})
    gold = entry["answer"]
    assert score(q, f"Counting legs...\nThe final answer is {gold}.") == (gold, True)
    assert score(q, f"<answer>{gold}</answer>")[1] is True
    assert score(q, f"The final answer is {int(gold) + 1}.")[1] is False
    # partial credit (reasoning-gym scores "14 legs" vs "14" below 1.0) never counts as correct
    v = get_verifier("reasoning_gym")
    assert v.is_correct(f"about {gold} or so", gold, q.meta) is False
    assert v.is_correct(None, gold, q.meta) is False


def test_reasoning_gym_refuses_tasks_that_eval_answers():
    assert V.rg_unsafe_reason("countdown") and V.rg_unsafe_reason("string_insertion")
    assert V.rg_unsafe_reason("chain_sum") is None
    entry = {"question": "q", "answer": "1", "metadata": {"source_dataset": "puzzle24"}}
    with pytest.raises(ValueError, match="eval"):
        get_verifier("reasoning_gym").is_correct("1", "1", {"rg_entry": entry})


def test_reasoning_gym_needs_entry():
    with pytest.raises(ValueError, match="rg_entry"):
        get_verifier("reasoning_gym").is_correct("1", "1", {})
