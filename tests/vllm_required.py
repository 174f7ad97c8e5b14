"""The guard of the vLLM test modules: skipped where vLLM is missing, a failure under CI's DR_REQUIRE_VLLM=1."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def require(*modules: str, test_file: str) -> None:
    """Skip the calling test module unless ``modules`` import; with ``DR_REQUIRE_VLLM`` set (CI's vLLM
    step) raise instead, so a missing vLLM is a failure there, never a skip. Call at module level."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    what = " and ".join(missing) + (" is" if len(missing) == 1 else " are")
    if os.environ.get("DR_REQUIRE_VLLM"):
        raise ImportError(
            f"DR_REQUIRE_VLLM is set but {what} not importable in this interpreter "
            f"({sys.executable}); run scripts/install_vllm_cpu.sh and use .venv-vllm/bin/python"
        )
    pytest.skip(f"{what} not installed here: bash scripts/install_vllm_cpu.sh && "
                f".venv-vllm/bin/python -m pytest -m vllm {test_file}", allow_module_level=True)
