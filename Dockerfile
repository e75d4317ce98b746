# Osprey serving the example models.
#   CPU (default):  docker build -t osprey .
#   CUDA:           docker build -t osprey:cuda \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                     --build-arg TORCH_SPEC="" .
#   (the CUDA base image already carries torch; TORCH_SPEC="" keeps it)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/osprey

RUN if [ -n "$TORCH_SPEC" ]; then pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; fi

COPY pyproject.toml README.md ./
COPY server ./server
COPY handlers ./handlers
COPY monitoring ./monitoring
COPY protos ./protos
COPY examples ./examples
RUN pip install . && osprey examples --out /srv/osprey/model_store

COPY deploy/config.properties /etc/osprey/config.properties

RUN useradd --system --home /srv/osprey osprey && chown -R osprey /srv/osprey
USER osprey

EXPOSE 8080 8081 8082 7070 7071
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready').status == 200 else 1)"

CMD ["osprey", "serve", "--foreground", "--ts-config", "/etc/osprey/config.properties"]
