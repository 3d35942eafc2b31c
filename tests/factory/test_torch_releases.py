"""The torch table comes from the torch wheels' own metadata: the rules (torch_metadata),
the index reader (a synthetic index served from memory: which release of each minor,
byte ranges instead of whole wheels), the rewrite of the generated block, and, when the
package index can be reached, the committed table against it (CI runs this check)."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from scripts.factory.errors import FactoryError
from scripts.factory.http_zip import RemoteZip
from scripts.factory.matrix import MATRIX_TOML, load_spec
from scripts.factory.torch_metadata import (
    abi_from_files,
    cuda_from_requires,
    cxx_std_from_cmake,
    facts_from_files,
    python_range,
)
from scripts.factory.torch_releases import (
    BEGIN,
    END,
    IndexFile,
    IndexSource,
    committed_rows,
    compare,
    read_index,
    refresh,
    releases,
)

OLD_CMAKE = 'set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=0")\nset_property(CXX_STANDARD 17)\n'
NEW_CMAKE = "target_compile_features(torch INTERFACE cxx_std_20)\n"
NEW_INIT = (
    'def compiled_with_cxx11_abi() -> builtins.bool:\n    r"""Returns whether PyTorch was '
    'built with _GLIBCXX_USE_CXX11_ABI=1"""\n    return True\n'
)


def metadata(version: str, requires_python: str, requires: list[str]) -> str:
    lines = ["Metadata-Version: 2.4", "Name: torch", f"Version: {version}"]
    lines += [f"Requires-Python: {requires_python}"] if requires_python else []
    lines += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n\nRequires-Dist: not-a-header (the description)\n"


