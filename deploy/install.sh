#!/bin/sh
# Install berrylm into a fresh virtual environment: the Dockerfile runs this, and so does the test that checks
# the image's install and start steps without Docker (tests/test_deploy.py). The Dockerfile sets
# PIP_NO_CACHE_DIR=1 so the image keeps no pip cache.
#   deploy/install.sh VENV [onnx]
# TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) selects where the CPU-only torch wheel comes from;
# empty uses pip's configured indexes. TORCH pins the build.
set -eu
VENV="$1"
TARGET="${2:-torch}"
TORCH="${TORCH:-torch==2.13.0}"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --disable-pip-version-check -q --upgrade pip
if [ "$TARGET" = "torch" ]; then
    if [ -n "${TORCH_INDEX:-}" ]; then
        "$PIP" install -q --index-url "$TORCH_INDEX" "$TORCH"
    else
        "$PIP" install -q "$TORCH"
    fi
fi
"$PIP" install -q .
