#!/usr/bin/env bash
# cibuildwheel before-all, once per container: the CUDA compiler of the variant
# (FLASH_ATTN_MATRIX) from the package index, every component pinned to its release,
# linked at /opt/flash-attn-cuda/home (the CUDA_HOME of [tool.cibuildwheel.environment]),
# and the variant's build request next to it.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${FACTORY_PYTHON:?}" "${FLASH_ATTN_MATRIX:?}"
"$FACTORY_PYTHON" -m scripts.factory cibw-cuda --matrix "$FLASH_ATTN_MATRIX" \
  --prefix /opt/flash-attn-cuda --python "$FACTORY_PYTHON"
# what every build of the variant makes: its BuildRequest (FLASH_ATTN_BUILD_REQUEST)
"$FACTORY_PYTHON" -m scripts.factory build-request --matrix "$FLASH_ATTN_MATRIX" \
  --out /opt/flash-attn-cuda/build_request.json
