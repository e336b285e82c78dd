# vlforge: the flows, `vlforge serve`, and the Ray head/worker nodes (same Python, Ray and code everywhere,
# which Ray requires of a driver and its cluster).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/vlforge/.cache/huggingface \
    RAY_TRAIN_V2_ENABLED=1 \
    NO_ALBUMENTATIONS_UPDATE=1

# libgomp for torch/faiss CPU kernels; tini reaps the Ray and flow-run subprocesses.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/*

# torch first, pinned, from the PyTorch CPU index: letting pip resolve torch from PyPI pulls GBs of CUDA wheels.
# A GPU image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# setup.py and vlforge_build.py: the build installs models, tasks and flows as vlforge.models, vlforge.tasks and
# vlforge.flows (docs/operations.md "Installing vlforge"), so the flows, Ray workers and consumers share one name.
COPY pyproject.toml README.md setup.py vlforge_build.py ./
COPY vlforge ./vlforge
COPY models ./models
COPY tasks ./tasks
COPY flows ./flows
RUN pip install . && pip uninstall -y dataclasses  # img2dataset's py3.6 backport shadows the stdlib

COPY infra/vlforge/entrypoint.sh /usr/local/bin/vlforge-entrypoint
COPY infra/ray/healthcheck.sh /usr/local/bin/ray-healthcheck
RUN chmod 0755 /usr/local/bin/vlforge-entrypoint /usr/local/bin/ray-healthcheck \
 && useradd --create-home --uid 1000 vlforge
USER vlforge
WORKDIR /home/vlforge

ENTRYPOINT ["tini", "--", "vlforge-entrypoint"]
CMD ["vlforge", "serve"]
