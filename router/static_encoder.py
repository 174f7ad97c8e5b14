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

Imports only numpy and tokenizers (and ``router.featurizer``'s encoder base).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from router.featurizer import Encoder, word_piece_tokenizer

DIM = Encoder.dim
NAME = "all-MiniLM-L6-v2-static"
TABLE_FILE = "static.npy"
TOKENIZER_FILE = "tokenizer.json"


class StaticEncoder(Encoder):
    """Texts to unit-length mean-of-pieces embeddings from a distilled table.

    An input with no word pieces (empty or whitespace only) embeds as the all-zero vector:
    the runtime's empty-query fallback catches it before the model sees it.
    """

    def __init__(self, table_path: str | Path, tokenizer_path: str | Path, max_tokens: int = 256,
                 batch_size: int = 64):
        self.table_path = str(table_path)
        self.tokenizer_path = str(tokenizer_path)
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)  # unused: kept so every encoder takes the same kwargs
        # float16 on disk halves the bundle; rows are widened only when gathered
        self.table = np.load(self.table_path, allow_pickle=False, mmap_mode="r")
        if self.table.ndim != 2 or self.table.shape[1] != DIM:
            raise ValueError(f"{self.table_path}: expected a (vocab, {DIM}) table, got shape {self.table.shape}")
        # the same pieces MiniLM would read: max_tokens includes [CLS] and [SEP]
        tok = self.tokenizer = word_piece_tokenizer(self.tokenizer_path, max(self.max_tokens - 2, 1))
        if tok.get_vocab_size() > self.table.shape[0]:
            raise ValueError(f"{self.table_path}: table has {self.table.shape[0]} rows, "
                             f"the tokenizer {tok.get_vocab_size()} ids")

    def _encode(self, texts: list[str], out: np.ndarray) -> None:
        """Each row L2-normalized, or zero for a text without pieces."""
        for j, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if not enc.ids:
                continue
            v = np.asarray(self.table[enc.ids], dtype=np.float32).mean(axis=0)
            n = float(np.linalg.norm(v))
            if n > 0:
                out[j] = v / n
