"""Matrix expansion and validation: presets, inline selections, ids, errors, the CI matrix."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import tomllib

from scripts.factory import cli
from scripts.factory.errors import MatrixError
from scripts.factory.matrix import (
    MATRIX_TOML,
    LocalFacts,
    github_matrix,
    load_spec,
    select_cells,
    selection_of_id,
    with_installed_torch,
)

SPEC = load_spec()
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")
T214 = "torch=2.14 python=3.11 cuda=13.0 binding=classic"  # a classic cell past the floor


def ids(text: str, local: LocalFacts = HERE) -> list[str]:
    return [c.id for c in select_cells(text, SPEC, local)]


def test_local_preset_is_this_machine() -> None:
    # torch 2.13 is past the stable floor: one stable cell, built with this machine's
    # torch, python and nvcc (tests/factory/test_factory_stable.py); classic on request
    assert ids("local") == ["cu13-torchstable-abi3"]
    assert ids("local binding=classic") == ["cu130-torch2.13-cxx11abiTRUE-cp311"]
    cell = select_cells("local binding=classic", SPEC, HERE)[0]
    assert cell.variant == "cu130-torch2.13-cxx11abiTRUE"
    assert cell.local_label == "cu130torch2.13cxx11abiTRUE"
    assert cell.requires_torch == "torch==2.13.*"
    assert cell.cxx_std == "c++20"


def test_local_preset_follows_installed_torch_cuda_or_newest_default() -> None:
    cuda_torch = LocalFacts("3.12", "2.11", "12.8", True, None)
    assert ids("local binding=classic", cuda_torch) == ["cu128-torch2.11-cxx11abiTRUE-cp312"]
    (stable,) = select_cells("local", SPEC, cuda_torch)
    assert (stable.id, stable.cuda, stable.torch, stable.python) == (
        "cu12-torchstable-abi3", "12.8", "2.11", "3.12"
    )
    below = LocalFacts("3.11", "2.9", "12.8", True, None)
    assert ids("local", below) == ["cu128-torch2.9-cxx11abiTRUE-cp311"]
    no_torch = LocalFacts("3.11", None, None, None, None)
    newest = SPEC.newest_torch
    assert ids("local binding=classic", no_torch) == [
        f"cu{SPEC.torch[newest].index_cuda.replace('.', '')}-torch{newest}-cxx11abiTRUE-cp311"
    ]


def test_ci_preset_is_two_torch_by_two_python_on_one_cuda() -> None:
    # every torch of the preset is past the stable floor: one stable cell serves them all
    (stable,) = select_cells("ci", SPEC, HERE)
    assert stable.stable and stable.kernels.name == "ci" and stable.id == "cu13-torchstable-ci-abi3"
    assert all(SPEC.stable.serves(t) for t in SPEC.presets["ci"].axes["torch"])
    cells = select_cells("ci binding=classic", SPEC, HERE)
    assert len(cells) >= 4
    assert len({c.torch for c in cells}) >= 2 and len({c.python for c in cells}) >= 2
    assert len({c.cuda for c in cells}) == 1
    assert all(c.kernels.name == "ci" for c in cells)


def test_release_preset_only_holds_cells_the_table_allows() -> None:
    cells = select_cells("release", SPEC, HERE)
    classic = [c for c in cells if not c.stable]
    assert len(classic) > 30
    assert all(not SPEC.stable.serves(c.torch) for c in classic)
    for c in classic:
        release = SPEC.torch[c.torch]
        assert release.supports_python(c.python) and c.cuda in release.cuda
        assert c.cxx11abi in release.cxx11abi
    assert len({c.id for c in cells}) == len(cells)


def test_inline_selection_and_spellings() -> None:
    assert ids("torch=2.14,2.11 python=3.11,3.12 cuda=13.0 binding=classic") == [
        "cu130-torch2.11-cxx11abiTRUE-cp311",
        "cu130-torch2.11-cxx11abiTRUE-cp312",
        "cu130-torch2.14-cxx11abiTRUE-cp311",
        "cu130-torch2.14-cxx11abiTRUE-cp312",
    ]
    assert ids("torch=2.14,2.11 python=3.11,3.12 cuda=13.0") == ["cu13-torchstable-abi3"]
    assert ids("torch=2.13.0 python=cp311 cuda=cu130 cxx11abi=true binding=classic") == [
        "cu130-torch2.13-cxx11abiTRUE-cp311"
    ]
    # left-out cuda/abi: the torch's index CUDA and pip ABI
    assert ids("torch=2.5 python=3.10") == ["cu124-torch2.5-cxx11abiFALSE-cp310"]
    # a preset with one axis replaced (the ci kernel set: its own label segment)
    assert ids("ci torch=2.13 python=3.12 binding=classic") == [
        "cu130-torch2.13-cxx11abiTRUE-ci-cp312"
    ]
    assert ids("ci torch=2.13 python=3.12") == ["cu13-torchstable-ci-abi3"]


def test_cell_selection_round_trips_and_github_matrix() -> None:
    cells = select_cells("ci", SPEC, HERE)
    data = json.loads(json.dumps(github_matrix(cells)))
    assert [e["id"] for e in data["include"]] == [c.id for c in cells]
    for entry, cell in zip(data["include"], cells):
        assert select_cells(entry["matrix"], SPEC, HERE) == [cell]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("nightly", ["unknown preset 'nightly'", "local, ci, release"]),
        ("torhc=2.13", ["unknown axis 'torhc'", "torch, python"]),
        ("torch=2.99", ["torch '2.99' does not exist", "2.13"]),
        ("python=2.7", ["python '2.7' does not exist", "3.11"]),
        ("cuda=14.1", ["cuda '14.1' does not exist", "13.0"]),
        ("cxx11abi=maybe", ["'maybe'", "TRUE, FALSE"]),
        ("kernels=huge", ["unknown kernels 'huge'", "full, ci, tiny"]),
        ("archs=75", ["archs '75'", "'75' is not a supported CUDA architecture", "80, 86"]),
        ("archs=80+75", ["'75' is not a supported", "joined with '+'"]),
        ("memory=0", ["memory '0' is not a size", "6g"]),
        ("cpus=0", ["cpus '0' is not a positive number"]),
        ("memory=lots", ["memory 'lots' is not a size"]),
        ("torch=2.99+", ["torch '2.99+' does not exist", "X.Y+"]),
        ("torch==2.13", ["malformed token 'torch==2.13'"]),
        ("torch=2.13 python", ["'python' is not axis=value"]),
        ("torch=2.13,", ["empty value"]),
        ("torch=2.13 torch=2.14", ["given twice"]),
        ("", ["MATRIX is empty", "local, ci, release"]),
        (
            "torch=2.13 python=3.9 binding=classic",
            ["rules out", "no wheels for python 3.9", "3.10 to 3.14"],
        ),
        ("torch=2.13 cuda=12.8", ["no CUDA 12.8 build", "12.6, 13.0, 13.2"]),
        ("torch=2.13 cxx11abi=FALSE binding=classic", ["no cxx11abi=FALSE build", "valid: TRUE"]),
        ("torch=2.13 python=3.9", ["CPython at or past 3.10", "python_floor"]),
        ("torch=2.9 binding=stable", ["binding=stable serves torch 2.10", "torch 2.9"]),
        ("binding=maybe", ["binding 'maybe' is not valid", "auto, stable, classic"]),
    ],
)
def test_bad_selections_name_the_value_and_what_is_valid(text: str, needles: list[str]) -> None:
    with pytest.raises(MatrixError) as info:
        select_cells(text, SPEC, HERE)
    for needle in needles:
        assert needle in str(info.value)


def test_cli_exits_non_zero_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix", "--matrix", "torch=2.99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'2.99'" in err and "valid:" in err


def test_cli_json_is_the_github_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix", "--matrix", "ci", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {e["id"] for e in data["include"]} == {c.id for c in select_cells("ci", SPEC, HERE)}


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (('[torch_builds."2.13"]', '[torch_builds."2.99"]'), "names torch 2.99"),
        (('archs = "90"', 'archs = "75"'), "'75' is not a supported CUDA architecture"),
        (('head_dims = "64,128"', 'head_dims = "64,100"'), "'100' is not a head-dim bucket"),
        (('label = "ci"', 'label = ""'), "exactly one kernel set must have an empty label"),
        (('label = "ci"', 'label = "tiny"'), "two kernel sets share a label"),
        (('torch = ["2.13", "2.14"]', 'torch = ["2.13", "2.41"]'), "torch '2.41' does not exist"),
        (('[axes]', '[axes]\ntorch = ["2.13"]'), "come from the torch table"),
    ],
)
def test_table_typos_are_caught(tmp_path: Path, edit: tuple[str, str], needle: str) -> None:
    text = MATRIX_TOML.read_text()
    assert edit[0] in text
    bad = tmp_path / "matrix.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(MatrixError, match=re.escape(needle)):
        load_spec(bad)
    tomllib.loads(MATRIX_TOML.read_text())  # the real one parses


def test_axes_torch_cuda_and_python_come_from_the_torch_table() -> None:
    assert SPEC.axes["torch"] == tuple(sorted(SPEC.torch, key=lambda m: int(m.split(".")[1])))
    assert set(SPEC.axes["cuda"]) == {c for r in SPEC.torch.values() for c in r.cuda}
    lows = {r.python_min for r in SPEC.torch.values()}
    highs = {r.python_max for r in SPEC.torch.values()}
    assert min(lows, key=_minor) == SPEC.axes["python"][0]
    assert max(highs, key=_minor) == SPEC.axes["python"][-1]
    for release in SPEC.torch.values():  # the hand-kept builds always include the index's
        assert release.index_cuda in release.cuda
        assert release.requirement == f"torch=={release.minor}.*"


def _minor(version: str) -> int:
    return int(version.split(".")[1])


def test_release_preset_takes_every_table_torch_from_its_floor() -> None:
    cells = select_cells("release binding=classic", SPEC, HERE)
    floor = SPEC.presets["release"].axes["torch"][0].rstrip("+")
    wanted = {m for m in SPEC.torch if _minor(m) >= _minor(floor)}
    assert {c.torch for c in cells} == wanted and SPEC.newest_torch in wanted


def test_only_the_release_kernel_set_carries_the_plain_label() -> None:
    """A wheel's contents are in its name: another kernel set or other archs never share
    a file name or an index with the release wheels (issue 11, item 4)."""
    full = select_cells(T214, SPEC, HERE)[0]
    assert full.kernels.name == SPEC.release_kernels == "full"
    assert full.local_label == "cu130torch2.14cxx11abiTRUE"
    assert full.variant == "cu130-torch2.14-cxx11abiTRUE"
    ci = select_cells(f"{T214} kernels=ci", SPEC, HERE)[0]
    assert ci.local_label == "cu130torch2.14cxx11abiTRUE.ci"
    assert ci.variant == "cu130-torch2.14-cxx11abiTRUE-ci"
    narrow = select_cells(f"{T214} archs=90", SPEC, HERE)[0]
    assert narrow.local_label == "cu130torch2.14cxx11abiTRUE.sm90"
    same = select_cells(f"{T214} archs=9.0+80", SPEC, HERE)[0]
    assert same == full  # the set's own archs, however spelled: the plain label
    wide = select_cells(f"{T214} kernels=ci archs=80+90", SPEC, HERE)
    assert wide[0].variant == "cu130-torch2.14-cxx11abiTRUE-ci-sm80sm90"
    labels = {c.local_label for c in (full, ci, narrow, wide[0])}
    assert len(labels) == 4 and len({c.id for c in (full, ci, narrow, wide[0])}) == 4


def test_cell_ids_name_their_cell_back() -> None:
    for text in ("ci", "release", "kernels=tiny archs=80+90a", "torch=2.6 cxx11abi=TRUE cuda=12.6"):
        for cell in select_cells(text, SPEC, HERE):
            again = select_cells(selection_of_id(cell.id, SPEC), SPEC, HERE)[0]
            assert replace(again, limits=cell.limits) == cell  # an id carries no limits
    with pytest.raises(MatrixError, match="'huge' names no kernel set"):
        selection_of_id("cu130-torch2.14-cxx11abiTRUE-huge-cp311", SPEC)


def installed(tmp_path: Path, **kw: object) -> LocalFacts:
    """The facts of an installed torch 2.99 that the table does not know."""
    cmake = tmp_path / "torch" / "share" / "cmake" / "Torch" / "TorchConfig.cmake"
    cmake.parent.mkdir(parents=True)
    cmake.write_text("target_compile_features(torch INTERFACE cxx_std_23)\n")
    facts: dict[str, object] = dict(
        python="3.12",
        torch="2.99",
        torch_cuda="13.5",
        torch_cxx11abi=True,
        nvcc="13.0",
        torch_version="2.99.0+cu135",
        torch_requires=("filelock", 'cuda-toolkit[cudart]==13.5.1; platform_system == "Linux"'),
        torch_requires_python=">=3.12",
        torch_dir=str(tmp_path / "torch"),
    )
    facts.update(kw)
    return LocalFacts(**facts)  # type: ignore[arg-type]


def test_local_preset_follows_a_torch_the_table_does_not_know(tmp_path: Path) -> None:
    local = installed(tmp_path)
    without = select_cells("local binding=classic", SPEC, local)[0]
    assert without.torch == SPEC.newest_torch  # without it
    spec, note = with_installed_torch(SPEC, local)
    stable = select_cells("local", spec, local)[0]  # 2.99 is past the floor: stable,
    assert stable.stable and stable.torch == "2.99"  # built with the installed torch
    cell = select_cells("local binding=classic", spec, local)[0]
    assert cell.id == "cu135-torch2.99-cxx11abiTRUE-cp312"
    assert (cell.cxx_std, cell.torch_requirement) == ("c++23", "torch==2.99.*")
    for fact in ("torch 2.99.0+cu135 is installed", "torch.version.cuda", "==13.5.1",
                 "Requires-Python >=3.12", "_GLIBCXX_USE_CXX11_ABI", "cxx_std_23",
                 "make refresh-matrix"):
        assert fact in note, fact
    # it is the installed torch's row only: presets and `all` still mean the table
    assert {c.torch for c in select_cells("release", spec, local)} == {
        c.torch for c in select_cells("release", SPEC, local)
    }
    assert "2.99" not in select_cells("torch=all python=3.12 kernels=ci", spec, local)[0].torch
    known = replace(local, torch="2.13", torch_version="2.13.0")
    assert with_installed_torch(SPEC, known) == (SPEC, "")


def test_a_cpu_torch_the_table_does_not_know_builds_for_this_nvcc(tmp_path: Path) -> None:
    local = installed(tmp_path, torch_cuda=None, torch_requires=(), torch_dir=None,
                      torch_version="2.99.0+cpu")
    spec, note = with_installed_torch(SPEC, local)
    assert select_cells("local", spec, local)[0].cuda == "13.0"
    assert "this machine's nvcc" in note and f"torch {SPEC.newest_torch}'s" in note
