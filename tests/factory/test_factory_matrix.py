"""Matrix expansion and validation: presets, inline selections, ids, errors, the CI matrix."""

from __future__ import annotations

import json

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
)

SPEC = load_spec()
HERE = LocalFacts(python="3.11", torch="2.13", torch_cuda=None, torch_cxx11abi=True, nvcc="13.0")


def ids(text: str, local: LocalFacts = HERE) -> list[str]:
    return [c.id for c in select_cells(text, SPEC, local)]


def test_local_preset_is_this_machine() -> None:
    assert ids("local") == ["cu130-torch2.13-cxx11abiTRUE-cp311"]
    cell = select_cells("local", SPEC, HERE)[0]
    assert cell.variant == "cu130-torch2.13-cxx11abiTRUE"
    assert cell.local_label == "cu130torch2.13cxx11abiTRUE"
    assert cell.requires_torch == "torch==2.13.*"
    assert cell.cxx_std == "c++20"


def test_local_preset_follows_installed_torch_cuda_or_newest_default() -> None:
    cuda_torch = LocalFacts("3.12", "2.11", "12.8", True, None)
    assert ids("local", cuda_torch) == ["cu128-torch2.11-cxx11abiTRUE-cp312"]
    no_torch = LocalFacts("3.11", None, None, None, None)
    newest = SPEC.newest_torch
    assert ids("local", no_torch) == [
        f"cu{SPEC.torch[newest].index_cuda.replace('.', '')}-torch{newest}-cxx11abiTRUE-cp311"
    ]


def test_ci_preset_is_two_torch_by_two_python_on_one_cuda() -> None:
    cells = select_cells("ci", SPEC, HERE)
    assert len(cells) >= 4
    assert len({c.torch for c in cells}) >= 2 and len({c.python for c in cells}) >= 2
    assert len({c.cuda for c in cells}) == 1
    assert all(c.kernels.name == "ci" for c in cells)


def test_release_preset_only_holds_cells_the_table_allows() -> None:
    cells = select_cells("release", SPEC, HERE)
    assert len(cells) > 50
    for c in cells:
        release = SPEC.torch[c.torch]
        assert release.supports_python(c.python) and c.cuda in release.cuda
        assert c.cxx11abi in release.cxx11abi
    assert len({c.id for c in cells}) == len(cells)


def test_inline_selection_and_spellings() -> None:
    assert ids("torch=2.14,2.11 python=3.11,3.12 cuda=13.0") == [
        "cu130-torch2.11-cxx11abiTRUE-cp311",
        "cu130-torch2.11-cxx11abiTRUE-cp312",
        "cu130-torch2.14-cxx11abiTRUE-cp311",
        "cu130-torch2.14-cxx11abiTRUE-cp312",
    ]
    assert ids("torch=2.13.0 python=cp311 cuda=cu130 cxx11abi=true") == [
        "cu130-torch2.13-cxx11abiTRUE-cp311"
    ]
    # left-out cuda/abi: the torch's index CUDA and pip ABI
    assert ids("torch=2.5 python=3.10") == ["cu124-torch2.5-cxx11abiFALSE-cp310"]
    # a preset with one axis replaced
    assert ids("ci torch=2.13 python=3.12") == ["cu130-torch2.13-cxx11abiTRUE-cp312"]


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
        ("torch==2.13", ["malformed token 'torch==2.13'"]),
        ("torch=2.13 python", ["'python' is not axis=value"]),
        ("torch=2.13,", ["empty value"]),
        ("torch=2.13 torch=2.14", ["given twice"]),
        ("", ["MATRIX is empty", "local, ci, release"]),
        ("torch=2.13 python=3.9", ["rules out", "no wheels for python 3.9", "3.10 to 3.14"]),
        ("torch=2.13 cuda=12.8", ["no CUDA 12.8 build", "12.6, 13.0, 13.2"]),
        ("torch=2.13 cxx11abi=FALSE", ["no cxx11abi=FALSE build", "valid: TRUE"]),
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


def test_table_typos_are_caught(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = MATRIX_TOML.read_text().replace('index_cuda = "13.0"', 'index_cuda = "13.7"', 1)
    bad = tmp_path / "matrix.toml"
    bad.write_text(text)
    with pytest.raises(MatrixError, match="13.7"):
        load_spec(bad)
    tomllib.loads(MATRIX_TOML.read_text())  # the real one parses
