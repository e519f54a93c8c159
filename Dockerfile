# ferry: KServe predictor image. The model is not in the image: KServe's storage-initializer puts
# the converted CTranslate2 model at /mnt/models (storageUri / STORAGE_URI), where ferry reads it.
#
#   make image        CPU image;  make image-cuda   the CUDA variant;  make image-test   run it as a pod
#
# Both need the wheelhouse first (`make wheelhouse`, done by `make image`): the build has no network
# for Python packages. Every package comes from wheelhouse/<variant>/ (made on the host with
# `pip download --require-hashes` from the lock files in deploy/image/) and is installed with
# --no-index --require-hashes, so the build is offline and reproducible.
#
# BASE_IMAGE: any Debian bookworm image. python:3.11-slim-bookworm (the default) brings Python at
# /usr/local/bin; a bare bookworm base (what `make image` builds with debootstrap when no registry
# can be reached) gets Debian's python3 (3.11) from apt. Either way the venv is built in the same
# base it runs in.
#
# The CUDA variant adds CUDA 12 cuBLAS and cuDNN 9 from PyPI wheels (what the CTranslate2 wheel loads)
# to the same base; the NVIDIA driver comes from the node through the NVIDIA container runtime.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# Debian's python3 is the one bookworm ships (3.11.2): pinning its exact version would break the
# build at every point release.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/ferry
COPY deploy/image/*.lock /wheels/
COPY wheelhouse/${VARIANT}/ /wheels/
# Dependencies first (their layer survives changes to predictor/), then ferry itself.
RUN case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1;; esac \
    && pip="/opt/ferry/bin/pip install --no-index --find-links /wheels --require-hashes" \
    && $pip -r /wheels/build-requirements.lock \
    && $pip --no-build-isolation -r /wheels/requirements.lock \
    && if [ "$VARIANT" = "cuda" ]; then $pip --no-deps -r /wheels/cuda-requirements.lock; fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY predictor ./predictor
RUN /opt/ferry/bin/pip install --no-index --no-deps --no-build-isolation . \
    && /opt/ferry/bin/pip check \
    && /opt/ferry/bin/python -m compileall -q /opt/ferry/lib

FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="OPT on CTranslate2 behind an async batcher, as a KServe predictor" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ferry.variant="${VARIANT}"
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ferry
COPY --from=build /opt/ferry /opt/ferry
ENV PATH=/opt/ferry/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FERRY_MODEL_DIR=/mnt/models \
    LD_LIBRARY_PATH=/opt/ferry/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/ferry/lib/python3.11/site-packages/nvidia/cudnn/lib
WORKDIR /opt/ferry
USER 10001:10001
# REST (V1, V2, /generate, /openai, /metrics) and gRPC (V2): KServe's defaults
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "predictor"]
