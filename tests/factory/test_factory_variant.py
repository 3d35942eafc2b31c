"""The factory and the installed package name variants one way (flash_attn/_variant.py),
and `make doctor` ends in the installed package's own doctor."""

from __future__ import annotations

import sys

import pytest

from scripts.factory import doctor as factory_doctor
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.probe import PythonFacts
from scripts.factory.variant import TorchFacts, Variant

SPEC = load_spec()


def facts(**changes: object) -> PythonFacts:
    base = dict(
        python="3.11",
        executable="/py",
        torch="2.13.0+cu130",
        torch_cuda="13.0",
        cxx11abi=True,
        torch_dist="2.13.0",
    )
    base.update(changes)
    return PythonFacts(**base)  # type: ignore[arg-type]


def test_every_release_cell_is_named_as_the_package_names_its_variant() -> None:
    cells = select_cells("release", SPEC, LocalFacts("3.11", None, None, None, None))
    assert cells
    for cell in cells:
        variant = (
            Variant.stable_for(cell.cuda)
            if cell.stable
            else Variant(cell.cuda, cell.torch, cell.cxx11abi)
        )
        assert cell.stable == SPEC.stable.serves(cell.torch)
        assert cell.variant == variant.name
        assert cell.local_label == variant.local_label
        assert Variant.from_label(cell.local_label.lower()) == variant


def test_the_factory_loads_the_package_module_without_importing_torch() -> None:
    """The variant module is loaded by path: the factory's process needs no torch."""
    import subprocess

    code = (
        "import sys; import scripts.factory.variant as v; "
        "assert 'torch' not in sys.modules and 'flash_attn' not in sys.modules; "
        "print(v.Variant('13.0', '2.13', True).name)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cu130-torch2.13-cxx11abiTRUE"


def test_the_pip_command_pins_the_installed_torch_or_replaces_a_wrong_build() -> None:
    fresh = factory_doctor.diagnose(facts(), SPEC, "https://x")
    variant = Variant.for_torch(
        TorchFacts("2.13.0+cu130", "13.0", True), stable_floor=SPEC.stable.abi.torch_floor
    )
    assert variant.name == "cu13-torchstable"  # torch 2.13 is past the stable floor
    assert (
        fresh[-1]
        == f'pip install flash-attn "torch==2.13.0" --index-url {variant.index_url("https://x")}'
    )
    wrong = factory_doctor.diagnose(
        facts(flash_attn="2.9.0+cu130torch2.14cxx11abitrue"), SPEC, "https://x"
    )
    assert any("it is variant cu130-torch2.14-cxx11abiTRUE" in line for line in wrong)
    assert wrong[-1].startswith("pip install --force-reinstall --no-deps flash-attn --index-url")


@pytest.mark.parametrize(
    ("changes", "installed_status", "expected"),
    [
        ({}, None, 0),  # nothing installed: the variant is named, nothing is wrong
        ({"torch": "2.2.0"}, None, 1),  # no wheels for this torch
        ({"torch": None}, None, 1),
        ({"flash_attn": "2.9.0+cu13torchstable"}, 0, 0),
        ({"flash_attn": "2.9.0+cu13torchstable"}, 1, 1),  # its doctor fails
        ({"flash_attn": "2.9.0+cu130torch2.14cxx11abiTRUE"}, 0, 1),  # the wrong variant
        # torch 2.13's classic build still fits (it loads), though the index is the stable one
        ({"flash_attn": "2.9.0+cu130torch2.13cxx11abiTRUE"}, 0, 0),
        ({"flash_attn": "2.9.0"}, 0, 0),  # a source build: its doctor decides
    ],
)
def test_make_doctor_exit_status(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    installed_status: int | None,
    expected: int,
) -> None:
    ran: list[str] = []

    def fake_doctor(executable: str, base_url: str) -> tuple[int, str]:
        ran.append(executable)
        return installed_status or 0, "flash_attn doctor\n..."

    monkeypatch.setattr(factory_doctor, "run_installed_doctor", fake_doctor)
    assert factory_doctor.doctor(facts(**changes), SPEC, "https://x") == expected
    assert ran == ([] if installed_status is None else ["/py"])
    if ran:
        assert "flash_attn doctor" in capsys.readouterr().out
