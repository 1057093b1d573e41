#!/bin/sh
# Install berrylm into a fresh virtual environment: the Dockerfile runs this, and so does the test that checks
# the image's install and start steps without Docker (tests/test_deploy.py). The Dockerfile sets
# PIP_NO_CACHE_DIR=1 so the image keeps no pip cache.
#   deploy/install.sh VENV [torch|onnx]
# torch (default): CPU torch + berrylm. onnx: the same plus onnxruntime, and the embedded model (BERRY_EXPORT,
# default berry-chat) exported to ONNX in $VENV/share/berrylm/NAME; `onnx`, needed only to write the export,
# is removed again. The engine (KV pool, sampler) is torch code, so torch stays in both.
# The image carries no torch C++ headers or test programs (removed below; tests/test_deploy.py serves without them).
# TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) selects where the CPU-only torch wheel comes from;
# empty uses pip's configured indexes. TORCH, ONNXRUNTIME and ONNX pin the builds.
set -eu
VENV="$1"
TARGET="${2:-torch}"
TORCH="${TORCH:-torch==2.13.0}"
ONNXRUNTIME="${ONNXRUNTIME:-onnxruntime==1.32.0}"
ONNX="${ONNX:-onnx==1.23.2}"
case "$TARGET" in
    torch|onnx) ;;
    *) echo "install.sh: unknown target '$TARGET' (torch or onnx)" >&2; exit 2 ;;
esac
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --disable-pip-version-check -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
    "$PIP" install -q --index-url "$TORCH_INDEX" "$TORCH"
else
    "$PIP" install -q "$TORCH"
fi
"$PIP" install -q .
# torch's wheel carries C++ headers, CMake files, its own C++ test programs and protoc (~190 MB on x86-64):
# nothing `berry serve` or `berry export` runs (no torch.compile, no C++ extensions). torch_shm_manager stays.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$SITE/torch/include" "$SITE/torch/share" "$SITE/torch/test"
find "$SITE/torch/bin" -type f ! -name torch_shm_manager -delete
if [ "$TARGET" = "onnx" ]; then
    "$PIP" install -q "$ONNXRUNTIME" "$ONNX"
    MODEL="${BERRY_EXPORT:-berry-chat}"
    "$VENV/bin/berry" export "$MODEL" --to onnx --out "$VENV/share/berrylm/$(basename "$MODEL")"
    "$PIP" uninstall -q -y onnx
fi
