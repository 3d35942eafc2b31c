#!/usr/bin/env bash
# cibuildwheel before-all, once per container: the CUDA compiler of the variant
# (FLASH_ATTN_MATRIX) from the package index, every component pinned to its release,
# linked at /opt/flash-attn-cuda/home (the CUDA_HOME of [tool.cibuildwheel.environment]).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FACTORY_PYTHON:?}" "${FLASH_ATTN_MATRIX:?}"
"$FACTORY_PYTHON" -m scripts.factory cibw-cuda --matrix "$FLASH_ATTN_MATRIX" \
  --prefix /opt/flash-attn-cuda --python "$FACTORY_PYTHON"
