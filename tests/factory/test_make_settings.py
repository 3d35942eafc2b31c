"""MATRIX and the other settings are data, never code (issue 11, items 5 and 6): make and
the CI scripts hand them to the factory verbatim through the environment, the workflow
never expands an expression inside a `run:`, and the factory checks every setting at the
matrix stage (exit 2, naming the value and what is valid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.factory import cli
from scripts.factory.matrix import LocalFacts, load_spec

REPO = Path(__file__).resolve().parents[2]
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")

# each tries to create the file {x}; none may
INJECTIONS = [
    "torch=2.14 `touch {x}`",
    "torch=2.14 $(touch {x})",
    "ci; touch {x}",
    "ci && touch {x} #",
    "ci' \"; touch {x}; echo \"'",
    "$(shell touch {x})",
    "ci $$(touch {x})",
]


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter stand-in that records its arguments and the settings it sees."""
    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "python"
    exe.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    keys = ('MATRIX', 'TOOLCHAIN', 'ENGINE', 'DEV_MATRIX')\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], **{k: os.environ.get(k) for k in keys}})"
        " + '\\n')\n"
    )
    exe.chmod(0o755)
    return exe, log


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("template", INJECTIONS)
def test_make_hands_matrix_to_the_factory_verbatim(tmp_path: Path, template: str) -> None:
    x = tmp_path / "x"
    value = template.format(x=x)
    exe, log = fake_python(tmp_path)
    make("matrix", f"PYTHON={exe}", f"MATRIX={value}")
    make("matrix-json", f"PYTHON={exe}", env={"MATRIX": value})  # from the environment too
    make("wheels", f"PYTHON={exe}", f"TOOLCHAIN={value}", f"ENGINE={value}", "FAIL_FAST=1")
    make("dev-image", f"PYTHON={exe}", f"DEV_MATRIX={value}", f"ENGINE={value}")
    assert not x.exists(), f"MATRIX={value!r} ran as code"
    seen = calls(log)
    assert [c["MATRIX"] for c in seen[:2]] == [value, value]
    assert "--matrix" not in seen[0]["argv"]  # the factory reads it from the environment
    wheels = seen[2]["argv"]
    assert wheels[wheels.index("--toolchain") + 1] == value  # one argument, as written
    assert wheels[wheels.index("--engine") + 1] == value and "--fail-fast" in wheels
    assert seen[3]["MATRIX"] == value and seen[3]["DEV_MATRIX"] == value


def test_the_factory_refuses_an_injected_matrix_cleanly(tmp_path: Path) -> None:
    x = tmp_path / "x"
    value = f"torch=2.14 `touch {x}`"
    done = make("matrix", f"PYTHON={sys.executable}", f"MATRIX={value}")
    assert done.returncode != 0 and not x.exists()
    assert f"error: MATRIX={value!r}: '`touch' is not axis=value" in done.stderr
    assert "Traceback" not in done.stderr
    bad = make("wheels", f"PYTHON={sys.executable}", "TOOLCHAIN=$(touch x)")
    assert "invalid choice: '$(touch x)'" in bad.stderr and "system" in bad.stderr


def test_the_plan_script_takes_matrix_as_data(tmp_path: Path) -> None:
    x = tmp_path / "x"
    out = tmp_path / "github_output"
    env = {**os.environ, "MATRIX": f"ci `touch {x}`", "GITHUB_OUTPUT": str(out),
           "PYTHON": sys.executable}
    env.pop("GITHUB_STEP_SUMMARY", None)
    done = subprocess.run(["bash", "ci/plan.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode != 0 and not x.exists()
    assert "is not axis=value" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() or out.read_text() == ""  # nothing handed on


def test_no_run_step_expands_an_expression() -> None:
    """${{ }} inside `run:` is pasted into the script before bash sees it; values go in
    through `env:` and are read as "$VAR"."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "wheels.yml").read_text())
    runs = [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]
    assert runs and not [r for r in runs if "${{" in r]
    for script in sorted((REPO / "ci").rglob("*.sh")):
        assert "${{" not in script.read_text(), script


@pytest.mark.parametrize(
    ("selection", "needles"),
    [
        ("archs=75", ["archs '75'", "valid: 80, 86, 87, 89, 90, 90a"]),
        ("torch=2.14 memory=1m", ["memory limit 1m is below what one compile needs",
                                  "at least 3g"]),
        ("cpus=0", ["cpus '0' is not a positive number"]),
        ("ci gpus=2", ["unknown axis 'gpus'", "valid axes: cuda, rocm, torch"]),
        ("kernels=ci archs=", ["malformed token 'archs='"]),
    ],
)
def test_every_setting_is_checked_at_the_matrix_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    selection: str, needles: list[str],
) -> None:
    monkeypatch.setattr(cli, "local_facts", lambda: HERE)
    monkeypatch.setenv("FLASH_ATTN_OBJECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLASH_ATTN_NVCC_MEM_GB", raising=False)
    assert cli.main(["matrix", "--matrix", selection]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err


def test_ci_build_builds_the_kernel_set_of_the_matrix() -> None:
    """`make ci-build`'s knobs are [kernels.ci] of recipes/matrix.toml, not a copy."""
    done = subprocess.run(
        [sys.executable, "-m", "scripts.factory", "kernel-env", "--kernels", "ci"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    printed = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert printed == load_spec().kernels["ci"].env()
    makefile = (REPO / "Makefile").read_text()
    assert "FLASH_ATTN_DTYPES" not in makefile and "kernel-env --kernels ci" in makefile
    dry = make("-n", "ci-build").stdout
    assert "kernel-env --kernels ci" in dry and "setup.py build_ext --inplace" in dry
