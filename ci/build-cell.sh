#!/usr/bin/env bash
# One cell inside the builder image: the factory's build stage with the image's own
# hermetic toolchain (docker/builder.Dockerfile provisioned exactly this cell's python,
# torch and CUDA compiler; the image installs nothing, and needs no index), kernel objects
# from the restored cache; then the smoke gate's CPU part (import, C++ ABI, archs, and for
# a stable wheel its abi3 and symbol checks; the GPU part runs in the smoke-gpu job) in
# that toolchain's interpreter. The wheel and its cell.json go to out/<cell id>/.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SELECTION:?}" "${CELL_ID:?}"

python3 -m scripts.factory build --matrix "$SELECTION" --toolchain hermetic
cell_dir="build/factory/cells/$CELL_ID"
wheels=("$cell_dir"/wheel/*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "::error::expected one wheel in $cell_dir/wheel, found: ${wheels[*]}"
  exit 1
fi
toolchain_python=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["toolchain"]["python"])' "$cell_dir/cell.json")
python3 -m scripts.factory smoke-wheel --matrix "$SELECTION" --python "$toolchain_python" "${wheels[0]}"
mkdir -p "out/$CELL_ID"
cp "${wheels[0]}" "$cell_dir/cell.json" "out/$CELL_ID/"
