"""Stable cells: planned from the floor in recipes/stable_abi.json, built from a request
file alone, smoke data in recipes/matrix.toml, published into one variant index."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from factory_wheels import make_wheel

from build_tools.request import REQUEST_ENV, BuildRequest, StableAbi
from scripts.factory.build import REQUEST_OWNED, build_env, write_request
from scripts.factory.errors import MatrixError
from scripts.factory.matrix import (
    LocalFacts,
    MatrixSpec,
    load_spec,
    select_cells,
    selection_of_id,
    stable_build_cuda,
)
from scripts.factory.publish import Candidate, PublishConflict, publish
from scripts.factory.smoke_stable import foreign_symbols
from scripts.factory.wheelfile import normalize_wheel

SPEC = load_spec()
ABI = StableAbi.load()
HERE = LocalFacts("3.11", "2.13", None, True, "13.0")


def test_the_floor_splits_the_release_matrix() -> None:
    cells = select_cells("release", SPEC, HERE)
    stable = [c for c in cells if c.stable]
    classic = [c for c in cells if not c.stable]
    assert all(ABI.serves(c.torch) is False for c in classic) and classic
    # one stable cell per CUDA major that any torch from the floor on is built for
    majors = {
        int(cuda.split(".")[0])
        for m in SPEC.table_torch
        if ABI.serves(m)
        for cuda in SPEC.torch[m].cuda
    }
    assert sorted(int(c.cuda.split(".")[0]) for c in stable) == sorted(majors)
    for c in stable:
        assert c.torch == ABI.torch_floor and c.python == SPEC.stable.build_python
        assert c.cuda == stable_build_cuda(SPEC, int(c.cuda.split(".")[0]))
        assert c.requires_torch == ABI.requirement and c.wheel_tags == (ABI.abi3_tag, "abi3")
        assert c.id == f"cu{c.cuda.split('.')[0]}-torchstable-abi3"
        (back,) = select_cells(selection_of_id(c.id, SPEC), SPEC, HERE)
        assert (back.id, back.cuda, back.torch, back.python, back.kernels) == (
            c.id,
            c.cuda,
            c.torch,
            c.python,
            c.kernels,
        )


def test_a_floor_moved_in_the_data_moves_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor is data (recipes/stable_abi.json), not code."""
    from dataclasses import replace

    later = replace(SPEC, stable=replace(SPEC.stable, abi=StableAbi("2.12", "3.10")))
    spec: MatrixSpec = later
    (cell,) = [c for c in select_cells("ci", spec, HERE) if c.stable]
    assert cell.torch == "2.12" and cell.requires_torch == "torch>=2.12"
    below = select_cells("torch=2.11 python=3.11 cuda=13.0", spec, HERE)
    assert [c.id for c in below] == ["cu130-torch2.11-cxx11abiTRUE-cp311"]


def test_local_with_a_torch_past_the_floor_is_one_stable_cell() -> None:
    (cell,) = select_cells("local", SPEC, HERE)
    assert cell.stable and (cell.torch, cell.python, cell.cuda) == ("2.13", "3.11", "13.0")
    assert cell.variant == "cu13-torchstable" and cell.local_label == "cu13torchstable"


def test_the_smoke_pairs_are_data_and_checked(tmp_path: Path) -> None:
    pairs = [(p.torch, p.python) for p in SPEC.stable.smoke]
    assert len({t for t, _ in pairs}) >= 3 and len({p for _, p in pairs}) >= 3
    assert SPEC.newest_torch in {t for t, _ in pairs}
    text = (Path(SPEC.source)).read_text()
    bad = tmp_path / "matrix.toml"
    bad.write_text(
        text.replace('{ torch = "2.11", python = "3.10" }', '{ torch = "2.9", python = "3.10" }')
    )
    with pytest.raises(MatrixError, match="torch '2.9' is not a torch the stable wheel serves"):
        load_spec(bad)
    bad.write_text(
        text.replace('{ torch = "2.15", python = "3.13" }', '{ torch = "2.15", python = "3.10" }')
    )
    with pytest.raises(MatrixError, match="torch 2.15 has no wheels for python '3.10'"):
        load_spec(bad)


def test_the_request_file_is_the_whole_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cell,) = select_cells("ci", SPEC, HERE)
    path = write_request(cell, tmp_path / "cell")
    request = BuildRequest.read(path)
    assert request == cell.request()
    assert (request.binding, request.local_label, request.torch_requirement) == (
        "stable",
        "cu13torchstable.ci",
        "torch>=2.10",
    )
    assert (request.archs, request.head_dims, request.dtypes) == ("90", "64,128", "fp16,bf16")
    # what the machine exports cannot change the build: the request alone says what
    for name in REQUEST_OWNED:
        monkeypatch.setenv(name, "from-the-machine")
    env = build_env(path, None, tmp_path / "cache", 1700000000)
    assert env[REQUEST_ENV] == str(path.resolve())
    assert not any(env.get(name) == "from-the-machine" for name in REQUEST_OWNED)
    classic = select_cells("ci binding=classic torch=2.13 python=3.11", SPEC, HERE)[0]
    assert json.loads(classic.request().to_json())["torch_requirement"] == "torch==2.13.*"


def test_foreign_symbols_are_what_the_stable_abi_does_not_allow() -> None:
    stable = [
        "aoti_torch_empty_strided",
        "torch_call_dispatcher",
        "PyModule_Create2",
        "__gmon_start__",
        "memcpy@GLIBC_2.14",
        "cudaLaunchKernel@libcudart.so.13",
    ]
    assert foreign_symbols(stable) == []
    classic = [*stable, "_ZN3c1019UndefinedTensorImpl10_singletonE", "_ZN2at4_ops5empty4callE"]
    assert foreign_symbols(classic) == sorted(classic[-2:])


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v or "" for k, v in attrs if k == "href"]


def test_the_stable_wheel_has_one_variant_index(tmp_path: Path) -> None:
    (cell,) = select_cells("local", SPEC, HERE)
    raw = make_wheel(
        tmp_path / "raw", "2.9.0+cu13torchstable", "cp310-abi3-linux_x86_64", requires="torch>=2.10"
    )
    wheel = normalize_wheel(raw, tmp_path / "final", 1700000000)
    out = tmp_path / "dist"
    publish(out, [Candidate(cell.id, cell.variant, wheel, "linux_x86_64: test", "passed")])
    page = out / "whl" / "cu13-torchstable" / "simple" / "flash-attn" / "index.html"
    links = _Links()
    links.feed(page.read_text())
    assert [unquote(h.split("#")[0]) for h in links.hrefs] == [wheel.name]
    manifest = json.loads((out / "whl" / "manifest.json").read_text())
    assert [w["file"] for w in manifest["wheels"]] == [wheel.name]
    # the stable wheel never goes into a classic variant's index
    with pytest.raises(PublishConflict, match="names variant cu13-torchstable"):
        publish(out, [Candidate("x", "cu130-torch2.13-cxx11abiTRUE", wheel, "t", "passed")])
