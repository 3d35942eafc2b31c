# A stand-in for cibuildwheel's manylinux image where no registry can be reached (like
# our build machines): the Debian base of tools/make_base_image.sh plus the layout
# cibuildwheel expects. tools/cibw_podman.sh builds it and runs cibuildwheel with it.
ARG BASE=flash-attn-base:bookworm
FROM ${BASE}

# the host's CA bundle (with any TLS-intercepting proxy's CA), so pip in it reaches PyPI
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

# /opt/python/<tag>/bin/python per build interpreter (a venv: no PEP 668 refusal), and
# the cp39 path cibuildwheel runs its environment helper with
RUN python3 -m venv /opt/python/cp311-cp311 \
 && mkdir -p /opt/python/cp39-cp39/bin \
 && ln -s /usr/bin/python3 /opt/python/cp39-cp39/bin/python
