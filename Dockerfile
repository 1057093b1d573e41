# berrylm: serve the embedded model (or a mounted one) over the OpenAI API on a small x86-64 or arm64 box.
#   docker build -t berrylm .                          PyTorch backend (the default target)
#   docker build --target onnx -t berrylm:onnx .       onnxruntime backend, serving the embedded model's ONNX export
#   docker run -p 8000:8000 berrylm
# The base image exists for linux/amd64 and linux/arm64; torch comes from the CPU-only wheel index (both arches).
# The onnx target is NOT torch-free: the engine's KV pool and sampler are torch code; it adds onnxruntime.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# CPU-only torch wheels (x86-64 and arm64); override with --build-arg TORCH_INDEX= to use pip's own index
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY deploy/ deploy/
COPY berrylm/ berrylm/
RUN TORCH_INDEX="${TORCH_INDEX}" sh deploy/install.sh /opt/venv \
    && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

# what both targets run: a non-root user, /models for mounted models, the health check
FROM ${PYTHON_IMAGE} AS base
RUN useradd --create-home --uid 10001 --user-group berry && mkdir /models && chown 10001:10001 /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Mount models at /models and select one: -v $PWD/my-ckpt:/models/my-ckpt -e BERRY_MODEL=/models/my-ckpt
# Require a key: -e BERRY_API_KEY=secret
VOLUME ["/models"]
WORKDIR /home/berry
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# onnxruntime backend: the same venv (torch already there) plus onnxruntime and the embedded model's ONNX export.
# A mounted model must be an ONNX export too (berry export CKPT --to onnx --out DIR).
FROM build AS build-onnx
ARG BERRY_EXPORT=berry-chat
RUN BERRY_EXPORT="${BERRY_EXPORT}" sh deploy/install.sh /opt/venv onnx \
    && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

FROM base AS onnx
ARG BERRY_EXPORT=berry-chat
COPY --from=build-onnx /opt/venv /opt/venv
ENV BERRY_MODEL=/opt/venv/share/berrylm/${BERRY_EXPORT}
USER 10001:10001
ENTRYPOINT ["berry", "serve", "--host", "0.0.0.0", "--port", "8000", "--backend", "onnx"]

# the default target: PyTorch backend
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
ENV BERRY_MODEL=berry-chat
USER 10001:10001
ENTRYPOINT ["berry", "serve", "--host", "0.0.0.0", "--port", "8000"]
