"""The house rules, read from the source: no import cycles, `router` never imports `pipelines`, a
stage never imports another stage, dvc.yaml lists every file a stage can run, and dvc.lock was
made by the code at HEAD."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipelines import DVC_STAGES
from tests.code_graph import REPO, STAGE_ENTRY, cycles, graph, stage_code


def test_no_import_cycles():
    assert cycles(graph(registry_strings=False)) == []


def test_router_never_imports_pipelines():
    g = graph(registry_strings=False)
    bad = sorted((m, t) for m, ts in g.items() if m.startswith("router") for t in ts if t.startswith("pipelines"))
    assert bad == []


def test_a_stage_never_imports_another_stage():
    g = graph(registry_strings=False)
    stage_modules = {f"pipelines.{s}" for s in DVC_STAGES}
    for s in DVC_STAGES:
        own = {m for m in g if m == f"pipelines.{s}" or m.startswith(f"pipelines.{s}.")}
        for m in own:
            others = {t for t in g[m] if any(t == o or t.startswith(o + ".") for o in stage_modules - {f"pipelines.{s}"})}
            assert not others, (m, others)


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_dvc_yaml_lists_every_code_file_the_stage_runs(stage):
    assert set(STAGE_ENTRY) == set(DVC_STAGES)
    deps = set(_dvc_stages()[stage]["deps"])
    needed = set(stage_code(stage))
    assert needed - deps == set(), f"dvc.yaml stage {stage} misses code deps"
    code = {d for d in deps if d.startswith(("pipelines/", "router/"))}
    assert all((REPO / d).is_file() for d in code), "code deps are files (a folder hides what changed)"
    assert code - needed == set(), f"dvc.yaml stage {stage} lists code it never runs"


def test_verifiers_are_a_dependency_of_label_not_rollout():
    stages = _dvc_stages()
    assert "pipelines/verifiers.py" in stages["label"]["deps"]
    assert "pipelines/verifiers.py" not in stages["rollout"]["deps"]


def test_dvc_yaml_params_name_keys_that_exist():
    from pipelines.config import load_params

    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in _dvc_stages().items():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]
    del params


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_lock_matches_the_code_at_head():
    """A change to a stage's code without a re-run (and a new dvc.lock) cannot land."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(_dvc_stages()), "dvc.lock has not been made by the current dvc.yaml"
    stale = []
    for name, stage in lock.items():
        for dep in stage.get("deps", []):
            p = REPO / dep["path"]
            if dep["path"].startswith(("pipelines/", "router/")):
                if not p.is_file() or _md5(p) != dep["md5"]:
                    stale.append(f"{name}: {dep['path']}")
        want = set(_dvc_stages()[name]["deps"])
        got = {d["path"] for d in stage.get("deps", [])}
        if want != got:
            stale.append(f"{name}: deps in dvc.lock {sorted(got ^ want)} differ from dvc.yaml")
    assert not stale, f"dvc.lock is stale (run `dvc repro` and commit dvc.lock): {len(stale)} findings: " + "; ".join(stale[:8])