def torch_wheel(version: str, cuda: str, new_style: bool, padding: int = 1 << 21) -> bytes:
    """A torch-like wheel: the members the rules read, behind `padding` bytes of payload."""
    major, minor = cuda.split(".")
    requires = (
        [f'cuda-toolkit[cudart,nvrtc]=={cuda}.2; platform_system == "Linux"']
        if new_style
        else [f"nvidia-cuda-runtime-cu{major} (=={cuda}.105) ; platform_system == 'Linux'"]
    )
    members = {
        "torch/lib/libtorch_cuda.so": os.urandom(padding),  # incompressible, never read
        "torch/version.py": f"__version__ = '{version}'\ncuda: Optional[str] = '{cuda}'\n",
        "torch/share/cmake/Torch/TorchConfig.cmake": NEW_CMAKE if new_style else OLD_CMAKE,
        "torch/__init__.py": NEW_INIT if new_style else "def compiled_with_cxx11_abi(): ...\n",
        f"torch-{version}.dist-info/METADATA": metadata(
            version, ">=3.10" if new_style else ">=3.8.0", ["filelock", *requires]
        ),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class FakeIndex:
    """A PEP 691 project page and its files, served from memory; counts what is read."""

    def __init__(self, files: dict[str, bytes], core_metadata: bool = False):
        self.files = files
        self.core_metadata = core_metadata
        self.fetched = 0
        self.source = IndexSource("https://index.test/simple", get=self.get, fetch=self.fetch)

    def url(self, name: str) -> str:
        return f"https://files.test/{name}"

    def get(self, url: str, accept: str) -> tuple[str, bytes]:
        if url == self.source.page:
            entries = [
                {
                    "filename": name,
                    "url": self.url(name),
                    "size": len(data),
                    **({"core-metadata": True} if self.core_metadata else {}),
                }
                for name, data in self.files.items()
            ]
            body = json.dumps({"meta": {"api-version": "1.1"}, "files": entries}).encode()
            return "application/vnd.pypi.simple.v1+json", body
        name = url.rsplit("/", 1)[-1].removesuffix(".metadata")
        with zipfile.ZipFile(io.BytesIO(self.files[name])) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            return "application/octet-stream", zf.read(meta)

    def fetch(self, url: str, start: int, end: int) -> bytes:
        self.fetched += end - start
        return self.files[url.rsplit("/", 1)[-1]][start:end]


def names(version: str, pythons: list[str], plat: str = "manylinux_2_28_x86_64") -> list[str]:
    return [f"torch-{version}-{py}-{py}-{plat}.whl" for py in pythons]


def test_rules_read_each_fact_from_the_file_that_states_it() -> None:
    old = cuda_from_requires(["nvidia-cuda-runtime-cu12 (==12.1.105) ; platform_system == 'L'"])
    assert old is not None and old.value == "12.1" and "12.1.105" in old.evidence
    new = cuda_from_requires(["filelock", "cuda-toolkit[cublas,cudart]==13.2.2; x", "triton"])
    assert new is not None and new.value == "13.2" and "cuda-toolkit" in new.evidence
    assert cuda_from_requires(["filelock", "sympy>=1.13"]) is None  # a CPU build
    assert abi_from_files(OLD_CMAKE, None).value == "FALSE"
    abi = abi_from_files(NEW_CMAKE, NEW_INIT)
    assert abi.value == "TRUE" and "compiled_with_cxx11_abi() returns True" in abi.evidence
    with pytest.raises(FactoryError, match="C\\+\\+11 ABI"):
        abi_from_files(NEW_CMAKE, "def compiled_with_cxx11_abi(): return _C.flag\n")
    assert cxx_std_from_cmake(OLD_CMAKE).value == "c++17"
    assert cxx_std_from_cmake(NEW_CMAKE).value == "c++20"
    low, high = python_range(">=3.11", ["cp310", "cp311", "cp312", "cp315"])
    assert (low.value, high.value) == ("3.11", "3.15") and "Requires-Python" in low.evidence
    low, _ = python_range(">=3.8.0", ["cp39", "cp310"])  # no cp38 wheel: 3.9
    assert low.value == "3.9" and low.evidence == "cp39 wheel"


def test_version_py_must_agree_with_the_pinned_runtime() -> None:
    files = {
        ".dist-info/METADATA": metadata("2.20.0", ">=3.11", ["cuda-toolkit==13.2.2"]),
        "torch/version.py": "cuda: Optional[str] = '13.0'\n",
        "torch/share/cmake/Torch/TorchConfig.cmake": NEW_CMAKE,
        "torch/__init__.py": NEW_INIT,
    }
    with pytest.raises(FactoryError, match="13.2.*version.py says cuda = '13.0'"):
        facts_from_files(files.get, ["cp311"], "t.whl")


def test_the_newest_final_release_of_each_minor_and_its_highest_build() -> None:
    files = [
        *names("2.14.0", ["cp310", "cp311"]),
        *names("2.14.1", ["cp310", "cp311"]),
        "torch-2.14.1-cp313-cp313t-manylinux_2_28_x86_64.whl",  # free-threaded: not counted
        *names("2.14.1", ["cp311"], "manylinux_2_28_aarch64"),
        *names("2.15.0rc1", ["cp311"]),
        *names("2.15.0", ["cp311", "cp312"]),
        "torch-2.15.0-2-cp312-cp312-manylinux_2_28_x86_64.whl",  # re-uploaded, build 2
        *names("2.2.2", ["cp311"]),  # before `since`
        "torch-2.16.0.tar.gz",
    ]
    index = [IndexFile(n, f"https://f.test/{n}") for n in files]
    index.append(IndexFile("torch-2.16.0-cp312-cp312-manylinux_2_28_x86_64.whl", "u", yanked=True))
    found = {r.minor: r for r in releases(index, "torch", since="2.3")}
    assert sorted(found) == ["2.14", "2.15"]
    assert found["2.14"].version == "2.14.1" and found["2.14"].python_tags == ("cp310", "cp311")
    assert found["2.15"].version == "2.15.0"
    assert [w.filename for w in found["2.15"].wheels] == [
        "torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch-2.15.0-2-cp312-cp312-manylinux_2_28_x86_64.whl",
    ]


@pytest.mark.parametrize("core_metadata", [False, True])
def test_a_wheel_is_read_by_byte_ranges_not_whole(core_metadata: bool) -> None:
    wheels = {
        **{n: torch_wheel("2.7.1", "12.6", new_style=False) for n in names("2.7.1", ["cp39"])},
        **{n: torch_wheel("2.15.0", "13.2", True) for n in names("2.15.0", ["cp311", "cp315"])},
    }
    index = FakeIndex(wheels, core_metadata)
    facts = {f.minor: f for f in read_index(index.source, since="2.3", workers=2)}
    old, new = facts["2.7"], facts["2.15"]
    assert (old.version, old.python_range, old.index_cuda and old.index_cuda.value) == (
        "2.7.1",
        ("3.9", "3.9"),
        "12.6",
    )
    assert (old.cxx11abi.value, old.cxx_std.value) == ("FALSE", "c++17")
    assert (new.python_range, new.cxx11abi.value, new.cxx_std.value) == (
        ("3.11", "3.15"),
        "TRUE",
        "c++20",
    )
    assert new.index_cuda is not None and new.index_cuda.value == "13.2"
    read_two = 2 * len(next(iter(wheels.values())))  # the two wheels read, whole
    assert index.fetched < read_two / 4, (index.fetched, read_two)  # byte ranges only


def test_a_server_without_ranges_is_refused_not_downloaded() -> None:
    data = torch_wheel("2.15.0", "13.2", True, padding=1 << 16)

    def whole_file(url: str, start: int, end: int) -> bytes:
        return data  # what a server that ignores Range sends: everything

    with pytest.raises(FactoryError, match="asked for bytes"):
        RemoteZip("https://f.test/t.whl", len(data), whole_file).read_text("torch/version.py")


def small_matrix(tmp_path: Path, stale: str) -> Path:
    path = tmp_path / "matrix.toml"
    path.write_text(
        "# hand-kept above\n[torch_index]\nurl = \"https://index.test/simple\"\n"
        f'since = "2.14"\n\n{BEGIN}\n{stale}{END}\n\n# hand-kept below\n[presets.x]\n'
    )
    return path


def test_refresh_rewrites_only_the_generated_block_and_check_names_what_differs(
    tmp_path: Path,
) -> None:
    wheels = {
        **{n: torch_wheel("2.14.1", "13.0", True, 1 << 12) for n in names("2.14.1", ["cp311"])},
        **{n: torch_wheel("2.15.0", "13.2", True, 1 << 12) for n in names("2.15.0", ["cp311"])},
    }
    index = FakeIndex(wheels)
    stale = (
        '[torch."2.13"]\nversion = "2.13.0"\npython = ["3.10", "3.14"]\nindex_cuda = "13.0"\n'
        'cxx11abi = "TRUE"\ncxx_std = "c++20"\n'
        '[torch."2.14"]\nversion = "2.14.0"\npython = ["3.11", "3.11"]\nindex_cuda = "13.0"\n'
        'cxx11abi = "TRUE"\ncxx_std = "c++20"\n'
    )
    path = small_matrix(tmp_path, stale)
    before = path.read_text()
    checked = refresh(path, index.source, "2.14", check=True)
    assert path.read_text() == before and not checked.written
    said = [str(d) for d in checked.comparison.differences]
    assert said == [
        "torch 2.13: in the table, not on the index",
        "torch 2.14: version is '2.14.0' in the table, '2.14.1' on the index",
        "torch 2.15: 2.15.0 is on the index, not in the table",
    ]
    done = refresh(path, index.source, "2.14", check=False)
    assert done.written and done.comparison.differences == checked.comparison.differences
    after = path.read_text()
    head, tail = before.split(BEGIN)[0], before.split(END)[1]
    assert after.startswith(head) and after.endswith(tail)
    rows = committed_rows(path)
    assert sorted(rows) == ["2.14", "2.15"] and rows["2.15"]["index_cuda"] == "13.2"
    assert "# Requires-Dist cuda-toolkit[cudart,nvrtc]==13.2.2" in after  # says from what
    assert refresh(path, index.source, "2.14", check=True).comparison.same


def _index_reachable(url: str) -> str:
    """'' when the index answers within a few seconds, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read(1)
        return ""
    except OSError as e:
        return f"{url} cannot be reached ({e})"


def test_committed_table_matches_the_package_index() -> None:
    """CI's check: every release the index has is in the table, with the same facts."""
    spec = load_spec()
    source = IndexSource(spec.torch_index.url, spec.torch_index.project)
    why = _index_reachable(source.page)
    if why:
        pytest.skip(f"{why}: the torch table is not compared with the index here")
    start = time.perf_counter()
    fresh = read_index(source, spec.torch_index.since)
    took = time.perf_counter() - start
    differences = compare(committed_rows(MATRIX_TOML), fresh).differences
    assert not differences, (
        f"{MATRIX_TOML} differs from {source.page}; run `make refresh-matrix`:\n  "
        + "\n  ".join(map(str, differences))
    )
    assert took < 30, f"reading the index took {took:.1f} s"
