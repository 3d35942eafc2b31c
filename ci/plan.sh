#!/usr/bin/env bash
# The plan job: the build matrix exactly as the factory emits it (`make matrix-json`),
# and the kernel groups (one compile job per CUDA toolchain and kernel set). Appends
# `matrix=<json>` and `kernels=<json>` to $GITHUB_OUTPUT (one line each). MATRIX (a
# workflow_dispatch input) is data: make and the factory read it from the environment,
# no command line carries it, and the factory checks it before anything is echoed.
#
#   MATRIX=release GITHUB_OUTPUT=/tmp/out bash ci/plan.sh     # the same, by hand
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MATRIX:?set MATRIX to a preset (release, ci) or a selection such as torch=2.14}"
: "${GITHUB_OUTPUT:?set GITHUB_OUTPUT to the file the outputs are appended to}"
PYTHON="${PYTHON:-python3}"

export MATRIX
matrix=$(make --no-print-directory -s matrix-json PYTHON="$PYTHON")
kernels=$("$PYTHON" -m scripts.factory kernel-groups --json)
cells=$("$PYTHON" -c 'import json, sys; print(len(json.loads(sys.argv[1])["include"]))' "$matrix")
groups=$("$PYTHON" -c 'import json, sys; print(len(json.loads(sys.argv[1])["include"]))' "$kernels")

# GitHub Actions runs at most 256 jobs from one matrix
if [ "$cells" -gt 256 ]; then
  echo "::error::MATRIX=$MATRIX has $cells cells; one GitHub Actions matrix holds at most 256"
  exit 1
fi
{
  echo "matrix=$matrix"
  echo "kernels=$kernels"
} >>"$GITHUB_OUTPUT"
echo "MATRIX=$MATRIX: $cells cells in $groups kernel groups"
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  {
    echo "### MATRIX=$MATRIX: $cells cells, $groups kernel groups"
    "$PYTHON" -m scripts.factory kernel-groups | sed 's/^/- /'
  } >>"$GITHUB_STEP_SUMMARY"
fi
