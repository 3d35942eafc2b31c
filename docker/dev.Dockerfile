# The dev image: a builder image (its hermetic toolchain: python, torch, CUDA compiler)
# plus the test and lint tools; the checkout is mounted at /src, never copied.
#
#   make dev-image ENGINE=podman     # builds flash-attn-builder:<cell> first, then this
#   make dev ENGINE=podman           # a shell in it, the checkout at /src
#
# Inside, `python3` is the toolchain's venv: `make ci-build`, `make test` work as on a
# host; `make wheels TOOLCHAIN=hermetic` uses the image's toolchains.
ARG BUILDER=flash-attn-builder:cp311-torch2.14-cu130
FROM ${BUILDER}

# the cell whose toolchain becomes the shell's python (one of the builder's)
ARG TOOLCHAIN_VENV=cp311-torch2.14-cu130
# 1: install the tools from the builder's wheelhouse only (it must hold them:
# python3 -m scripts.factory wheelhouse --dev ...; the factory passes 1 with --offline)
ARG DEV_PIP_NO_INDEX=0
ARG DEV_REQUIREMENTS="pytest ruff==0.17.6 vermin numpy psutil packaging rich"

RUN ln -s /opt/flash-attn/toolchains/${TOOLCHAIN_VENV} /opt/flash-attn/dev \
 && PIP_NO_INDEX=${DEV_PIP_NO_INDEX} /opt/flash-attn/dev/bin/python -m pip install \
      --find-links /opt/flash-attn/wheelhouse ${DEV_REQUIREMENTS} \
 && rm -rf /root/.cache/pip \
 && test -x /opt/flash-attn/cuda/bin/nvcc

# CUDA_HOME: the toolchain's CUDA compiler from pip (the builder image links it at
# /opt/flash-attn/cuda, found by the factory's own code)
ENV PATH=/opt/flash-attn/dev/bin:/opt/flash-attn/cuda/bin:${PATH} \
    CUDA_HOME=/opt/flash-attn/cuda \
    PYTHON=/opt/flash-attn/dev/bin/python
WORKDIR /src
CMD ["bash"]
