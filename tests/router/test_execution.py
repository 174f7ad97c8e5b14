"""Execution settings in the bundle: round trip, strict keys, the seed rule and stop strings
checked, a clear error for a bundle without them, the request seed rule."""

from __future__ import annotations

import pytest

from router.bundle import BundleError
from router.execution import (
    SEED_LIMIT,
    SEED_RULE,
    ModelExecution,
    execution_of,
    execution_section,
    prompt_seed,
    require,
)
from router.generation import SamplingConfig


def settings(**kw) -> ModelExecution:
    return ModelExecution(**{"template": "chatml", "system_prompt": "S", "answer_tokens": 10,
                             "sampling": SamplingConfig(temperature=0.7, top_k=20), "tokens_per_second": 90.5, **kw})


def test_round_trip_through_the_manifest():
    section = execution_section({"m": settings(), "g": settings(template="fewshot", tokens_per_second=None)})
    assert section["seed_rule"] == SEED_RULE
    assert section["models"]["m"]["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert section["models"]["m"]["answer_stop"] == ["\n", "<|im_end|>", "<|im_start|>"]
    back = execution_of({"execution": section})
    assert back == {"m": settings(), "g": settings(template="fewshot", tokens_per_second=None)}
    assert execution_of({}) == {}  # an older bundle: nothing to execute with, but it loads


@pytest.mark.parametrize("change,fragment", [
    (lambda s: s.update(seed_rule="seed*2"), "seed_rule"),
    (lambda s: s["models"]["m"].update(colour="red"), "unknown key"),
    (lambda s: s["models"]["m"].pop("force_suffix"), "missing key"),
    (lambda s: s["models"]["m"].update(template="jinja"), "unknown prompt template"),
    (lambda s: s["models"]["m"].update(stop=["</s>"]), "stop"),
    (lambda s: s["models"]["m"]["sampling"].update(seed=1), "sampling"),
    (lambda s: s.update(models=[1]), "models"),
])
def test_a_wrong_section_is_a_bundle_error(change, fragment):
    section = execution_section({"m": settings()})
    change(section)
    with pytest.raises(BundleError, match=fragment):
        execution_of({"execution": section}, "b/manifest.json")


def test_require_names_the_missing_models_and_keys():
    with pytest.raises(BundleError) as e:
        require({"m": settings()}, ["m", "x", "y"], "b/manifest.json")
    msg = str(e.value)
    assert "['x', 'y']" in msg and "template" in msg and "force_suffix" in msg and "re-export" in msg


def test_request_seed_rule():
    ex = settings()
    p = ex.prompt("What is 2+2?")
    r = ex.request(p, 16, 3)
    assert r.seed == prompt_seed(p) == ex.request(p, 0, 1).seed and 0 <= r.seed < SEED_LIMIT
    assert prompt_seed(ex.prompt("What is 2+3?")) != r.seed
    assert ex.request(p, 16, 3, seed=5).seed == 5
    assert (r.n, r.budgets, r.answer_tokens, r.force_suffix) == (3, (16,), 10, ex.force_suffix)
