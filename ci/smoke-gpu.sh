#!/usr/bin/env bash
# The smoke-gpu job on a self-hosted GPU runner: the cell's torch into the cell's
# interpreter (CELL_PYTHON_EXE), then the whole smoke gate in a fresh venv of it, the
# GPU numerics required (a runner that shows no GPU fails the gate). A passing wheel
# gets <wheel>.smoke.json next to it, which is all the publish job trusts.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SELECTION:?}" "${CELL_PYTHON_EXE:?}"
factory="${FACTORY_PYTHON:-python3}"
wheelhouse="${1:-wheelhouse}"
wheels=("$wheelhouse"/*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "::error::expected one wheel in $wheelhouse, found: ${wheels[*]}"
  exit 1
fi
"$factory" -m pip install --quiet -r recipes/factory-requirements.txt
mapfile -t torch_args < <("$factory" -m scripts.factory torch-args --matrix "$SELECTION")
"$CELL_PYTHON_EXE" -m pip install --quiet "${torch_args[@]}"
# FLASH_ATTN_SMOKE_REQUIRE_GPU=0: only for a replay without a GPU runner
# (tools/workflow_local.py); the record then says the GPU part was skipped
gpu=(--require-gpu)
if [ "${FLASH_ATTN_SMOKE_REQUIRE_GPU:-1}" = 0 ]; then gpu=(); fi
"$factory" -m scripts.factory smoke-wheel --matrix "$SELECTION" --python "$CELL_PYTHON_EXE" \
  "${gpu[@]}" --record "${wheels[0]}"
