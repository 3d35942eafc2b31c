"""Synthetic wheels for the factory's tests (no compiler needed)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from scripts.factory.wheelfile import record_hash


def make_wheel(
    out_dir: Path,
    version: str = "2.9.0+cu130torch2.13cxx11abitrue",
    tag: str = "cp311-cp311-linux_x86_64",
    payload: bytes = b"print('hi')\n",
    reverse: bool = False,
    date: tuple[int, int, int, int, int, int] = (2024, 5, 6, 7, 8, 9),
    requires: str = "torch==2.13.*",
) -> Path:
    """A minimal wheel as setuptools writes it (entries in the given order and time)."""
    info = f"flash_attn-{version}.dist-info"
    files = {
        "flash_attn/__init__.py": payload,
        f"flash_attn/_C.{'abi3' if '-abi3-' in tag else 'cpython-311-x86_64-linux-gnu'}.so": (
            b"\x7fELF fake"
        ),
        "flash_attn_interface.py": b"from flash_attn import *\n",
        f"{info}/METADATA": (
            "Metadata-Version: 2.4\nName: flash-attn\n"
            f"Version: {version}\nRequires-Python: >=3.9\n"
            f"Requires-Dist: {requires}\n\n# flash-attn\n"
        ).encode(),
        f"{info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n"
        ).encode(),
    }
    record = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"flash_attn-{version}-{tag}.whl"
    names = list(files)[::-1] if reverse else list(files)
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(zipfile.ZipInfo(name, date_time=date), files[name])
    return path
