"""MiniLM on ONNX Runtime: the same embedding as sentence-transformers, without torch.

The graph (written by ``pipelines/onnx_export.py``) maps token ids to MiniLM's last hidden
state; tokenization (``tokenizers``), mean pooling over the attention mask and L2
normalization happen here in NumPy, exactly as sentence-transformers does them for
all-MiniLM-L6-v2: [CLS] text [SEP], lower-cased word pieces, truncated to ``max_tokens``
pieces *including* the two special tokens, padded to the longest text of the batch.

Imports only numpy, onnxruntime and tokenizers (and ``router.featurizer``'s encoder base).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from router.featurizer import Encoder, word_piece_tokenizer

DIM = Encoder.dim  # MiniLM-L6's hidden size


class OnnxEncoder(Encoder):
    """Texts to unit-length MiniLM embeddings through an exported ONNX graph.

    ``intra_op_threads`` defaults to 1, so an embedded router takes one core and no thread
    pool; raise it for large offline batches.
    """

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_tokens: int = 256,
                 batch_size: int = 64, intra_op_threads: int = 1):
        import onnxruntime as ort

        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path)
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)
        self.intra_op_threads = int(intra_op_threads)

        # max_seq_length counts the special tokens, as sentence-transformers does; each batch
        # is padded to its longest text in _encode_batch()
        self.tokenizer = word_piece_tokenizer(self.tokenizer_path, self.max_tokens)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers are noise here
        self.session = ort.InferenceSession(self.model_path, sess_options=so, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _encode(self, texts: list[str], out: np.ndarray) -> None:
        """Each row L2-normalized (never all zeros: [CLS] is always there)."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        # batches of similar token counts pad little (sentence-transformers sorts by characters;
        # padding is masked, so the grouping changes nothing but speed)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            out[idx] = self._encode_batch([ids[i] for i in idx])

    def _encode_batch(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = r
            mask[j, :len(r)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], feeds)[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)
