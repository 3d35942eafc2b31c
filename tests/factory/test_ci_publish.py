"""The publish job trusts smoke records only: smoke-passed (GPU part included) wheels whose
bytes still match the record go into the per-variant indexes, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factory_wheels import make_wheel

from scripts.factory import cli
from scripts.factory.cellref import cell_for_wheel, one_cell, torch_install_args
from scripts.factory.errors import FactoryError
from scripts.factory.matrix import load_spec
from scripts.factory.smoke import Check, SmokeResult
from scripts.factory.smoke_record import assemble, gpu_verdict, make_record, write_record

SPEC = load_spec()


def smoked(root: Path, python: str, gpu: bool | None, ok: bool = True) -> Path:
    """A wheel of variant cu130-torch2.14 for `python` with its smoke record beside it."""
    tag = f"cp{python.replace('.', '')}"
    wheel = make_wheel(
        root / tag, version="2.9.0+cu130torch2.14cxx11abiTRUE", tag=f"{tag}-{tag}-linux_x86_64"
    )
    cell = cell_for_wheel("torch=2.14 cuda=13.0 binding=classic", wheel, SPEC)
    result = SmokeResult(cell.id, str(wheel))
    result.checks += [Check("import", ok, "flash_attn 2.9.0"), Check("gpu", gpu, "numerics")]
    write_record(make_record(cell, wheel, result), wheel)
    return wheel


def test_records_say_what_the_gpu_gate_did(tmp_path: Path) -> None:
    wheel = smoked(tmp_path, "3.12", gpu=True)
    record = json.loads((wheel.parent / (wheel.name + ".smoke.json")).read_text())
    assert record["cell"] == "cu130-torch2.14-cxx11abiTRUE-cp312"
    assert record["variant"] == "cu130-torch2.14-cxx11abiTRUE"
    assert record["passed"] is True and record["gpu"] == "passed"
    skipped = SmokeResult("c", "w", checks=[Check("gpu", None, "no GPU")])
    assert gpu_verdict(skipped) == "skipped"


def test_only_smoke_passed_wheels_with_the_gpu_part_are_published(tmp_path: Path) -> None:
    good = smoked(tmp_path / "smoked", "3.12", gpu=True)
    smoked(tmp_path / "smoked", "3.11", gpu=None)  # the GPU part did not run
    smoked(tmp_path / "smoked", "3.13", gpu=True, ok=False)  # failed the gate
    found = assemble([tmp_path / "smoked"])
    assert [c.wheel for c in found.candidates] == [good]
    assert len(found.left_out) == 2
    assert any("GPU check was skipped" in line for line in found.left_out)
    assert any("smoke failed" in line for line in found.left_out)
    cpu_ok = assemble([tmp_path / "smoked"], require_gpu=False)
    assert len(cpu_ok.candidates) == 2

    code = cli.main(["--out", str(tmp_path / "dist"), "publish-smoked", str(tmp_path / "smoked")])
    assert code == 0
    manifest = json.loads((tmp_path / "dist" / "whl" / "manifest.json").read_text())
    assert [w["file"] for w in manifest["wheels"]] == [good.name]
    assert manifest["variants"] == ["cu130-torch2.14-cxx11abiTRUE"]


def test_a_wheel_that_is_not_the_one_smoke_tested_stops_publishing(tmp_path: Path) -> None:
    wheel = smoked(tmp_path, "3.12", gpu=True)
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(FactoryError, match="not the one smoke-tested"):
        assemble([tmp_path])


def test_nothing_passed_is_an_error_not_an_empty_site(tmp_path: Path) -> None:
    smoked(tmp_path / "smoked", "3.12", gpu=None)
    code = cli.main(["--out", str(tmp_path / "dist"), "publish-smoked", str(tmp_path / "smoked")])
    assert code == 2
    assert not (tmp_path / "dist" / "whl").exists()


def test_a_wheel_of_another_variant_is_refused(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, version="2.9.0+cu130torch2.13cxx11abiTRUE", tag="cp312-cp312-x")
    with pytest.raises(FactoryError, match="carries the label"):
        cell_for_wheel("torch=2.14 cuda=13.0 binding=classic", wheel, SPEC)
    assert cell_for_wheel("torch=2.13 cuda=13.0 binding=classic", wheel, SPEC).python == "3.12"


def test_one_cell_takes_the_python_it_is_given_and_refuses_many() -> None:
    assert one_cell("release torch=2.14 cuda=13.0 binding=classic", SPEC, "3.13").id == (
        "cu130-torch2.14-cxx11abiTRUE-cp313"
    )
    with pytest.raises(FactoryError, match="selects 5 cells"):
        one_cell("release torch=2.14 cuda=13.0 binding=classic", SPEC)


def test_torch_comes_from_the_index_that_has_its_cuda_build() -> None:
    default = one_cell("torch=2.14 cuda=13.0 python=3.12 binding=classic", SPEC)
    assert torch_install_args(default, SPEC) == ["torch==2.14.*"]
    other = one_cell("torch=2.9 cuda=12.6 python=3.12", SPEC)
    args = torch_install_args(other, SPEC)
    assert args[0] == "torch==2.9.*" and args[1] == "--index-url"
    assert args[2].endswith("/whl/cu126")
