"""Backends by name. Each is imported only when chosen, so heavy engines stay optional."""

from __future__ import annotations

import importlib

from pipelines.backends.base import (  # noqa: F401  (re-exported: the interface)
    Backend,
    ForcedAnswer,
    OnePassRequest,
    OnePassResult,
    RolloutError,
    SampleResult,
    SamplingConfig,
)

BACKENDS = {
    "llamacpp": "pipelines.backends.llamacpp:LlamaCppBackend",
    "vllm": "pipelines.backends.vllm:VllmBackend",
    "openai": "pipelines.backends.openai_http:OpenAIBackend",
}


def backend_class(name: str):
    """Import and return the backend class registered as ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, _, obj = BACKENDS[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RolloutError(
            f"backend {name!r} needs an optional dependency that is not installed ({e}); "
            f"see README 'Install' for the extra that provides it"
        ) from e
    return getattr(mod, obj)


def load_backend(model_id: str, config) -> Backend:
    """Instantiate the backend for a model declared in params (a ``ModelConfig``)."""
    return backend_class(config.backend)(model_id, config)
