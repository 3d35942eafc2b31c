#!/usr/bin/env bash
# cibuildwheel before-build and before-test: the variant's torch (from the index that
# carries its CUDA build) and the build requirements, into the python on PATH (the build
# interpreter, or the test venv). The wheel is built without isolation against this torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FACTORY_PYTHON:?}" "${FLASH_ATTN_MATRIX:?}"
mapfile -t torch_args < <("$FACTORY_PYTHON" -m scripts.factory torch-args --matrix "$FLASH_ATTN_MATRIX")
python -m pip install "setuptools>=64" wheel ninja
python -m pip install "${torch_args[@]}"
