"""Provisioning and doctor, on probed facts (no interpreter or torch install needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.factory.doctor import diagnose
from scripts.factory.errors import FactoryError
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.preflight import check_disk
from scripts.factory.probe import PythonFacts
from scripts.factory.provision import (
    cuda_requirements,
    nvcc_serves_older,
    provision,
    table_disagreements,
)

SPEC = load_spec()
CELL = select_cells(
    "local binding=classic", SPEC, LocalFacts("3.11", "2.13", None, True, "13.0")
)[0]


def facts(**changes: object) -> PythonFacts:
    base = dict(python="3.11", executable="/py", torch="2.13.0", torch_cuda="13.0",
                cxx11abi=True, torch_requires=("cuda-toolkit[nvcc]==13.0.3",))
    base.update(changes)
    return PythonFacts(**base)  # type: ignore[arg-type]


def test_cuda_compiler_components_share_one_release() -> None:
    reqs = cuda_requirements("13.0")
    assert all("==13.0.*" in r for r in reqs)
    assert any(r.startswith("nvidia-nvvm==") for r in reqs)
    assert all("-cu12==12.8.*" in r for r in cuda_requirements("12.8"))


def test_table_agrees_with_matching_metadata_and_says_where_not() -> None:
    assert table_disagreements(CELL, SPEC, facts()) == []
    notes = table_disagreements(
        CELL, SPEC, facts(torch_cuda="12.4", cxx11abi=False,
                          torch_requires=("nvidia-cuda-runtime-cu12==12.4.127",))
    )
    assert any("cxx11abi" in n for n in notes)
    assert any("CUDA 12.4" in n for n in notes)
    assert any("nvidia-cuda-runtime-cu12==12.4.127" in n for n in notes)


def test_unknown_toolchain_names_the_valid_ones() -> None:
    with pytest.raises(FactoryError, match="system, hermetic"):
        provision(CELL, SPEC, "conda")


def test_doctor_names_the_variant_and_the_pip_command() -> None:
    """torch 2.13 is past the stable floor: the one cu13 stable wheel; torch 2.9 below it:
    its classic variant."""
    stable = "needs variant cu13-torchstable (one cp310-abi3 wheel for every torch >= 2.10"
    lines = diagnose(facts(flash_attn="2.9.0+cu13torchstable"), SPEC, "https://x")
    assert any(line.startswith(stable) for line in lines), lines
    assert any(line.endswith(": matches") for line in lines)
    assert lines[-1] == "pip install flash-attn --index-url https://x/whl/cu13-torchstable/simple"
    # a classic wheel of exactly this torch still fits; one of another torch does not
    old = diagnose(facts(flash_attn="2.9.0+cu130torch2.13cxx11abiTRUE"), SPEC)
    assert any("matches (a classic build of this torch" in line for line in old)
    other = diagnose(facts(flash_attn="2.9.0+cu130torch2.11cxx11abiTRUE"), SPEC)
    assert any("does NOT match" in line and "+cu13torchstable" in line for line in other)
    cpu = diagnose(facts(torch="2.13.0+cpu", torch_cuda=None), SPEC)
    assert any(line.startswith(stable) for line in cpu)
    # a torch newer than the table: still the stable wheel
    newer = diagnose(facts(torch="2.99.0", torch_cuda="13.5"), SPEC)
    assert any(line.startswith(stable) for line in newer), newer
    below = diagnose(
        facts(torch="2.9.1", torch_cuda="12.8", flash_attn="2.9.0+cu128torch2.9cxx11abiTRUE"),
        SPEC,
        "https://x",
    )
    assert "needs variant cu128-torch2.9-cxx11abiTRUE (cp311)" in below
    assert below[-1].endswith("/whl/cu128-torch2.9-cxx11abiTRUE/simple")
    assert any("not importable" in line for line in diagnose(facts(torch=None), SPEC))


def test_no_disk_space_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FactoryError, match="no disk space"):
        check_disk([tmp_path / "not" / "yet"], need=1 << 60)
    check_disk([tmp_path], need=1)


@pytest.mark.parametrize(
    ("nvcc", "cuda", "serves"),
    [
        ("13.0", "13.2", True),  # torch 2.15 (cu132) on a machine with nvcc 13.0
        ("12.4", "12.8", True),
        ("13.0", "13.0", False),  # equal: no exception needed
        ("13.2", "13.0", False),  # newer nvcc: its runtime needs a newer driver
        ("12.8", "13.0", False),  # another major
        ("13.0", "12.9", False),
        ("13.x", "13.2", False),
    ],
)
def test_an_older_nvcc_of_the_same_major_serves_a_newer_minor(
    nvcc: str, cuda: str, serves: bool
) -> None:
    assert nvcc_serves_older(nvcc, cuda) is serves
