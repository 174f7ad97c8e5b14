#!/usr/bin/env bash
# Install difficulty-router into ./.venv (idempotent: a second run with unchanged
# pyproject.toml and constraints.txt does nothing).
#
#   bash scripts/setup.sh          # the pipeline: llama.cpp, the CPU model, training, MLflow, DVC
#   bash scripts/setup.sh --dev    # the pipeline plus the test tools and Ray (its tests run in CI)
#   bash scripts/setup.sh --runtime DIR   # only the embeddable router (base install) into DIR
#
# torch is installed first and pinned to its CPU build: left to itself, pip resolves
# `torch` to a multi-GB CUDA build. On a machine without the local torch wheel, set
# TORCH_INDEX_URL to PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS="pipeline"
TORCH_VERSION=2.13.0
RUNTIME_ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) EXTRAS="pipeline,dev,ray" ;;
    --runtime) RUNTIME_ONLY=1; VENV="${2:?--runtime needs a folder}"; shift ;;
    *) echo "setup.sh: unknown option $1 (use --dev or --runtime DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ -n "$RUNTIME_ONLY" ]; then
  "${PIP[@]}" install -q -c constraints.txt .
  exit 0
fi

STAMP="$VENV/.dr-installed"
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "setup.sh: $VENV is up to date ($EXTRAS)"
  exit 0
fi

"${PIP[@]}" install -q --upgrade pip
TORCH_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL"); fi
"${PIP[@]}" install "${TORCH_ARGS[@]}" "torch==$TORCH_VERSION"
# -c pins every transitive version to what the tests passed with (see constraints.txt)
"${PIP[@]}" install "${TORCH_ARGS[@]}" -c constraints.txt -e ".[$EXTRAS]"
echo "$WANT" > "$STAMP"
echo "setup.sh: installed difficulty-router[$EXTRAS] into $VENV"
