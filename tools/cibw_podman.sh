#!/usr/bin/env bash
# Run cibuildwheel for real with podman on a machine without a container registry:
# build docker/cibw-local.Dockerfile over the Debian base (tools/make_base_image.sh),
# then cibuildwheel with pyproject.toml's [tool.cibuildwheel] hooks (the factory's
# cibw-cuda, torch-args, cibw-repair and smoke-wheel stages) for one CPython.
#
#   tools/cibw_podman.sh [VARIANT] [OUTDIR]     # VARIANT default "release torch=2.13 cuda=13.0"
#
# PYTHON: the interpreter with cibuildwheel (recipes/factory-requirements.txt); python3.
#
# The variant's torch and the CUDA compiler come through pip: PyPI (with the host's CA
# bundle) plus, when they exist, this machine's local wheel directories mounted read-only
# (/opt/wheels, /opt/pypi-more, and WHEELHOUSE). podman here needs runc and low ulimits.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-release torch=2.13 cuda=13.0}
out=${2:-dist/cibuildwheel}
base=${BASE_IMAGE:-flash-attn-base:bookworm}
image=localhost/flash-attn-cibw:local
torch_minor=$(sed -n 's/.*torch=\([0-9.]*\).*/\1/p' <<<"$variant")
cuda=$(sed -n 's/.*cuda=\([0-9.]*\).*/\1/p' <<<"$variant")
ulimits=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

ctx=$(mktemp -d)
src=$(mktemp -d)
trap 'rm -rf "$ctx" "$src"' EXIT
# cibuildwheel copies the whole project folder into the container: give it the files git
# knows (tracked, or untracked and not ignored), not build/ and dist/
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$src"
mkdir -p "$out" && out=$(cd "$out" && pwd)
cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
podman build --runtime runc "${ulimits[@]}" --build-arg "BASE=$base" \
  -f docker/cibw-local.Dockerfile -t "$image" "$ctx"

mounts=""
find_links=""
for d in /opt/wheels /opt/pypi-more ${WHEELHOUSE:-}; do
  [ -d "$d" ] || continue
  mounts+=" --volume $d:$d:ro"
  find_links+=" $d"
done
extra_index=""
[ -d /opt/pypi-more/simple ] && extra_index="PIP_EXTRA_INDEX_URL=file:///opt/pypi-more/simple"

export CIBW_CONTAINER_ENGINE="podman; create_args: --runtime runc ${ulimits[*]}$mounts"
export CIBW_MANYLINUX_X86_64_IMAGE=$image
export CIBW_BUILD=cp311-manylinux_x86_64  # the Debian base carries CPython 3.11
# [tool.cibuildwheel.environment] with this variant, the base's interpreter and the mounts
plan() { echo "\$(\$FACTORY_PYTHON -m scripts.factory cibw-plan-env --matrix \\\"\$FLASH_ATTN_MATRIX\\\" --var $1)"; }
# cibuildwheel parses this string itself: its quotes are meant literally
# shellcheck disable=SC2089,SC2090
CIBW_ENVIRONMENT="FLASH_ATTN_MATRIX=\"$variant\" \
FACTORY_PYTHON=/opt/python/cp311-cp311/bin/python \
CUDA_HOME=/opt/flash-attn-cuda/home PATH=\"\$PATH:/opt/flash-attn-cuda/home/bin\" \
FLASH_ATTN_CUDA_ARCHS=\"80;90\" FLASH_ATTN_BACKWARD=1 \
FLASH_ATTN_LOCAL_VERSION=cu${cuda/./}torch${torch_minor}cxx11abiTRUE \
PIP_FIND_LINKS=\"${find_links# }\" $extra_index \
MAX_JOBS=\"$(plan MAX_JOBS)\" NVCC_THREADS=\"$(plan NVCC_THREADS)\""
# shellcheck disable=SC2090
export CIBW_ENVIRONMENT
cd "$src"
"${PYTHON:-python3}" -m cibuildwheel --platform linux --output-dir "$out" .
