"""Render the published tree's pages from its manifest (pure functions, no I/O).

Per variant: a PEP 503 simple index (`<variant>/simple/flash-attn/`, links with
`#sha256=`, `data-requires-python`, PEP 658/714 `data-dist-info-metadata` and
`data-core-metadata` for the `.metadata` files beside the wheels) and a flat
find-links page (`<variant>/index.html`). At the top, `index.html`, a table a
person reads, with the pip command of each variant.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

PROJECT = "flash-attn"  # PEP 503 normalized name


@dataclass(frozen=True)
class Entry:
    """One published wheel (a manifest.json row)."""

    cell: str
    variant: str
    file: str
    sha256: str
    size: int
    version: str
    requires_python: str
    requires_dist: tuple[str, ...]
    metadata_sha256: str
    platform: str
    platform_reason: str
    smoke: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["requires_dist"] = list(self.requires_dist)
        data["path"] = self.path
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        fields["requires_dist"] = tuple(fields["requires_dist"])
        return cls(**fields)

    @property
    def path(self) -> str:
        """Where the wheel lies, relative to the tree's top."""
        return f"{self.variant}/simple/{PROJECT}/{self.file}"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta name="pypi:repository-version" '
        f'content="1.0">\n<title>{html.escape(title)}</title>\n</head>\n<body>\n'
        f"{body}</body>\n</html>\n"
    )


def _anchor(e: Entry, href_prefix: str = "") -> str:
    attrs = f'href="{href_prefix}{quote(e.file)}#sha256={e.sha256}"'
    if e.requires_python:
        attrs += f' data-requires-python="{html.escape(e.requires_python, quote=True)}"'
    attrs += f' data-dist-info-metadata="sha256={e.metadata_sha256}"'
    attrs += f' data-core-metadata="sha256={e.metadata_sha256}"'
    return f"<a {attrs}>{html.escape(e.file)}</a><br>\n"


def simple_root(variant: str) -> str:
    return _page(f"Simple index: {variant}", f'<a href="{PROJECT}/">{PROJECT}</a><br>\n')


def project_page(variant: str, entries: list[Entry]) -> str:
    body = f"<h1>Links for {PROJECT} ({html.escape(variant)})</h1>\n"
    body += "".join(_anchor(e) for e in sorted(entries, key=lambda e: e.file))
    return _page(f"Links for {PROJECT}", body)


def find_links_page(variant: str, entries: list[Entry]) -> str:
    body = f"<h1>{PROJECT} wheels for {html.escape(variant)} (pip --find-links)</h1>\n"
    body += "".join(
        _anchor(e, href_prefix=f"simple/{PROJECT}/") for e in sorted(entries, key=lambda e: e.file)
    )
    return _page(f"{PROJECT} {variant}", body)


def table_page(entries: list[Entry]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: (e.variant, e.file)):
        cmd = f"pip install {PROJECT} --index-url &lt;this site&gt;/whl/{e.variant}/simple"
        rows.append(
            "<tr>"
            f"<td>{html.escape(e.variant)}</td>"
            f'<td><a href="{quote(e.path)}">{html.escape(e.file)}</a></td>'
            f"<td>{html.escape(e.version)}</td>"
            f"<td>{html.escape(e.platform)}</td>"
            f"<td>{e.size / 2**20:.1f} MiB</td>"
            f"<td>{html.escape(e.smoke)}</td>"
            f"<td><code>{e.sha256[:16]}</code></td>"
            f"<td><code>{cmd}</code></td>"
            "</tr>\n"
        )
    body = (
        f"<h1>{PROJECT} wheels</h1>\n<p>One pip index per variant (CUDA, torch minor, C++ ABI): "
        "pick the one that matches your torch (<code>python -m scripts.factory doctor</code> "
        "says which). Every wheel here passed the smoke gate.</p>\n"
        '<table border="1">\n<tr><th>variant</th><th>file</th><th>version</th>'
        "<th>platform</th><th>size</th><th>smoke</th><th>sha256</th><th>install</th></tr>\n"
        + "".join(rows)
        + '</table>\n<p><a href="manifest.json">manifest.json</a></p>\n'
    )
    return _page(f"{PROJECT} wheels", body)
