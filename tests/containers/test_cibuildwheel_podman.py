"""cibuildwheel for real with podman (tools/cibw_podman.sh): the stand-in manylinux
image over the Debian base, the [tool.cibuildwheel] hooks, one CPython. Minutes, root,
podman, runc and the base image: it runs only with FLASH_ATTN_CONTAINER_TESTS=1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from container_helpers import REPO


@pytest.mark.slow
@pytest.mark.containers
def test_cibuildwheel_builds_repairs_and_smoke_tests_one_wheel(tmp_path: Path) -> None:
    # what it needs besides the container test switch: a skip that says what to install
    if importlib.util.find_spec("cibuildwheel") is None:
        pytest.skip(
            f"cibuildwheel is not installed for {sys.executable} "
            "(pip install -r recipes/factory-requirements.txt)"
        )
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    out = tmp_path / "wheels"
    done = subprocess.run(
        [str(REPO / "tools" / "cibw_podman.sh"), "release torch=2.13 cuda=13.0", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=2400,
        env={**os.environ, "PYTHON": sys.executable},  # the interpreter that has cibuildwheel
    )
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    # the smoke gate's verdict (cibuildwheel relays its hooks' output on either stream)
    assert "cu130-torch2.13-cxx11abiTRUE-cp311: passed" in done.stdout + done.stderr, log
    (wheel,) = out.glob("*.whl")
    assert wheel.name.startswith("flash_attn-2.9.0+cu130torch2.13cxx11abiTRUE-cp311-cp311-")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    assert "Version: 2.9.0+cu130torch2.13cxx11abiTRUE" in text
    assert "Requires-Dist: torch==2.13.*" in text
