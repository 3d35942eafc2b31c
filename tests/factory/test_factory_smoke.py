"""The smoke gate's judgement, on what a venv reports (no build needed)."""

from __future__ import annotations

from typing import Any

from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.plan import CellPlan
from scripts.factory.smoke import SmokeResult, evaluate, extension_abi, parse_elf_archs

CELL = select_cells("local", load_spec(), LocalFacts("3.11", "2.13", None, True, "13.0"))[0]
GOOD: dict[str, Any] = {
    "torch": "2.13.0+cpu",
    "torch_cxx11abi": True,
    "flash_attn": "2.9.0+cu130torch2.13cxx11abiTRUE",
    "ext_cxx11abi": True,
    "build_info": {"cuda_archs": ["80", "90"], "head_dims": [64], "dtypes": ["bf16"]},
    "elf_archs": ["80", "90a"],  # knob 90 is built as sm_90a (wgmma)
}


def judge(**changes: Any) -> SmokeResult:
    result = SmokeResult(CELL.id, "w.whl")
    result.checks.extend(evaluate(CELL, "2.13.0+cpu", {**GOOD, **changes}))
    return result


def test_a_good_wheel_passes_with_the_gpu_check_skipped() -> None:
    result = judge()
    assert result.passed and result.summary() == "passed (skipped: gpu)"


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
