"""Export MiniLM to ONNX so the runtime can embed queries without torch.

The graph is the transformer only: ``input_ids``, ``attention_mask``, ``token_type_ids``
(batch x sequence, both dynamic) to ``last_hidden_state``. Mean pooling and L2
normalization stay in NumPy in ``router.onnx_encoder``: they are two lines there, and keeping
them out of the graph keeps it the plain BERT pattern ONNX Runtime fuses (attention,
skip-layer-norm, bias-GELU) at session creation.

fp32, not int8. Measured on 300 GSM8K questions, one core: dynamic int8 quantization
(``quantize_dynamic``, per channel) is ~1.5x faster but its embeddings drift to cosine 0.986
(worst case) from sentence-transformers', far outside the parity the features need; leaving
the FFN down-projection in fp32 still gives 0.994. fp32 gives cosine > 0.9999999.

The export is checked before it is returned: the exported graph, run through the runtime's
own encoder, must reproduce the sentence-transformers embedding on probe texts (padding
and truncation included), or the export fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a native op from 17; every onnxruntime >= 1.14 runs it
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# the check's tolerance: fp32 graph vs torch differs by ~2e-7 per component in practice
PARITY_MAX_ABS = 1e-4
PROBES = (
    "What is 17 * 23?",
    "Tom has 3 bags with 4 apples each. How many apples does he have?",
    "  Café naïve 😀 — ünïcödé and 中文 with leading spaces  ",
    "x",
    "word " * 400,  # longer than max_tokens: exercises truncation
)


def export_minilm_onnx(out_dir: str | Path, model_dir: str | Path | None = None, max_tokens: int = 256,
                       check: bool = True) -> dict[str, str]:
    """Write ``model.onnx`` and ``tokenizer.json`` into ``out_dir``; returns their names
    relative to it: ``{"onnx": "model.onnx", "tokenizer": "tokenizer.json"}``.

    Deterministic: the same model files and torch version give byte-identical output.
    Needs torch, transformers and the ``onnx`` package (the pipeline extra).
    """
    from router.featurizer import minilm_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never reach for a hub
    src = Path(model_dir or minilm_dir())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _export_graph(src, out / MODEL_FILE)
    shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
    if check:
        diff = check_parity(out / MODEL_FILE, out / TOKENIZER_FILE, src, max_tokens)
        log.info("onnx export: max abs diff vs sentence-transformers %.2e on %d probes", diff, len(PROBES))
    return {"onnx": MODEL_FILE, "tokenizer": TOKENIZER_FILE}


def _export_graph(src: Path, path: Path) -> None:
    import torch
    from transformers import AutoModel

    # eager attention exports as plain MatMul/Softmax, the pattern onnxruntime's attention
    # fusion recognizes (measured on one core: 8.8 ms vs 12.4 ms per short query for the SDPA export)
    model = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    # two rows, one padded: the trace must take the masked-attention path, not a shortcut
    # for unpadded batches
    ids = torch.tensor([[101, 2054, 2003, 2459, 102], [101, 2054, 102, 0, 0]], dtype=torch.int64)
    mask = (ids > 0).to(torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter: 3 s and only the `onnx` package, where torch.export's
        # (dynamo=True) takes ~20 s and needs onnxscript, for the same graph and parity;
        # the tracer's warnings are about shape branches that do not apply to BERT
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), (ids, mask, torch.zeros_like(ids)), str(path),
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def check_parity(model_path: Path, tokenizer_path: Path, src: Path, max_tokens: int = 256) -> float:
    """Max abs difference between the ONNX encoder and sentence-transformers on ``PROBES``;
    raises ``RuntimeError`` above ``PARITY_MAX_ABS``."""
    import numpy as np

    from router.featurizer import SentenceTransformerEncoder
    from router.onnx_encoder import OnnxEncoder

    texts = list(PROBES)
    ref = SentenceTransformerEncoder(src, max_tokens=max_tokens).encode(texts)
    got = OnnxEncoder(model_path, tokenizer_path, max_tokens=max_tokens, batch_size=3).encode(texts)
    diff = float(np.abs(ref - got).max())
    if not diff <= PARITY_MAX_ABS:
        raise RuntimeError(f"{model_path}: ONNX embeddings differ from sentence-transformers by {diff:.3g} "
                           f"(> {PARITY_MAX_ABS}); the export is wrong, do not ship it")
    return diff
