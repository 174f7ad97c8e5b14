"""Backends by name. Each is imported only when chosen, so heavy engines stay optional."""

from __future__ import annotations

# the interface, re-exported
from pipelines.backends.base import Backend, ForcedAnswer, OnePassRequest, OnePassResult  # noqa: F401
from pipelines.backends.base import RolloutError, SampleResult, SamplingConfig  # noqa: F401
from router.registry import Registry

BACKENDS = Registry(
    "backend",
    {
        "llamacpp": "pipelines.backends.llamacpp:LlamaCppBackend",
        "vllm": "pipelines.backends.vllm:VllmBackend",
        "openai": "pipelines.backends.openai_http:OpenAIBackend",
    },
    missing_hint="see README 'Install' for the extra that provides it",
)


def backend_class(name: str):
    """Import and return the backend class registered as ``name``.

    ValueError for an unknown name (listing the valid ones); RolloutError naming the missing
    optional dependency if the backend's module cannot be imported.
    """
    BACKENDS.check(name)
    try:
        return BACKENDS.get(name)
    except ImportError as e:
        raise RolloutError(str(e)) from e


def load_backend(model_id: str, config) -> Backend:
    """Instantiate the backend for a model declared in params (a ``ModelConfig``)."""
    return backend_class(config.backend)(model_id, config)
