"""The smoke gate's judgement, on what a venv reports (no build needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from factory_wheels import make_wheel

from flash_attn._ops import BWD_SCHEMA, DROPOUT_MASK_SCHEMA, FWD_KV_SCHEMA, FWD_SCHEMA
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.plan import CellPlan
from scripts.factory.smoke import (
    SmokeResult,
    evaluate,
    extension_abi,
    inherit_parent_env,
    parse_elf_archs,
    smoke_wheel,
)

CELL = select_cells("local", load_spec(), LocalFacts("3.11", "2.13", None, True, "13.0"))[0]
GOOD: dict[str, Any] = {
    "torch": "2.13.0+cpu",
    "torch_cxx11abi": True,
    "flash_attn": "2.9.0+cu130torch2.13cxx11abiTRUE",
    "ext_cxx11abi": True,
    "build_info": {"cuda_archs": ["80", "90"], "head_dims": [64], "dtypes": ["bf16"]},
    "elf_archs": ["80", "90a"],  # knob 90 is built as sm_90a (wgmma)
    # what _CHECK reports from the ops (flash_attn/_ops.py's schemas) without a GPU
    "schemas": {
        "fwd": ["flash_attn::" + FWD_SCHEMA, "flash_attn::" + FWD_SCHEMA],
        "bwd": ["flash_attn::" + BWD_SCHEMA, "flash_attn::" + BWD_SCHEMA],
        "fwd_kv": ["flash_attn::" + FWD_KV_SCHEMA] * 2,
        "dropout_mask": ["flash_attn::" + DROPOUT_MASK_SCHEMA] * 2,
    },
    "input_check": "InputError: q must have 4 dimensions (batch, seqlen_q, nheads, head_dim); "
    "got 3 with shape (2, 8, 64)",
    "launch_api": "DeviceError: flash_attn runs on CUDA GPUs only; the inputs are on cpu.",
    "launch_op": "NotImplementedError: Could not run 'flash_attn::fwd' with arguments from "
    "the 'CPU' backend.",
}


def judge(**changes: Any) -> SmokeResult:
    result = SmokeResult(CELL.id, "w.whl")
    result.checks.extend(evaluate(CELL, "2.13.0+cpu", {**GOOD, **changes}))
    return result


def test_a_good_wheel_passes_with_the_gpu_check_skipped() -> None:
    result = judge()
    assert result.passed and result.summary() == "passed (skipped: gpu)"


def test_ops_input_checks_and_the_launch_are_judged() -> None:
    assert "ops" in judge(schemas={"fwd": ["flash_attn::fwd(Tensor q)", "x"]}).summary()
    assert "ops" in judge(schemas={}).summary()  # nothing registered
    older = {**GOOD["schemas"], "dropout_mask": [None, "flash_attn::" + DROPOUT_MASK_SCHEMA]}
    assert "dropout_mask: None" in judge(schemas=older).summary()  # a binding without dropout
    no_append = FWD_KV_SCHEMA.replace(", Tensor? k_new=None, Tensor? v_new=None", "")
    assert no_append != FWD_KV_SCHEMA
    want = GOOD["schemas"]["fwd_kv"][1]
    older = {**GOOD["schemas"], "fwd_kv": ["flash_attn::" + no_append, want]}
    assert "fwd_kv" in judge(schemas=older).summary()  # a binding without the fused append
    assert "input_check" in judge(input_check=None).summary()  # rank 3 q accepted
    assert "input_check" in judge(input_check="RuntimeError: boom").summary()
    assert "launch" in judge(launch_api=None).summary()  # a CPU call that ran
    assert "launch" in judge(launch_op="RuntimeError: segfault-ish").summary()
    gpu = {k: v for k, v in GOOD.items() if not k.startswith("launch")}
    result = SmokeResult(
        CELL.id, "w.whl", evaluate(CELL, "2.13.0+cpu", {**gpu, "numeric": {"ok": True}})
    )
    assert result.passed and "launch" not in [c.name for c in result.checks]


def test_wrong_abi_is_stopped() -> None:
    result = judge(ext_cxx11abi=False)
    assert not result.passed
    assert "cxx11abi: extension FALSE, torch TRUE, cell TRUE" in result.summary()


def test_import_failure_wrong_torch_and_archs_are_stopped() -> None:
    assert not judge(import_error="ImportError: undefined symbol: _ZN3c10").passed
    assert not judge(torch="2.14.1").passed
    assert "archs" in judge(elf_archs=["90a"]).summary()
    assert "archs" in judge(elf_archs=["80", "90"]).summary()  # no wgmma code: not this build
    assert not judge(numeric={"ok": False, "max_err": 1.0}).passed


def test_abi_from_symbols() -> None:
    assert extension_abi("U c10::Error::Error(std::__cxx11::basic_string<char>)") is True
    assert extension_abi("U c10::detail::torchCheckFail(char const*, std::string const&)") is False
    assert extension_abi("U memcpy") is None


def test_elf_listing() -> None:
    listing = "ELF file    1: _C.1.sm_80.cubin\nELF file    2: _C.2.sm_90a.cubin\n"
    assert parse_elf_archs(listing) == {"80", "90a"}


def test_plan_says_why() -> None:
    plan = CellPlan(CELL.id, 12, 10, 2, 1, "9.0 GiB available / 2.5 GiB per nvcc thread")
    assert plan.describe().startswith("12 kernel objects: 10 cached, 2 to compile; 2 jobs x 1")
    assert "only the binding" in CellPlan(CELL.id, 12, 12, 1, 1, "").describe()


def test_smoke_venv_made_from_a_venv_sees_that_venvs_packages(tmp_path: Path) -> None:
    # The toolchain's interpreter lives in a venv holding a package (torch, on a GPU box);
    # a smoke venv made by it with --system-site-packages must see that package too.
    parent = tmp_path / "parent"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True)
    ppy = str(parent / "bin" / "python")
    site = subprocess.run(
        [ppy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "marker_pkg_for_smoke.py").write_text("VALUE = 42\n")
    child = tmp_path / "child"
    subprocess.run(
        [ppy, "-m", "venv", "--without-pip", "--system-site-packages", str(child)], check=True
    )
    cpy = str(child / "bin" / "python")
    probe = [cpy, "-c", "import marker_pkg_for_smoke as m; print(m.VALUE)"]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # the problem
    added = inherit_parent_env(ppy, cpy, tmp_path / "log.txt")
    assert added == [site] or site in added
    done = subprocess.run(probe, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "42"
    # A base interpreter (not a venv) needs nothing.
    other = tmp_path / "other"
    base = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    base_py = str(Path(base) / "bin" / Path(sys.executable).name)
    subprocess.run([base_py, "-m", "venv", "--without-pip", str(other)], check=True)
    assert inherit_parent_env(base_py, str(other / "bin" / "python"), tmp_path / "l2") == []


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs pytest to run in a venv")
def test_isolated_smoke_venv_reuses_the_toolchains_torch(tmp_path: Path) -> None:
    """The hermetic toolchain's case, with this venv as the toolchain: the smoke venv
    installs the wheel alone, imports the toolchain's torch where it lies, and sees
    nothing of the base interpreter's site-packages."""
    import torch

    wheel = make_wheel(tmp_path / "dist")
    venv = tmp_path / "smoke"
    result = smoke_wheel(
        CELL,
        wheel,
        sys.executable,
        torch.__version__,
        venv,
        tmp_path / "smoke.log",
        isolated=True,
    )
    checks = {c.name: c for c in result.checks}
    assert "install" not in checks, (tmp_path / "smoke.log").read_text()
    assert checks["torch"].ok is True  # this venv's torch, seen, not installed again
    assert not checks["import"].ok  # the synthetic wheel has no real extension
    site = sorted(venv.glob("lib/python3*/site-packages"))[0]
    assert (site / "flash_attn" / "__init__.py").is_file() and not (site / "torch").exists()
    base_site = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, sysconfig; print(sysconfig.get_paths("
            "vars={'base': sys.base_prefix, 'platbase': sys.base_prefix})['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    seen = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-I",
            "-c",
            "import sys, torch; print(torch.__file__);print(sys.path)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert seen[0].startswith(sys.prefix)
    assert base_site not in seen[1]
