# The builder image of the wheel factory: a base with python >= 3.11 (venv, pip), a C++
# compiler, make and binutils, plus one hermetic toolchain per (python, torch, CUDA),
# provisioned by the factory's own `provision` stage: the image and `make wheels` share
# one definition of a toolchain (scripts/factory/provision.py), nothing is repeated here.
#
# The factory builds it (make wheels ENGINE=docker|podman) from a staged context
# (build/factory/engine/context: scripts/, build_tools/, recipes/, wheelhouse/):
#   docker build -f docker/builder.Dockerfile --build-arg CUDA=13.0 --build-arg PYTHONS=3.11 \
#     --build-arg TORCH=2.13 -t flash-attn-builder:cp311-torch2.13-cu130 build/factory/engine/context
#
# BASE: manylinux_2_28 (glibc 2.28: the widest platform tag torch >= 2.7 allows); for ARM
# --build-arg BASE=quay.io/pypa/manylinux_2_28_aarch64. Without a registry, any local
# image with the tools above works (tools/make_base_image.sh makes one from debootstrap).
ARG BASE=quay.io/pypa/manylinux_2_28_x86_64
FROM ${BASE}

# the cell's CUDA release, CPython minor(s) and torch minor(s), comma lists allowed
ARG CUDA=13.0
ARG PYTHONS=3.11
ARG TORCH=2.14
# the interpreter that runs the factory (it needs 3.11+: tomllib)
ARG FACTORY_PYTHON=python3.11
# 1: install only from the context's wheelhouse (an offline build); 0: the index too
ARG PIP_NO_INDEX=0

ENV FLASH_ATTN_HOME=/opt/flash-attn
COPY wheelhouse/ /opt/flash-attn/wheelhouse/
COPY scripts/ /opt/flash-attn/factory/scripts/
COPY build_tools/ /opt/flash-attn/factory/build_tools/
COPY recipes/ /opt/flash-attn/factory/recipes/

# Every wheel a toolchain needs lands in the wheelhouse, which stays in the image: the
# smoke venvs of `make wheels` install the cell's torch from it without a network.
WORKDIR /opt/flash-attn/factory
RUN ${FACTORY_PYTHON} -m scripts.factory --work /opt/flash-attn provision --toolchain hermetic \
      --matrix "cuda=${CUDA} python=${PYTHONS} torch=${TORCH}" \
      --wheelhouse /opt/flash-attn/wheelhouse \
 && rm -rf /root/.cache/pip

# What the factory reads inside: its toolchains, an offline pip, the interpreter.
ENV FLASH_ATTN_TOOLCHAINS=/opt/flash-attn/toolchains \
    FLASH_ATTN_FACTORY_PYTHON=${FACTORY_PYTHON} \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/opt/flash-attn/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1
LABEL org.opencontainers.image.title="flash-attn builder" \
      org.flash-attn.cuda="${CUDA}" org.flash-attn.pythons="${PYTHONS}" \
      org.flash-attn.torch="${TORCH}"
WORKDIR /src
