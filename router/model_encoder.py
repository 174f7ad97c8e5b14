"""The serving model's own view of a query: its hidden state on the rendered prompt.

Probing work reports that a model's hidden state on a question predicts whether that model will
solve it better than a text embedding does, because it reflects what the model itself finds
hard. ``featurize.embedding: model:<name>`` uses the hidden state of the last prompt token (the
one that predicts the first generated token; mean pooling measured nearly the same vector on
these short prompts) of model ``<name>``'s GGUF through llama-cpp-python, on the prompt exactly
as execution renders it (``router.execution.ModelExecution.prompt``: template, system prompt).
L2-normalised, like MiniLM's. Training and serving call this one class, so features agree.

At serving time the engine prefills the same prompt to answer, so an engine that exposed its
hidden state would give the feature for free; through this separate llama.cpp context it costs
one prefill of the prompt on the router's CPU (measured in the README, "Model-state features").
"""

from __future__ import annotations

import os
from typing import Any

from router.featurizer import Encoder


class ModelEncoder(Encoder):
    """Last-token hidden state of a GGUF model on the rendered prompt (llama.cpp, CPU)."""

    def __init__(self, model: dict[str, Any] | None = None, max_tokens: int = 1024, n_threads: int | None = None,
                 batch_size: int = 64, **_: Any):
        try:
            import llama_cpp
        except ImportError as e:  # the serving side needs it only for this embedding
            raise ImportError("model-state features need llama-cpp-python (pip install llama-cpp-python)") from e
        from router.execution import ModelExecution
        from router.model_files import resolve_model_path

        if not model or not model.get("path"):
            raise ValueError("a model-state featurizer needs the model's path (featurizer spec `model.path`)")
        self.execution = ModelExecution(template=str(model.get("template", "raw")),
                                        system_prompt=str(model.get("system_prompt", "")))
        self.max_tokens = int(max_tokens)
        self.llm = llama_cpp.Llama(
            model_path=str(resolve_model_path(str(model["path"]))), embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=self.max_tokens, n_batch=self.max_tokens,
            n_ubatch=self.max_tokens, n_threads=n_threads or os.cpu_count() or 1, verbose=False)
        self.dim = int(self.llm.n_embd())

    def prompt(self, text: str) -> str:
        """The prompt the model sees for ``text`` (what execution sends)."""
        return self.execution.prompt(text)

    def _encode(self, texts: list[str], out) -> None:
        import numpy as np

        for i, text in enumerate(texts):
            # embed() prefills the prompt in one batch of at most max_tokens (longer prompts are
            # cut there; featurize.max_chars keeps questions well below it) and pools the last token
            vec = np.asarray(self.llm.embed(self.prompt(text), normalize=False, truncate=True),
                             dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(vec))
            out[i] = vec / norm if norm > 0 else vec
