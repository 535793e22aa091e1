# One image for the API (the default command) and the retraining job (multvae-trainer).
# No `# syntax=` line: the builder's own Dockerfile frontend is used, so building pulls no
# frontend image from a registry (only the base image and the package indexes are needed).
#
#   CPU (default):  DOCKER_BUILDKIT=1 docker build -t multvae-rec .
#   CUDA:           DOCKER_BUILDKIT=1 docker build -t multvae-rec:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   pip settings:   deploy/build-image.sh hands this machine's pip configuration (a pip.conf,
#                   a CA bundle for an inspecting proxy) to the build as BuildKit secrets
#                   `pip.conf` and `pip-cert`, which never reach an image layer; with the
#                   legacy builder it strips the secret mounts (deploy/README.md).
#
# The two install steps marked "same as CI" are the ones deploy/ci-setup.sh runs, word for
# word (tests/deploy/test_deploy_files.py compares them), so CI proves them on every run.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the dependencies, then the project ----------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Read only when the `pip.conf` secret is given (pip skips a missing configuration file).
ENV PIP_CONFIG_FILE=/run/secrets/pip.conf \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# CUDA base images ship no Python; the slim Python image does, and skips this.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependency layers first: they change rarely and take minutes; source edits reuse them.
# same as CI (1/2): torch from its own index (CPU wheels by default, no CUDA libraries; an
# empty TORCH_INDEX_URL uses pip's configured indexes, as CI does).
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    python -m pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}
# The other dependencies, from pyproject.toml alone: empty packages stand in for the source.
# With the faiss extra (faiss-cpu, ~66 MB installed), so that MULTVAE_TOPN_INDEX=faiss works
# in the image (docs/serving.md, "Large catalogues").
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    mkdir multvae training service \
    && touch multvae/__init__.py training/__init__.py service/__init__.py \
    && python -m pip install ".[faiss]" \
    && python -m pip uninstall -y multvae-rec \
    && rm -rf multvae training service build ./*.egg-info

# same as CI (2/2): the project itself (its dependencies are already satisfied above).
COPY multvae ./multvae
COPY multvae_cli ./multvae_cli
COPY training ./training
COPY service ./service
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    python -m pip install ".[faiss]" && rm -rf build

# ---- runtime: the virtualenv, a non-root user, nothing else ---------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 multvae \
    && useradd --system --uid 10001 --gid multvae --home-dir /home/multvae --create-home \
       --shell /usr/sbin/nologin multvae \
    && mkdir -p /models /data \
    && chown multvae:multvae /models /data
COPY --from=build /opt/venv /opt/venv
# Mode 0755 is in the repository (COPY --chmod is BuildKit only).
COPY deploy/entrypoint-trainer.sh /usr/local/bin/multvae-trainer
COPY deploy/entrypoint-api.sh /usr/local/bin/multvae-api

# No VOLUME: it would give every container anonymous volumes that `down -v` never removes.
# A fresh named volume mounted on /models or /data takes this ownership, so the non-root
# user can write into it without an init container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MULTVAE_MODEL_DIR=/models
WORKDIR /home/multvae
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8000

# Readiness, not liveness: "healthy" means a model is loaded and requests are answered.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

# One uvicorn worker per container: scale with replicas, so that each process's Prometheus
# metrics are scraped on their own. Exec form, no shell: `multvae serve` gets SIGTERM itself,
# as PID 1 (plain docker run, Kubernetes) or from the init process (compose's `init: true`);
# uvicorn stops accepting, finishes in-flight requests (up to 10 s; any still running then is
# answered 503), and the process exits 0.
STOPSIGNAL SIGTERM
CMD ["multvae", "serve", "--host", "0.0.0.0", "--port", "8000"]
