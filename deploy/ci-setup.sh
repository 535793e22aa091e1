#!/bin/sh
# What CI installs before the tests (called from .ci/run; run as root on Debian bookworm).
#
#   PYTHON=/path/to/venv/bin/python deploy/ci-setup.sh
#
# 1. Debian tools the deploy checks run: docker-compose (`docker-compose config -q` on
#    docker-compose.yml), prometheus (`promtool check config|rules`), and for the live smoke
#    test (deploy/smoke-test.sh) a Docker engine (docker.io) and mmdebstrap (the stand-in
#    base images). With CI=true those checks fail rather than skip when a tool is missing.
# 2. The image's two install steps, word for word as in the Dockerfile's "same as CI" lines
#    (tests/deploy/test_deploy_files.py checks that they match), so CI proves what the image
#    build runs: torch from its CPU index first, then the project with its faiss extra.
# 3. CI only: the test tools, and the tree installed editable so tests import the sources.
set -eu

TORCH_VERSION=2.13.0
# The image's default; .ci/run sets it empty: CI machines reach only PyPI-style registries,
# and their pip is configured with the CPU wheel, so pip's own configuration is used there.
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
PYTHON="${PYTHON:-python3}"

if [ "${SKIP_APT:-0}" != 1 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        docker-compose prometheus docker.io mmdebstrap
fi

"$PYTHON" -m pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}
"$PYTHON" -m pip install ".[faiss]"

"$PYTHON" -m pip install -e ".[dev]"
