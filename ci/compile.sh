#!/usr/bin/env bash
# The compile step of the kernels and build jobs, in the builder image:
#   compile.sh objects   the kernel objects of $SELECTION's kernel group
#   compile.sh cell      one cell: its torch, the factory's build stage, the CPU smoke gate
# It stops itself (SIGINT, which the factory answers by keeping every finished object)
# after COMPILE_BUDGET_MIN minutes, leaving the job time to save the object cache.
# Exit 124 then means: re-run the job, it restores those objects and goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?usage: compile.sh objects|cell}"
: "${SELECTION:?set SELECTION to the selection of the matrix entry}"
budget="${COMPILE_BUDGET_MIN:-300}"
case "$mode" in
  objects) cmd=(python3 -m scripts.factory objects --matrix "$SELECTION") ;;
  cell) cmd=(bash ci/build-cell.sh) ;;
  *)
    echo "compile.sh: unknown mode $mode; valid: objects, cell" >&2
    exit 2
    ;;
esac
rc=0
timeout --signal=INT --kill-after=15m "${budget}m" bash ci/builder.sh "${cmd[@]}" || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "::warning::compile stopped at its ${budget} min budget; the finished kernel objects are saved: re-run this job to resume from them"
fi
exit "$rc"
