#!/usr/bin/env bash
# Run a command inside the builder image (docker/builder.Dockerfile, built by the job's
# "builder image" step and tagged $BUILDER_IMAGE). The checkout is mounted at its own
# path, so every job compiles kernel objects from the same absolute paths (nvcc names
# anonymous namespaces after them), and the object cache is the checkout's build/kernels,
# which actions/cache restores before and saves after.
set -euo pipefail
image="${BUILDER_IMAGE:?set BUILDER_IMAGE to the tag of the builder image}"
workspace="$(pwd)"
export FLASH_ATTN_OBJECT_CACHE="${FLASH_ATTN_OBJECT_CACHE:-$workspace/build/kernels}"
# the variables of the job that the scripts inside read (unset ones stay unset)
pass=(SELECTION CELL_ID FLASH_ATTN_OBJECT_CACHE FLASH_ATTN_TORCH_INDEX
  PIP_DISABLE_PIP_VERSION_CHECK CI GITHUB_ACTIONS)
env_args=()
for name in "${pass[@]}"; do
  env_args+=(-e "$name")
done
# --init: a signal from the time limit of the compile step reaches the factory, which keeps
# every finished object; the builder is disposable, so pip may write to its pythons
exec docker run --rm --init -v "$workspace:$workspace" -w "$workspace" \
  -e PIP_BREAK_SYSTEM_PACKAGES=1 "${env_args[@]}" "$image" "$@"
