"""Router runtime: training parity, ONNX vs torch encoder, caps, fallbacks, odd input, bad bundles, light import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router import BundleError, Router
from router.bundle import write_manifest
from router.policy import choose
from tests.router.bundle_fixture import copy_bundle, session_bundle

REPO = Path(__file__).resolve().parents[2]
ODD_TEXTS = [
    "  What is 12 + 7?  ",
    "Café naïve 😀 ünïcödé — 中文 問題: 3 × 4 = ?",
    "word " * 400,  # > 256 word pieces: truncated the same way by both encoders
    "1234567890" * 150,  # hits max_chars
    "\t\n tabs\r\nand newlines\n",
    "x",
]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return session_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def r_onnx(built):
    r = Router.load(built.path, encoder="onnx")
    r.route("warm up")
    return r


@pytest.fixture(scope="module")
def r_st(built):
    r = Router.load(built.path, encoder="sentence-transformers")
    r.route("warm up")
    return r


# ---------------------------------------------------------------- parity with training


def test_runtime_scores_equal_the_training_predictor_on_held_out_rows(built, r_onnx):
    te = built.rows("test")
    X = built.X[te]
    P_train = np.clip(built.success.predict(X), 0, 1)
    C_train = built.cost.predict(X)
    P_run = np.clip(r_onnx.success.predict(X), 0, 1)  # loaded from the bundle's files
    C_run = r_onnx.cost.predict(X)
    assert np.abs(P_run - P_train).max() <= 1e-6
    assert np.abs(C_run - C_train).max() <= 1e-6
    assert P_train.std(axis=0).max() > 0.05  # the model learned something to be equal about
    lam = built.manifest["policy"]["lambda"]
    for j in range(len(te)):
        assert r_onnx.decide(P_run[j], C_run[j]) == (choose(P_train[j], C_train[j], lam), "utility")


@pytest.mark.parametrize("which", ["r_st", "r_onnx"])
def test_text_to_decision_agrees_with_the_pipeline_featurizer(built, which, request):
    r = request.getfixturevalue(which)
    te = built.rows("test")
    texts = [built.texts[i] for i in te]
    X, P, C = r.predict(texts)
    assert np.abs(X - built.X[te]).max() < 1e-5  # the training features, from text, by either encoder
    P_train = np.clip(built.success.predict(built.X[te]), 0, 1)
    assert np.abs(P - P_train).max() < 1e-4
    lam = built.manifest["policy"]["lambda"]
    decisions = r.route_batch(texts)
    names = [t.name for t in r.tiers]
    for j, d in enumerate(decisions):
        assert d.p_correct == pytest.approx(P_train[j][names.index(d.tier)], abs=1e-4)
        if d.reason == "utility":
            assert d.tier == names[choose(P_train[j], built.cost.predict(built.X[te][j:j + 1])[0], lam)]
    assert sum(d.reason == "utility" for d in decisions) >= len(decisions) * 0.8
    singles = [r.route(t) for t in texts[:5]]
    assert singles == decisions[:5]


# ---------------------------------------------------------------- ONNX encoder vs sentence-transformers


def test_onnx_embeddings_match_sentence_transformers(built, r_onnx, record_property):
    texts = built.texts + ODD_TEXTS
    emb = [i for i, n in enumerate(r_onnx.featurizer.feature_names) if n.startswith("emb_")]
    # the training features hold sentence-transformers' embeddings of the fixture's texts; the
    # odd texts go apart, since a batch pads to its longest text and 256-piece rows are slow
    ref = np.concatenate([built.X[:, emb], built.featurizer.encoder.encode(ODD_TEXTS)]).astype(np.float32)
    got = np.concatenate([r_onnx.featurizer.encoder.encode(built.texts), r_onnx.featurizer.encoder.encode(ODD_TEXTS)])
    assert got.shape == ref.shape == (len(texts), 384) and got.dtype == np.float32
    cos = (ref * got).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    max_abs = float(np.abs(ref - got).max())
    record_property("onnx_min_cosine", float(cos.min()))
    record_property("onnx_max_abs_diff", max_abs)
    print(f"ONNX vs sentence-transformers on {len(texts)} texts: min cosine {cos.min():.9f}, "
          f"max abs diff {max_abs:.3g}")
    assert cos.min() > 0.999
    assert max_abs < 1e-4  # measured ~2e-7: fp32 both ways


def test_onnx_encoder_counts_calls_and_handles_empty_input(r_onnx):
    enc = r_onnx.featurizer.encoder
    before = enc.calls
    assert enc.encode([]).shape == (0, 384)
    e = enc.encode(["a", "b", "a"])
    assert enc.calls == before + 3
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5) and np.array_equal(e[0], e[2])


def test_decisions_agree_between_encoders(built, r_onnx, r_st, record_property):
    texts = built.texts + ODD_TEXTS
    a = r_onnx.route_batch(built.texts) + r_onnx.route_batch(ODD_TEXTS)
    b = r_st.route_batch(built.texts) + r_st.route_batch(ODD_TEXTS)
    same = sum(x.tier == y.tier and x.reason == y.reason for x, y in zip(a, b))
    dp = max(abs(x.p_correct - y.p_correct) for x, y in zip(a, b) if x.tier == y.tier and x.reason == "utility")
    record_property("decision_agreement", same / len(texts))
    print(f"decisions agree on {same}/{len(texts)}; max |p_correct difference| {dp:.3g}")
    assert same >= 0.95 * len(texts), f"{same}/{len(texts)} decisions agree"


# ---------------------------------------------------------------- caps and fallbacks


@pytest.mark.parametrize("caps", [
    {"max_budget": 64}, {"max_budget": 0}, {"max_samples": 1}, {"models": ["big"]}, {"models": ["small"]},
    {"max_cost": 60.0}, {"max_latency": 60.0}, {"max_budget": 256, "max_samples": 1, "models": ["small"]},
])
def test_only_tiers_within_caps_are_chosen(built, r_onnx, caps):
    tiers = {t.name: t for t in r_onnx.tiers}
    latency = dict(zip(tiers, r_onnx.latency))
    for d in r_onnx.route_batch(built.texts[:40] + ["Something unlike any training query: a haiku"], **caps):
        t = tiers[d.tier]
        assert d.reason in ("utility", "fallback:out-of-distribution"), d
        assert t.budget <= caps.get("max_budget", math.inf)
        assert t.samples <= caps.get("max_samples", math.inf)
        assert t.model in caps.get("models", [t.model])
        assert d.expected_cost <= caps.get("max_cost", math.inf)
        assert latency[d.tier] <= caps.get("max_latency", math.inf)


def test_unsatisfiable_caps_fall_back_to_the_cheapest_tier(built, r_onnx):
    cheapest = built.manifest["policy"]["cheapest_tier"]
    for caps in ({"max_budget": -1}, {"models": []}, {"max_cost": 0.0}, {"models": ["nope"]}):
        d = r_onnx.route("What is 17 * 23?", **caps)
        assert (d.tier, d.reason) == (cheapest, "fallback:no-tier-within-caps"), caps
    with pytest.raises(TypeError, match="max_tokens"):
        r_onnx.route("What is 1 + 1?", max_tokens=5)


def test_a_caps_value_routes_like_keyword_caps(built, r_onnx):
    from router import Caps

    texts = built.texts[:20] + ["", "Describe the smell of rain on hot asphalt in the style of a sonnet."]
    for kw in ({"max_budget": 64}, {"models": ["big"]}, {"max_cost": 60.0, "max_samples": 1}, {}):
        assert r_onnx.route_batch(texts, caps=Caps(**kw)) == r_onnx.route_batch(texts, **kw), kw
    assert r_onnx.route(texts[0], caps={"max_budget": 0}).budget == 0
    d = r_onnx.fallback(Caps(max_budget=0))
    assert d.budget == 0 and d.reason == "fallback:error" and d.p_correct is None


def test_empty_query_fallback_respects_caps(r_onnx):
    d = r_onnx.route("", models=["big"])
    assert d.model == "big"


def test_empty_query_falls_back_to_the_cheapest_tier(built, r_onnx):
    cheapest = built.manifest["policy"]["cheapest_tier"]
    for text in ("", "   ", "\n\t\r\n", None, "\x00"):
        d = r_onnx.route(text)
        assert (d.tier, d.reason) == (cheapest, "fallback:empty-query"), repr(text)
        assert d.p_correct is None and d.expected_cost is None


def test_a_query_unlike_training_falls_back(built, r_onnx):
    d = r_onnx.route("Describe the smell of rain on hot asphalt in the style of a sonnet.")
    assert (d.tier, d.reason) == (built.manifest["policy"]["fallback_tier"], "fallback:out-of-distribution")


REASONS = {"utility", "utility:truncated", "fallback:empty-query", "fallback:out-of-distribution"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.characters(exclude_categories=()), max_size=300))
@example(text="")
@example(text="a" * 1_000_000)
@example(text="What is 7 + 8? " * 70_000)  # ~1 MB of something that looks like a query
@example(text="\x00\x01\x02\x1b[31m\x7f\u200b\ufeff")
@example(text="😀🎉👩‍👩‍👧‍👦" * 50)
@example(text="\ud800")
@example(text="What is \udfff 2 + 2 \ud83d?")
def test_route_returns_a_valid_decision_for_any_string(r_onnx, text):
    d = r_onnx.route(text)
    tiers = {t.name: t for t in r_onnx.tiers}
    assert d.tier in tiers
    t = tiers[d.tier]
    assert (d.budget, d.samples, d.model) == (t.budget, t.samples, t.model)
    assert d.reason in REASONS
    if d.reason.startswith("utility"):
        assert 0.0 <= d.p_correct <= 1.0 and d.expected_cost >= 0.0
    else:
        assert d.p_correct is None and d.expected_cost is None or 0.0 <= d.p_correct <= 1.0
    json.dumps(d.to_dict())


# ---------------------------------------------------------------- bad bundles


def _flip_byte(p: Path, at: int = 100) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x01
    p.write_bytes(bytes(data))


def test_tampered_truncated_or_missing_files_are_refused_by_name(built, tmp_path):
    cases = {
        "tampered": ("success_lgbm_joint.txt", _flip_byte),
        "truncated": ("ood_ref.npy", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        "deleted": ("encoder/tokenizer.json", lambda p: p.unlink()),
        "deleted_onnx": ("encoder/model.onnx", lambda p: p.unlink()),  # a hard link: the original stays
    }
    for case, (rel, damage) in cases.items():
        d = copy_bundle(built.path, tmp_path / case)
        damage(d / rel)
        with pytest.raises(BundleError) as e:
            Router.load(d)
        assert rel in str(e.value), (case, str(e.value))
    assert (built.path / "encoder" / "model.onnx").exists()


def test_newer_or_broken_manifest_is_refused_by_name(built, tmp_path):
    d = copy_bundle(built.path, tmp_path / "newer")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "schema_version": m["schema_version"] + 1}))
    with pytest.raises(BundleError, match=r"manifest\.json.*newer"):
        Router.load(d)
    (d / "manifest.json").write_text('{"schema_version": 1, "tiers": [')
    with pytest.raises(BundleError, match=r"manifest\.json.*not valid JSON"):
        Router.load(d)
    with pytest.raises(BundleError, match="not a bundle folder"):
        Router.load(tmp_path / "nowhere")


def test_onnx_encoder_requested_from_a_bundle_without_it(built, tmp_path):
    d = copy_bundle(built.path, tmp_path / "no_onnx")
    m = json.loads((d / "manifest.json").read_text())
    for p in (d / "encoder").iterdir():
        p.unlink()
    (d / "encoder").rmdir()
    write_manifest(d, {k: v for k, v in m.items() if k != "files"} | {"encoder": None})
    with pytest.raises(BundleError, match="no ONNX encoder"):
        Router.load(d, encoder="onnx")
    assert Router.load(d).featurizer.encoder_name == "sentence-transformers"  # auto falls back


# ---------------------------------------------------------------- packaging


def test_importing_the_runtime_pulls_in_nothing_heavy():
    heavy = ["torch", "vllm", "mlflow", "dvc", "numpy", "pandas", "lightgbm", "onnxruntime", "tokenizers",
             "sentence_transformers", "transformers", "sklearn", "llama_cpp", "ray", "fastapi", "pipelines"]
    code = ("import sys, router, router.cli, router.server, router.executor, router.decision, router.vote\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
