# The builder image for ROCm cells: a ROCm base and the factory's hermetic toolchain,
# provisioned by the factory as in builder.Dockerfile. The matrix has no ROCm cells yet
# (recipes/matrix.toml: rocm = []): until it does, the factory never builds this image,
# and `provision` stops with "rocm cells are built in a later issue".
# BASE must bring ROCm and python >= 3.11 (venv, pip), like builder.Dockerfile's base
ARG BASE=rocm/dev-ubuntu-24.04:6.4-complete
FROM ${BASE}

ARG ROCM=6.4
ARG PYTHONS=3.11
ARG TORCH=2.14
ARG FACTORY_PYTHON=python3.12
ARG PIP_NO_INDEX=0

COPY wheelhouse/ /opt/flash-attn/wheelhouse/
COPY scripts/ /opt/flash-attn/factory/scripts/
COPY build_tools/ /opt/flash-attn/factory/build_tools/
COPY recipes/ /opt/flash-attn/factory/recipes/

WORKDIR /opt/flash-attn/factory
RUN ${FACTORY_PYTHON} -m scripts.factory --work /opt/flash-attn provision --toolchain hermetic \
      --matrix "rocm=${ROCM} python=${PYTHONS} torch=${TORCH}" \
      --wheelhouse /opt/flash-attn/wheelhouse \
 && rm -rf /root/.cache/pip

ENV FLASH_ATTN_TOOLCHAINS=/opt/flash-attn/toolchains \
    FLASH_ATTN_FACTORY_PYTHON=${FACTORY_PYTHON} \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/opt/flash-attn/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
