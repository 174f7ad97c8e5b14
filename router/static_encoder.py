"""Static MiniLM embeddings: one distilled vector per word piece, averaged. No torch, no ONNX.

The table (written by ``pipelines/static_distill.py``) holds, for every id of MiniLM's
word-piece vocabulary, MiniLM's own sentence embedding of that single piece (the pooled
output of ``[CLS] piece [SEP]``). A query's embedding is the mean of its pieces' rows,
L2-normalized: the Model2Vec idea without its PCA and frequency weighting, so a one-piece
text gets exactly MiniLM's embedding and longer texts an order-free approximation of it.

It is its own embedding (``FeaturizerSpec.embedding == "all-MiniLM-L6-v2-static"``), not a
stand-in for the contextual one: a router that serves with it is trained on it, so training
and serving compute identical features. The cost is a tokenizer call and one row gather,
well under a millisecond for a GSM8K question.

Imports only numpy and tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DIM = 384
NAME = "all-MiniLM-L6-v2-static"
TABLE_FILE = "static.npy"
TOKENIZER_FILE = "tokenizer.json"


class StaticEncoder:
    """Texts to unit-length mean-of-pieces embeddings from a distilled table.

    An input with no word pieces (empty or whitespace only) embeds as the all-zero vector:
    the runtime's empty-query fallback catches it before the model sees it.
    """

    def __init__(self, table_path: str | Path, tokenizer_path: str | Path, max_tokens: int = 256,
                 batch_size: int = 64):
        from tokenizers import Tokenizer

        self.table_path = str(table_path)
        self.tokenizer_path = str(tokenizer_path)
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)  # unused: kept so every encoder takes the same kwargs
        self.calls = 0  # texts encoded: lets tests prove caching works
        # float16 on disk halves the bundle; rows are widened only when gathered
        self.table = np.load(self.table_path, allow_pickle=False, mmap_mode="r")
        if self.table.ndim != 2 or self.table.shape[1] != DIM:
            raise ValueError(f"{self.table_path}: expected a (vocab, {DIM}) table, got shape {self.table.shape}")
        tok = Tokenizer.from_file(self.tokenizer_path)
        # the same pieces MiniLM would read: max_tokens includes [CLS] and [SEP]
        tok.enable_truncation(max_length=max(self.max_tokens - 2, 1))
        tok.no_padding()
        self.tokenizer = tok
        if tok.get_vocab_size() > self.table.shape[0]:
            raise ValueError(f"{self.table_path}: table has {self.table.shape[0]} rows, "
                             f"the tokenizer {tok.get_vocab_size()} ids")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32; each row L2-normalized, or zero for a text without pieces."""
        texts = list(texts)
        self.calls += len(texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        for j, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if not enc.ids:
                continue
            v = np.asarray(self.table[enc.ids], dtype=np.float32).mean(axis=0)
            n = float(np.linalg.norm(v))
            if n > 0:
                out[j] = v / n
        return out
