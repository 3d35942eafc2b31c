"""Publish: add smoke-tested wheels to the static tree, atomically.

The tree `<out>/whl` is a symlink to one complete generation under
`<out>/.whl-trees/`. A publish builds the next generation aside (the previous
one's files hard-linked, the new wheels and their `.metadata` added, every page
and manifest.json rewritten, every hash verified) and then swaps the symlink
with one rename. A reader sees the old tree or the new one, never half of one;
a failure leaves the old tree as it was and removes what it wrote.

A published file never changes, as on a real package index: a wheel whose name is
already published with other bytes is refused (both sha256 named), and then nothing of
that publish is published; the same bytes again are a no-op. Older wheels stay. A wheel
goes only into the variant its version label names (the release kernel set's plain
label into the plain variant; any other kernel contents carry their own segment).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from build_tools.cache import atomic_write_bytes, atomic_write_text

from .errors import FactoryError
from .index import PROJECT, Entry, find_links_page, project_page, simple_root, table_page
from .wheelfile import read_wheel_info

MANIFEST = "manifest.json"
TREES = ".whl-trees"
KEEP_GENERATIONS = 2


@dataclass(frozen=True)
class Candidate:
    """A wheel that passed the smoke gate, ready to publish."""

    cell: str
    variant: str
    wheel: Path
    platform_reason: str
    smoke: str


class PublishConflict(FactoryError):
    """A wheel name already published with other bytes."""


_LABEL_RE = re.compile(r"^cu(\d+)torch(\d+\.\d+)cxx11abi(true|false)((?:\.[a-z0-9]+)*)$", re.I)


def label_variant(version: str) -> str | None:
    """The variant a version's local label names: 2.9.0+cu130torch2.14cxx11abiTRUE.ci ->
    cu130-torch2.14-cxx11abiTRUE-ci (matrix.Cell.variant and .local_label, read back);
    None for a version without such a label."""
    m = _LABEL_RE.match(version.partition("+")[2])
    if m is None:
        return None
    segments = [s for s in m.group(4).lower().split(".") if s]
    base = f"cu{m.group(1)}-torch{m.group(2)}-cxx11abi{m.group(3).upper()}"
    return "-".join([base, *segments])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(tree: Path) -> list[Entry]:
    path = tree / MANIFEST
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [Entry.from_dict(d) for d in data.get("wheels", [])]


def _entry(c: Candidate) -> tuple[Entry, bytes]:
    info = read_wheel_info(c.wheel)
    return (
        Entry(
            cell=c.cell,
            variant=c.variant,
            file=c.wheel.name,
            sha256=sha256_file(c.wheel),
            size=c.wheel.stat().st_size,
            version=info.version,
            requires_python=info.requires_python,
            requires_dist=info.requires_dist,
            metadata_sha256=hashlib.sha256(info.metadata).hexdigest(),
            platform=info.tags.platform,
            platform_reason=c.platform_reason,
            smoke=c.smoke,
        ),
        info.metadata,
    )


def _copy_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=False, copy_function=link)


def render(tree: Path, entries: list[Entry]) -> None:
    """Write every page of a tree from its entries (files already in place).

    Pages are replaced by rename, never rewritten in place: the files of a new
    generation start as hard links to the previous one's."""
    variants = sorted({e.variant for e in entries})
    for variant in variants:
        mine = [e for e in entries if e.variant == variant]
        base = tree / variant
        (base / "simple" / PROJECT).mkdir(parents=True, exist_ok=True)
        atomic_write_text(base / "simple" / "index.html", simple_root(variant))
        atomic_write_text(base / "simple" / PROJECT / "index.html", project_page(variant, mine))
        atomic_write_text(base / "index.html", find_links_page(variant, mine))
    atomic_write_text(tree / "index.html", table_page(entries))
    manifest = {
        "project": PROJECT,
        "variants": variants,
        "wheels": [e.to_dict() for e in sorted(entries, key=lambda e: (e.variant, e.file))],
    }
    atomic_write_text(tree / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def verify(tree: Path, entries: list[Entry]) -> None:
    for e in entries:
        wheel = tree / e.path
        if not wheel.is_file() or sha256_file(wheel) != e.sha256:
            raise FactoryError(f"publish: {wheel} is missing or does not match its sha256")
        meta = wheel.with_name(wheel.name + ".metadata")
        if not meta.is_file() or hashlib.sha256(meta.read_bytes()).hexdigest() != e.metadata_sha256:
            raise FactoryError(f"publish: {meta} is missing or does not match its sha256")


def _swap(out: Path, generation: Path) -> None:
    """Point out/whl at generation with one rename (a symlink replaced atomically)."""
    link = out / "whl"
    if link.exists() and not link.is_symlink():  # a plain directory from elsewhere
        link.rename(out / TREES / f"moved-{time.time_ns()}")
    tmp_link = out / f".whl-link-{os.getpid()}-{time.time_ns()}"
    tmp_link.symlink_to(Path(TREES) / generation.name)
    os.replace(tmp_link, link)


def _prune(out: Path, keep: Path) -> None:
    trees = sorted(
        (p for p in (out / TREES).iterdir() if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
    )
    for old in trees[: max(0, len(trees) - (KEEP_GENERATIONS - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _check_candidates(out: Path, published: list[Entry], new: list[Entry]) -> list[Entry]:
    """The entries to add: refuses a wheel outside the variant its label names and a
    published name with other bytes; drops what is published already, byte for byte."""
    problems: list[str] = []
    by_path = {e.path: e for e in published}
    seen: dict[str, Entry] = {}
    adding: list[Entry] = []
    for e in new:
        named = label_variant(e.version)
        if named is not None and named != e.variant:
            problems.append(
                f"{e.file}: its version label names variant {named}, not {e.variant}; a "
                "wheel goes only into the index of its own label"
            )
            continue
        old = by_path.get(e.path) or seen.get(e.path)
        if old is None:
            seen[e.path] = e
            adding.append(e)
        elif old.sha256 != e.sha256:
            problems.append(
                f"{e.variant}/{e.file} is published with other bytes: published sha256 "
                f"{old.sha256}, this wheel's sha256 {e.sha256}"
            )
    if problems:
        raise PublishConflict(
            "publish refused, nothing was published:\n  "
            + "\n  ".join(problems)
            + f"\na published file never changes (as on a package index): bump the version "
            f"(flash_attn/__init__.py), or publish into another tree (--out DIR), or, for a "
            f"tree only you use, remove it first (rm -r {out / 'whl'} {out / TREES})"
        )
    return adding


def publish(
    out: Path, candidates: list[Candidate], hook: Callable[[Path], None] | None = None
) -> list[Entry]:
    """Add candidates (a name already published with the same bytes is left as it is;
    with other bytes, PublishConflict and nothing changes); returns the tree's entries.

    hook(generation) runs after the generation is written and before the swap (tests
    use it to plant a failure)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / TREES).mkdir(exist_ok=True)
    current = out / "whl"
    new = [(c, *_entry(c)) for c in candidates]
    published = load_manifest(current) if current.is_dir() else []
    adding = {id(e) for e in _check_candidates(out, published, [e for _, e, _ in new])}
    if not adding and current.is_dir():
        return published  # every wheel is published already, byte for byte
    generation = out / TREES / f"gen-{time.time_ns()}-{os.getpid()}"
    try:
        if current.is_dir():
            _copy_tree(current.resolve(), generation)
        else:
            generation.mkdir()
        entries = load_manifest(generation)
        for c, entry, metadata in new:
            if id(entry) not in adding:
                continue
            dest = generation / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)  # never write through a hard link
            shutil.copy2(c.wheel, dest)
            atomic_write_bytes(dest.with_name(dest.name + ".metadata"), metadata)
            entries.append(entry)
        render(generation, entries)
        verify(generation, entries)
        if hook is not None:
            hook(generation)
        _swap(out, generation)
    except BaseException:
        shutil.rmtree(generation, ignore_errors=True)
        for stray in out.glob(".whl-link-*"):
            stray.unlink(missing_ok=True)
        raise
    _prune(out, generation)
    return entries
