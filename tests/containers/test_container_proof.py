"""The end-to-end proof with podman (tools/container_proof.py): a base image from a
Debian rootfs, the builder image FROM it built offline, one cell in a container with
--memory=6g --cpus=2. Several minutes, root, podman, runc and debootstrap: it runs only
with FLASH_ATTN_CONTAINER_TESTS=1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from container_helpers import REPO


@pytest.mark.slow
@pytest.mark.containers
def test_one_cell_in_podman_builds_passes_smoke_and_is_not_oom_killed(tmp_path: Path) -> None:
    out = tmp_path / "proof"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "container_proof.py"),
            "--skip-ab",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "proof.json").read_text())
    run = report["runs"][0]
    assert report["proof_ok"]
    assert run["status"] == "published" and run["smoke"].startswith("passed")
    assert run["oom_kills"] == 0 and run["memory_peak_bytes"] > 0
    assert run["objects_compiled"] == 4  # the tiny kernel set, compiled inside
    assert list((out / "proof" / "out" / "whl").rglob("flash_attn-*.whl"))
