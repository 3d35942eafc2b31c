"""Issue 15 as a user meets it. Fast: the workflow replay's expression evaluator and
output files. With FLASH_ATTN_CONTAINER_TESTS=1 (root, podman, runc, the base image of
tools/make_base_image.sh): `make wheels ... ENGINE=podman OFFLINE=1` on a fresh clone with
the object cache in its default place (the clone's build/kernels, inside the checkout the
container mounts read-only) and no CONTAINER_ULIMITS; and the workflow's plan job replayed
(tools/workflow_local.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from container_helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
from workflow_local import (  # noqa: E402
    CA_IN_BUILD,
    JOB_ORDER,
    StepFailed,
    condition,
    host_ca_args,
    read_kv,
    render,
)

CELL = "torch=2.13 python=3.11 cuda=13.0 binding=classic kernels=ci"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "flash-attn-base:bookworm")
WHEELHOUSE = Path(os.environ.get("FLASH_ATTN_TEST_WHEELHOUSE", "/var/tmp/flash-attn-wheelhouse"))
# The workflow_dispatch input of the replay: the release preset at one CPython with the ci
# kernel set and this machine's limits, and the cells this machine can provision, one per
# torch minor and binding (--per-minor). Only the cu13 stable cell qualifies here: its
# toolchain is the index's floor torch and cuda-toolkit 13's nvcc; a CUDA 12 or 11 cell
# needs an nvcc that no pip package carries (nvidia-cuda-nvcc-cu12 12.8/12.9 hold ptxas
# alone), and the classic cu130 cell's torch 2.9 is on download.pytorch.org, unreachable
# here. On a machine that can, e.g. FLASH_ATTN_TEST_WORKFLOW_CELLS='^cu130-torch2.9-|^cu13-'.
WORKFLOW_MATRIX = os.environ.get(
    "FLASH_ATTN_TEST_WORKFLOW_MATRIX", "release python=3.11 kernels=ci memory=6g cpus=2"
)
WORKFLOW_CELLS = os.environ.get("FLASH_ATTN_TEST_WORKFLOW_CELLS", "^cu13-torchstable")


def test_replay_evaluates_the_workflows_expressions() -> None:
    ctx = {
        "github": {"event_name": "pull_request", "ref": "refs/tags/v2.9.0"},
        "inputs": {"matrix": ""},
        "env": {},
        "matrix": {"id": "cu13-torchstable-abi3"},
        "steps": {
            "key": {"outcome": "success", "outputs": {"key": "k1"}},
            "compile": {"outcome": "failure"},
        },
        "needs": {"plan": {"result": "success", "outputs": {"matrix": '{"include": [1]}'}}},
    }
    expr = "${{ inputs.matrix || (github.event_name == 'pull_request' && 'ci' || 'release') }}"
    assert render(expr, ctx) == "ci"
    assert render("${{ fromJSON(needs.plan.outputs.matrix) }}", ctx) == {"include": [1]}
    key = (
        "${{ steps.compile.outcome == 'success' && steps.key.outputs.key || "
        "format('{0}-partial-{1}', steps.key.outputs.key, matrix.id) }}"
    )
    assert render(key, ctx) == "k1-partial-cu13-torchstable-abi3"
    assert render("wheel-${{ matrix.id }}", ctx) == "wheel-cu13-torchstable-abi3"
    assert condition("always() && steps.key.outcome == 'success'", ctx, "failure")
    assert not condition("steps.key.outcome == 'success'", ctx, "failure")  # success() implied
    assert condition("failure()", ctx, "failure") and not condition(None, ctx, "failure")
    assert condition("${{ startsWith(github.ref, 'refs/tags/v') }}", ctx, "success")
    assert read_kv("a=1\nb<<EOF\nx\ny\nEOF\nc=3=4\n") == {"a": "1", "b": "x\ny", "c": "3=4"}


def test_replay_image_builds_trust_the_hosts_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "proxy-ca.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CERT", str(bundle))
    argv = host_ca_args()
    assert argv[:2] == ["--volume", f"{bundle}:{CA_IN_BUILD}:ro"]
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert sorted(envs) == sorted(
        f"{n}={CA_IN_BUILD}" for n in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    )
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.crt"))
    with pytest.raises(StepFailed, match="missing.crt"):
        host_ca_args()


@pytest.mark.slow
@pytest.mark.containers
def test_make_wheels_offline_with_the_default_cache_and_a_read_only_checkout(
    tmp_path: Path,
) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.factory",
            "--work",
            str(tmp_path / "wh"),
            "wheelhouse",
            "--matrix",
            CELL,
            "--dest",
            str(WHEELHOUSE),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLASH_ATTN_OBJECT_CACHE", "CONTAINER_ULIMITS", "MATRIX")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        [
            "make",
            "wheels",
            f"MATRIX={CELL}",
            "ENGINE=podman",
            "OFFLINE=1",
            f"BASE_IMAGE={BASE_IMAGE}",
            f"WHEELHOUSE={WHEELHOUSE}",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=3000,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"object cache {clone / 'build' / 'kernels'}" in done.stdout
    row = json.loads((clone / "build" / "factory" / "report.json").read_text())[0]
    assert row["status"] == "published" and row["smoke"].startswith("passed")
    assert row["platform"].startswith("manylinux_"), row  # auditwheel in the image
    assert "0 OOM kill(s)" in row["note"]
    wheels = list((clone / "dist" / "whl").rglob("flash_attn-*.whl"))
    assert len(wheels) == 1 and "manylinux_" in wheels[0].name
    assert list((clone / "build" / "kernels").glob("*.o"))  # compiled into the default cache


@pytest.mark.slow
@pytest.mark.containers
def test_the_workflow_replayed_job_by_job_publishes_its_cells(tmp_path: Path) -> None:
    state = Path(os.environ.get("FLASH_ATTN_TEST_WORKFLOW_STATE", tmp_path / "wf"))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "workflow_local.py"),
            "--matrix",
            WORKFLOW_MATRIX,
            "--cells",
            WORKFLOW_CELLS,
            "--per-minor",
            "--state",
            str(state),
        ],
        cwd=REPO,
        env={**os.environ, "BASE_IMAGE": BASE_IMAGE},
        capture_output=True,
        text=True,
        check=False,
        timeout=7200,
    )
    log = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, log
    steps = json.loads((state / "replay.json").read_text())
    assert not [s for s in steps if s["outcome"] == "failure"], log
    ran = {
        job
        for s in steps
        if s["outcome"] == "success"
        for job in JOB_ORDER
        if s["job"] == job or s["job"].startswith(job + "-")
    }
    assert ran == set(JOB_ORDER), (ran, log)  # every job, in the order of needs:
    built = sorted(p.name.removeprefix("wheel-") for p in (state / "artifacts").glob("wheel-*"))
    assert built and all(re.search(WORKFLOW_CELLS, cell) for cell in built), built
    for cell in built:
        smoked = state / "artifacts" / f"smoked-{cell}"
        wheels = list(smoked.glob("*.whl"))
        assert len(wheels) == 1 and "manylinux_" in wheels[0].name, (cell, wheels)
        record = json.loads((smoked / (wheels[0].name + ".smoke.json")).read_text())
        assert record["cell"] == cell and record["passed"], record["summary"]
        assert record["gpu"] == "skipped"  # no GPU runner here: FLASH_ATTN_SMOKE_REQUIRE_GPU=0
    site = state / "runners" / "publish" / "work" / "site" / "whl"
    published = sorted(p.name for p in site.rglob("*.whl"))
    smoked_names = sorted(
        w.name for c in built for w in (state / "artifacts" / f"smoked-{c}").glob("*.whl")
    )
    assert published == smoked_names, (published, smoked_names)
