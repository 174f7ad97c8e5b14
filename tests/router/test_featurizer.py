"""``Featurizer.from_bundle``'s encoder choice and its BundleErrors, and the encoder registry
(manifests only: no encoder is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import BundleError
from router.featurizer import (ENCODERS, MINILM_STATIC, Encoder, Featurizer, FeaturizerSpec,
                               SentenceTransformerEncoder, _has)

ONNX = {"onnx": "encoder/model.onnx", "tokenizer": "encoder/tokenizer.json"}
STATIC = {"static": "encoder/static.npy", "tokenizer": "encoder/tokenizer.json"}


def manifest(spec: FeaturizerSpec, encoder=None, **extra) -> dict:
    return {"featurizer": spec.to_dict(), "feature_names": spec.feature_names(), "encoder": encoder, **extra}


def test_auto_picks_onnx_when_shipped_and_installed(tmp_path):
    fz = Featurizer.from_bundle(tmp_path, manifest(FeaturizerSpec(), ONNX))
    want = "onnx" if _has("onnxruntime") else "sentence-transformers"
    assert fz.encoder_name == want and fz._encoder is None  # chosen, not built
    if want == "onnx":
        assert fz.encoder_kwargs == {"model_path": str(tmp_path / "encoder/model.onnx"),
                                     "tokenizer_path": str(tmp_path / "encoder/tokenizer.json")}
    assert Featurizer.from_bundle(tmp_path, manifest(FeaturizerSpec())).encoder_name == "sentence-transformers"
    st = Featurizer.from_bundle(tmp_path, manifest(FeaturizerSpec(), ONNX), encoder="sentence-transformers")
    assert (st.encoder_name, st.encoder_kwargs) == ("sentence-transformers", {})


def test_a_static_bundle_gets_the_static_encoder_with_its_files(tmp_path):
    spec = FeaturizerSpec(embedding=MINILM_STATIC)
    for choice in ("auto", "static"):
        fz = Featurizer.from_bundle(tmp_path, manifest(spec, STATIC), encoder=choice)
        assert fz.encoder_name == "static"
        assert fz.encoder_kwargs == {"table_path": str(tmp_path / "encoder/static.npy"),
                                     "tokenizer_path": str(tmp_path / "encoder/tokenizer.json")}


@pytest.mark.parametrize("spec,encoder,choice,message", [
    (FeaturizerSpec(), None, "onnx", "bundle has no ONNX encoder; export with export.onnx_encoder: true"),
    (FeaturizerSpec(), ONNX, "static", "static encoder computes all-MiniLM-L6-v2-static embeddings; "
                                       "this bundle was trained on all-MiniLM-L6-v2"),
    (FeaturizerSpec(embedding=MINILM_STATIC), STATIC, "onnx", "computed by the static encoder only, not 'onnx'"),
    (FeaturizerSpec(embedding=MINILM_STATIC), ONNX, "auto", "static embedding but no encoder.static table"),
])
def test_a_bundle_that_cannot_serve_the_encoder_is_refused(tmp_path, spec, encoder, choice, message):
    with pytest.raises(BundleError) as e:
        Featurizer.from_bundle(tmp_path, manifest(spec, encoder), encoder=choice)
    assert message in str(e.value) and str(tmp_path) in str(e.value)


def test_bad_featurizer_entries_name_the_manifest(tmp_path):
    m = manifest(FeaturizerSpec(), ONNX)
    with pytest.raises(BundleError, match=r"manifest\.json: cannot build models \(ValueError: unknown featurizer"):
        Featurizer.from_bundle(tmp_path, {**m, "featurizer": {**m["featurizer"], "colour": "red"}})
    with pytest.raises(BundleError, match=r"manifest\.json: feature_names do not match"):
        Featurizer.from_bundle(tmp_path, {**m, "feature_names": m["feature_names"][1:]})


def test_the_encoder_registry_lists_valid_names_and_imports_lazily():
    assert ENCODERS.names() == ["model", "onnx", "sentence-transformers", "static"]
    assert ENCODERS.get("sentence-transformers") is SentenceTransformerEncoder
    assert all(issubclass(ENCODERS.get(n), Encoder) for n in ("onnx", "static", "model"))
    fz = Featurizer(FeaturizerSpec(embedding="none"), encoder="glove")  # no embedding: nothing checked yet
    fz.spec = FeaturizerSpec()  # now it needs one: the registry names the valid encoders
    with pytest.raises(ValueError, match=r"unknown encoder 'glove'; choose one of \['model', 'onnx'"):
        fz.encoder  # noqa: B018


def test_the_encoder_base_counts_texts_and_handles_empty_input():
    class Ones(Encoder):
        def _encode(self, texts, out):
            out[:] = 1.0

    enc = Ones()
    assert enc.encode([]).shape == (0, 384) and enc.calls == 0
    e = enc.encode(iter(["a", "b"]))
    assert e.shape == (2, 384) and e.dtype.name == "float32" and float(e.sum()) == 768.0 and enc.calls == 2
    assert Ones().calls == 0  # counted per instance


def test_paths_are_relative_to_the_bundle(tmp_path):
    fz = Featurizer.from_bundle(str(tmp_path), manifest(FeaturizerSpec(embedding=MINILM_STATIC), STATIC))
    assert Path(fz.encoder_kwargs["table_path"]).parent.parent == tmp_path
