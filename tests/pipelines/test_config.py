"""params overrides (`--set KEY=VALUE`): YAML values, strict keys that list the valid ones, model names a key can address."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, apply_override, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "params" / "gpu.yaml"
PROFILES = (REPO / "params.yaml", GPU)


def test_values_are_parsed_as_yaml():
    p = load_params(GPU, ["data.max_queries=6", "rollout.temperature=0.5", "tiers.grid.0.budgets=[0, 8]",
                          "models.qwen2_5-1_5b.options.enforce_eager=true", "data.sources.0.limit=3",
                          "policy.lambda=0.01", "models.qwen2_5-1_5b.path=/models/qwen"])
    assert p.data.max_queries == 6 and p.rollout.temperature == 0.5 and p.policy.lam == 0.01
    assert sorted({t.budget for t in p.tier_list()}) == [0, 8]
    m = p.model("qwen2_5-1_5b")
    assert m.options["enforce_eager"] is True and m.path == "/models/qwen"
    assert p.data.sources[0]["limit"] == 3
    # what the file says, for every key not overridden
    assert m.options["max_model_len"] == 5120 and p.rollout.answer_tokens == 32


@pytest.mark.parametrize("item, message", [
    ("data.max_querys=6", "unknown key 'max_querys' in data; valid keys are ['max_queries', 'outcomes', 'sources', 'split']"),
    ("rollut.n_max=2", "unknown key 'rollut' in params; valid keys are ["),
    ("models.qwen.path=x", "unknown model 'qwen'; declared: ['qwen2_5-1_5b']"),
    ("models.qwen2_5-1_5b.pathh=x", "unknown key 'pathh' in models.qwen2_5-1_5b; valid keys are ['backend', 'cost_per_token'"),
    ("tiers.grid.3.budgets=[0]", "tiers.grid.3 is not an index of a list of 1"),
    ("tiers.gird.0.budgets=[0]", "unknown key 'gird' under tiers"),
    ("data.max_queries.x=1", "data.max_queries is a value, not a section"),
    ("data.max_queries", "expected KEY=VALUE"),
    ("data.max_queries=[1", "is not valid YAML"),
])
def test_an_unknown_key_fails_with_the_valid_ones(item, message):
    raw = yaml.safe_load(GPU.read_text())
    with pytest.raises(ConfigError) as e:
        apply_override(raw, item)
    assert message in str(e.value)


def test_a_model_name_must_be_addressable_by_set():
    with pytest.raises(ConfigError, match=r"models\.qwen2\.5-1\.5b: a model name .* e\.g\. 'qwen2_5-1_5b'"):
        parse_params({"models": {"qwen2.5-1.5b": {}}})
    with pytest.raises(ConfigError, match="e.g. 'm_7b'"):
        parse_params({"models": {"7b": {}}})


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_model_of_the_shipped_profiles_takes_set_and_dvc_overrides(profile, tmp_path):
    """Both override routes, ours and DVC's own parser (`dvc exp run -S`), reach every model's path."""
    from dvc.utils.hydra import apply_overrides

    names = sorted(load_params(profile).models)
    items = [f"models.{n}.path=/models/{n}" for n in names]
    assert {n: m.path for n, m in load_params(profile, items).models.items()} == {n: f"/models/{n}" for n in names}
    copy = tmp_path / "params.yaml"
    copy.write_text(profile.read_text())
    apply_overrides(str(copy), items)
    assert {n: m["path"] for n, m in yaml.safe_load(copy.read_text())["models"].items()} == \
        {n: f"/models/{n}" for n in names}
