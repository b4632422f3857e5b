# syntax=docker/dockerfile:1
# The gateway image: `resnet-serve serve` with the embedded ONNX Runtime backend (or in
# front of Triton: RESNET_SERVE_BACKEND=triton). No torch, no export code: principle 3.
#
#   docker build -t resnet-serving:0.1.0 .                        # CPU (the default target)
#   docker build --target gpu -t resnet-serving:0.1.0-gpu .       # onnxruntime-gpu, CUDA 13
#   docker build --build-arg OPENVINO=1 -t resnet-serving:0.1.0 . # with OpenVINO (ENGINE)
#   docker run --read-only --tmpfs /tmp -p 8000:8000 -p 50051:50051 \
#       -v "$PWD/model_repository:/models:ro" resnet-serving:0.1.0
#
# Runs as uid/gid 10001, writes nothing outside /tmp (HOME and TMPDIR point there), so
# it runs with a read-only root filesystem and a /tmp emptyDir (the Helm chart does this).
# Settings: every RESNET_SERVE_* variable (docs/operations.md, Settings).

# Pin a digest for reproducible builds, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.17-slim-bookworm` prints it). The builder
# and the runtime must share it: the venv's python is a link to the base's interpreter.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# --- builder: a venv with the project's `service` extra, nothing else ---------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Non-empty (OPENVINO=1): the `openvino` extra too, the embedded backend's second engine
# (RESNET_SERVE_ENGINE=openvino or auto; about 180 MB). Empty, the default: ONNX Runtime only.
ARG OPENVINO=
WORKDIR /src
# What setuptools needs to build the wheel: the metadata, the readme it embeds, and the
# gateway package (package discovery takes the `service*` packages that are present; the
# export half is left out, so the `resnet-export` script it declares is removed below).
COPY pyproject.toml README.md ./
# pip's settings (index, CA bundle) may come in as the build secrets pip.conf and
# pip-ca.crt (deploy/image.sh passes the build machine's): mounted while pip runs, in no
# layer. Without them pip uses its defaults.
# Wheels only: no compiler in the image, and a dependency without a wheel fails the build
# here, not at run time. The dependencies get their own layer (built against an empty
# `service` package), so a change to the code does not download them again.
# The placeholder package and setuptools' build/ and *.egg-info go with that layer: COPY
# keeps the sources' mtimes, and a build/ copy newer than them would be installed in their
# place (it once shipped the placeholder's empty __init__.py).
# DL3013 (pin versions in pip): ".[service]" is this project; the versions are
# pyproject.toml's (the same file `make setup` installs from), not repeated here.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    mkdir service && touch service/__init__.py \
    && pip install --only-binary=:all: ".[service${OPENVINO:+,openvino}]" \
    && pip uninstall --yes resnet-serving \
    && rm -r service build ./*.egg-info
COPY service/ service/
# Then prove it: the package installed is byte for byte the one copied in (type stubs,
# which the wheel leaves out, aside).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    pip install --only-binary=:all: --no-deps . \
    && rm -r build ./*.egg-info /opt/venv/bin/resnet-export \
    && pip check \
    && diff -r --exclude=__pycache__ --exclude='*.pyi' service \
        "$(python -I -c "print(__import__('service').__path__[0])")"

# --- builder-gpu: the same venv with onnxruntime-gpu in place of onnxruntime --------------
FROM builder AS builder-gpu
# Same release as the onnxruntime pinned in pyproject.toml (a test checks). Its `cuda` and
# `cudnn` extras bring CUDA 13 and cuDNN 9 as nvidia-* wheels, which the backend loads
# with onnxruntime.preload_dlls(): no CUDA base image needed, only the host's driver
# (>= 580 for CUDA 13) through the NVIDIA container toolkit. Uninstall first: both
# packages own the `onnxruntime` module.
ARG ORT_GPU_VERSION=1.31.1
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/run/secrets/pip-ca.crt \
    pip uninstall --yes onnxruntime \
    && pip install --only-binary=:all: "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}" \
    && pip check

# --- runtime: the base image, a user, the venv ---------------------------------------------
# (Not a target of its own: it has no venv. Build `cpu` or `gpu`.)
FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="resnet-serving" \
      org.opencontainers.image.description="Batching REST/gRPC gateway for ResNet classifiers (ONNX Runtime or Triton backend)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# A named user for tools that look the uid up (ps, getpass); numeric USER below, so
# Kubernetes' runAsNonRoot can verify it without reading /etc/passwd. /models is where
# the model repository is mounted (read-only is enough).
RUN groupadd --system --gid 10001 resnet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin resnet \
    && mkdir /models
# ORT_DISABLE_TELEMETRY: ONNX Runtime 1.31 on Linux otherwise writes a device id and an
# event cache under $HOME/.cache and uploads usage events to Microsoft (its 1DS telemetry);
# set before it loads, this turns all of that off.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    ORT_DISABLE_TELEMETRY=1 \
    RESNET_SERVE_REPOSITORY=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_GRPC_PORT=50051
USER 10001:10001
# REST (and KServe v2 over HTTP, /metrics), gRPC (Classifier, KServe v2, health).
EXPOSE 8000 50051
# Liveness without curl: the venv's python asks /healthz on the configured port (exit 1 on
# a refused connection, a timeout or a non-2xx answer). Kubernetes ignores HEALTHCHECK and
# uses the chart's probes (/healthz, /readyz) instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=4)"]
# PID 1 is the gateway itself: SIGTERM drains (RESNET_SERVE_DRAIN_SECONDS), then exits 0.
ENTRYPOINT ["resnet-serve"]
CMD ["serve"]

# --- gpu: `docker build --target gpu` ------------------------------------------------------
FROM runtime AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv
# CUDA first; a provider that does not start stops the gateway (no silent CPU fallback).
# The toolkit mounts the driver's compute libraries only when asked for them.
ENV RESNET_SERVE_ORT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- cpu: the default target (last stage) --------------------------------------------------
FROM runtime AS cpu
COPY --from=builder /opt/venv /opt/venv
