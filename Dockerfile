# The harness image: workers, and (same image) the MLflow server, optuna-dashboard and the bucket job.
# GPU hosts: the default PyTorch index gives the CUDA build (the driver comes from the host through
# the NVIDIA container toolkit). CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MOE_HARNESS_DATA=/data \
    MOE_HARNESS_CACHE=/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index that matches the hardware; pyproject's "torch>=..." is then satisfied.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY harness ./harness
COPY models ./models
COPY studies ./studies
COPY docker ./docker
# boto3: MLflow's S3 artifact client; optuna-dashboard: the dashboard service.
RUN pip install . boto3 optuna-dashboard

RUN useradd --uid 10001 --create-home harness \
    && mkdir -p /data /cache /checkpoints \
    && chown harness:harness /cache /checkpoints
USER harness

ENTRYPOINT []
CMD ["harness", "--help"]
