"""Publishing: PEP 503 pages with hashes, PEP 658 metadata, manifest, atomic swaps."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import unquote

import pytest
from factory_wheels import make_wheel

from scripts.factory.matrix import Cell, LocalFacts, load_spec, select_cells
from scripts.factory.paths import FactoryPaths
from scripts.factory.pipeline import CellOutcome, RunOptions, run_cells
from scripts.factory.publish import Candidate, PublishConflict, label_variant, publish
from scripts.factory.report import CellReport
from scripts.factory.status import CellStatus
from scripts.factory.torch_releases import Anchors
from scripts.factory.wheelfile import normalize_wheel

REPO = Path(__file__).resolve().parents[2]
V1 = "cu130-torch2.13-cxx11abiTRUE"
V2 = "cu130-torch2.14-cxx11abiTRUE"


def anchors(page: Path) -> list[dict[str, str]]:
    parser = Anchors()
    parser.feed(page.read_text())
    return parser.links


def wheel(tmp: Path, variant: str, python: str = "cp311", payload: bytes = b"x = 1\n") -> Path:
    base, _, content = variant.partition("-torch")
    parts = ("-torch" + content).split("-")[1:]  # torch2.13, cxx11abiTRUE, then segments
    label = base + "".join(parts[:2]) + "".join(f".{s}" for s in parts[2:])
    minor = variant.split("torch")[1].split("-")[0]
    raw = make_wheel(tmp / "raw" / variant / python, version=f"2.9.0+{label}",
                     tag=f"{python}-{python}-linux_x86_64", payload=payload,
                     requires=f"torch=={minor}.*")
    return normalize_wheel(raw, tmp / "final" / variant / python, 1700000000)


def candidate(w: Path, variant: str, python: str = "cp311") -> Candidate:
    return Candidate(f"{variant}-{python}", variant, w, "linux_x86_64: test", "passed")


def test_pep503_tree_with_hashes_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    w1 = wheel(tmp_path, V1)
    w2 = wheel(tmp_path, V1, "cp312")
    w3 = wheel(tmp_path, V2)
    publish(out, [candidate(w1, V1), candidate(w2, V1, "cp312"), candidate(w3, V2)])
    tree = out / "whl"
    root = anchors(tree / V1 / "simple" / "index.html")
    assert [a["href"] for a in root] == ["flash-attn/"]
    links = anchors(tree / V1 / "simple" / "flash-attn" / "index.html")
    assert sorted(unquote(a["href"].split("#")[0]) for a in links) == sorted([w1.name, w2.name])
    for a in links:
        file, _, fragment = a["href"].partition("#")
        path = tree / V1 / "simple" / "flash-attn" / unquote(file)
        assert fragment == "sha256=" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert a["data-requires-python"] == ">=3.9"
        meta = path.with_name(path.name + ".metadata")
        digest = hashlib.sha256(meta.read_bytes()).hexdigest()
        assert a["data-core-metadata"] == a["data-dist-info-metadata"] == f"sha256={digest}"
        assert b"Requires-Dist: torch==2.13.*" in meta.read_bytes()
    # one index per variant: the 2.14 wheel is not on the 2.13 page
    assert all("torch2.14" not in a["href"] for a in links)
    flat = anchors(tree / V1 / "index.html")
    assert all((tree / V1 / unquote(a["href"].split("#")[0])).is_file() for a in flat)
    manifest = json.loads((tree / "manifest.json").read_text())
    assert manifest["variants"] == [V1, V2]
    assert {w["file"] for w in manifest["wheels"]} == {w1.name, w2.name, w3.name}
    for w in manifest["wheels"]:
        assert (tree / w["path"]).stat().st_size == w["size"]
        assert w["smoke"] == "passed"
    table = (tree / "index.html").read_text()
    assert "<table" in table and w3.name in table and f"/whl/{V2}/simple" in table


def tree_files(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out / "whl"): p.read_bytes() for p in (out / "whl").rglob("*")
            if p.is_file()}


def test_a_published_file_never_changes(tmp_path: Path) -> None:
    """Issue 11, item 4: a second wheel of the same name with other bytes is refused,
    naming both sha256, and nothing of that publish lands; the same bytes are a no-op."""
    out = tmp_path / "dist"
    first = wheel(tmp_path / "first", V1)
    other = wheel(tmp_path, V2)
    publish(out, [candidate(first, V1), candidate(other, V2)])
    before = tree_files(out)
    target = (out / "whl").resolve()

    again = publish(out, [candidate(first, V1)])  # the same bytes: nothing to do
    assert len(again) == 2 and tree_files(out) == before

    changed = wheel(tmp_path / "changed", V1, payload=b"x = 2\n")
    assert changed.name == first.name
    new_variant = wheel(tmp_path / "new", V2, "cp312")  # would be fine alone
    with pytest.raises(PublishConflict) as info:
        publish(out, [candidate(new_variant, V2, "cp312"), candidate(changed, V1)])
    message = str(info.value)
    assert hashlib.sha256(first.read_bytes()).hexdigest() in message
    assert hashlib.sha256(changed.read_bytes()).hexdigest() in message
    assert first.name in message and "nothing was published" in message
    assert tree_files(out) == before and (out / "whl").resolve() == target
    assert [p.name for p in (out / ".whl-trees").iterdir()] == [target.name]


def test_a_new_version_of_a_cell_joins_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    old = wheel(tmp_path / "old", V1)
    publish(out, [candidate(old, V1)])
    label = V1.replace("-", "")
    raw = make_wheel(tmp_path / "raw-new", version=f"2.9.1+{label}", tag="cp311-cp311-linux_x86_64")
    new = normalize_wheel(raw, tmp_path / "new", 1700000000)
    entries = publish(out, [candidate(new, V1)])
    assert sorted(e.file for e in entries) == sorted([old.name, new.name])
    page = (out / "whl" / V1 / "simple" / "flash-attn" / "index.html").read_text()
    assert old.name in page and new.name in page


def test_a_wheel_goes_only_into_the_variant_its_label_names(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    ci = wheel(tmp_path, V2 + "-ci")  # 2.9.0+cu130torch2.14cxx11abiTRUE.ci
    assert "cxx11abiTRUE.ci-" in ci.name or "cxx11abitrue.ci-" in ci.name
    with pytest.raises(PublishConflict, match="names variant cu130-torch2.14-cxx11abiTRUE-ci"):
        publish(out, [candidate(ci, V2)])  # into the release index: refused
    assert not (out / "whl").exists()
    entries = publish(out, [candidate(ci, V2 + "-ci")])
    assert [e.variant for e in entries] == [V2 + "-ci"]
    assert label_variant("2.9.0+cu130torch2.14cxx11abiTRUE") == V2
    assert label_variant("2.9.0+cu130torch2.14cxx11abitrue.ci.sm80sm90") == V2 + "-ci-sm80sm90"
    assert label_variant("2.9.0") is None


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_publish_leaves_the_old_tree_whole(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "dist"
    first = wheel(tmp_path, V1)
    publish(out, [candidate(first, V1)])
    before = {p.relative_to(out / "whl"): p.read_bytes()
              for p in (out / "whl").rglob("*") if p.is_file()}
    target = (out / "whl").resolve()

    def fail(generation: Path) -> None:
        raise error

    with pytest.raises(type(error)):
        publish(out, [candidate(wheel(tmp_path, V2), V2)], hook=fail)
    after = {p.relative_to(out / "whl"): p.read_bytes()
             for p in (out / "whl").rglob("*") if p.is_file()}
    assert after == before
    assert (out / "whl").resolve() == target
    assert [p.name for p in (out / ".whl-trees").iterdir()] == [target.name]
    assert not list(out.glob(".whl-link-*"))


def test_a_refused_publish_fails_the_cells_rows_not_the_run(tmp_path: Path) -> None:
    """`make wheels` over a tree that holds other bytes under a wheel's name: the rows
    say failed (publish) with the reason, the report is still written, nothing lands."""
    spec = load_spec()
    text = "torch=2.13 python=3.11 cuda=13.0 binding=classic"
    cell = select_cells(text, spec, LocalFacts("3.11"))[0]
    assert cell.variant == V1
    paths = FactoryPaths(REPO, tmp_path / "work", tmp_path / "dist", tmp_path / "cache")
    publish(paths.out, [candidate(wheel(tmp_path / "first", V1), V1)])
    before = tree_files(paths.out)
    changed = wheel(tmp_path / "changed", V1, payload=b"x = 3\n")

    def runner(c: Cell) -> CellOutcome:
        report = CellReport(cell=c.id, status=CellStatus.BUILT)
        return CellOutcome(report, Candidate(c.id, c.variant, changed, "test", "passed"))

    rows = run_cells([cell], spec, paths, RunOptions(), lambda _: None, runner)
    assert rows[0].status_text == "failed (publish)"
    assert "publish refused, nothing was published" in rows[0].note
    assert tree_files(paths.out) == before
