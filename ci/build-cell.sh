#!/usr/bin/env bash
# One cell inside the builder image: the cell's torch into its interpreter, the
# factory's build stage (provision, plan, build, tag; kernel objects come from the
# restored cache), then the smoke gate's CPU part (import, C++ ABI, archs; the GPU part
# runs in the smoke-gpu job). The wheel and its cell.json go to out/<cell id>/.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SELECTION:?}" "${CELL_ID:?}" "${CELL_PYTHON:?}"
interpreter="$(command -v "python$CELL_PYTHON")" || {
  echo "::error::the builder image has no python$CELL_PYTHON (build it with PYTHONS=$CELL_PYTHON)"
  exit 1
}
mapfile -t torch_args < <(python3 -m scripts.factory torch-args --matrix "$SELECTION")
"$interpreter" -m pip install --quiet "setuptools>=64" wheel ninja
"$interpreter" -m pip install --quiet "${torch_args[@]}"
python3 -m pip install --quiet -r recipes/factory-requirements.txt

python3 -m scripts.factory build --matrix "$SELECTION" --toolchain system
cell_dir="build/factory/cells/$CELL_ID"
wheels=("$cell_dir"/wheel/*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "::error::expected one wheel in $cell_dir/wheel, found: ${wheels[*]}"
  exit 1
fi
python3 -m scripts.factory smoke-wheel --matrix "$SELECTION" --python "$interpreter" "${wheels[0]}"
mkdir -p "out/$CELL_ID"
cp "${wheels[0]}" "$cell_dir/cell.json" "out/$CELL_ID/"
