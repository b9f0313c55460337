# dgserve: the model server, with the pinned CUDA-enabled torch (the same image runs on CPU).
#
#   docker build -t dgserve .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v dgserve-data:/data dgserve
#
# The PyPI torch wheels bundle their CUDA libraries, so no CUDA base image is needed: the
# host's NVIDIA driver is mounted in by the NVIDIA container toolkit (`--gpus` / compose's
# GPU reservation). Layers go from least to most often changed: system packages, the
# Python dependencies (read from pyproject.toml alone, ~3 GB), then the code, then the
# bundled model store. Editing app/ rebuilds only the last small layers.
#
# Without a registry, build on a local base that has python3 (>= 3.11) with venv, and curl:
#   podman build --format docker --from localhost/dgserve-base:bookworm ...
# (see scripts/container_test.sh; `--from` replaces the FROM below).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# curl for the HEALTHCHECK (the local base has it already; python:*-slim does not).
RUN if ! command -v curl >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 dgserve \
    && useradd --system --uid 10001 --gid dgserve --home-dir /opt/dgserve --shell /usr/sbin/nologin dgserve \
    && python3 -m venv "$VIRTUAL_ENV" \
    && mkdir -p /opt/dgserve /data \
    && chown dgserve:dgserve /data

WORKDIR /opt/dgserve

# Dependencies only: this layer is rebuilt when pyproject.toml changes, not when the code does.
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies'] + d['project']['optional-dependencies']['grpc'] + d['build-system']['requires']))" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install --upgrade pip \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself, without touching the dependencies installed above.
COPY README.md ./
COPY app/ ./app/
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build *.egg-info \
    && python -c "import dgserve, torch; print('dgserve', dgserve.__file__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# The bundled store. Mount another store over /opt/dgserve/model_store (read-only is fine),
# or point DGSERVE_MODEL_STORE elsewhere, to serve different models without a rebuild.
COPY model_store/ ./model_store/

# 0.0.0.0 inside the container's own network namespace: loopback there is unreachable
# from the host's published port and from a pod's probes. Who can reach the server is
# decided where the port is published (compose: 127.0.0.1 unless DGSERVE_BIND_ADDRESS
# says otherwise) and by DGSERVE_API_KEYS.
ENV DGSERVE_HOST=0.0.0.0 \
    DGSERVE_PORT=8000 \
    DGSERVE_GRPC_PORT=8001 \
    DGSERVE_MODEL_STORE=/opt/dgserve/model_store \
    DGSERVE_DATA_DIR=/data \
    DGSERVE_DEVICES=auto \
    DGSERVE_INSTANCES_PER_DEVICE=1

# The inspection store (SQLite): keep it on a volume so records outlive the container.
VOLUME ["/data"]
USER dgserve:dgserve
# HTTP (/v1, the Open Inference Protocol's /v2, probes, metrics) and the OIP gRPC service.
EXPOSE 8000 8001

# Ready = every model in the store loaded (liveness alone is /healthz). The start period
# covers loading the models onto the device.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${DGSERVE_PORT}/readyz" >/dev/null || exit 1

ENTRYPOINT ["dgserve"]
CMD ["serve"]
