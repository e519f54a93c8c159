# ferry: KServe predictor image. The model is not in the image: KServe's storage-initializer puts
# the converted CTranslate2 model at /mnt/models (storageUri / STORAGE_URI), where ferry reads it.
#
#   CPU:  docker build -t ferry:0.1.0 .
#   GPU:  docker build --build-arg VARIANT=cuda -t ferry:0.1.0-cuda .
#
# The CUDA variant adds CUDA 12 cuBLAS and cuDNN 9 from PyPI (what the CTranslate2 wheel links
# against) to the same slim Python base; the NVIDIA driver comes from the node through the NVIDIA
# container runtime (GPU operator). BASE_IMAGE must provide Python 3.11 at /usr/local/bin
# (the venv is built in the same base and copied across).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ferry
WORKDIR /src
COPY pyproject.toml README.md ./
COPY predictor ./predictor
RUN /opt/ferry/bin/pip install --no-cache-dir . \
    && if [ "$VARIANT" = "cuda" ]; then \
         /opt/ferry/bin/pip install --no-cache-dir \
           nvidia-cublas-cu12==12.4.5.8 nvidia-cudnn-cu12==9.1.0.70; \
       elif [ "$VARIANT" != "cpu" ]; then \
         echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1; \
       fi \
    && /opt/ferry/bin/python -m compileall -q /opt/ferry/lib

FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="OPT on CTranslate2 behind an async batcher, as a KServe predictor" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ferry.variant="${VARIANT}"
RUN groupadd --system --gid 10001 ferry \
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
# REST (V1, V2, /generate, /metrics) and gRPC (V2): KServe's defaults
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "predictor"]
