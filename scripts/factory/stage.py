"""Stage a cell's sources: a clean copy of what a wheel is built from, one per cell.

Each cell builds in its own copy so cells never share setuptools' build directory,
a stale in-place flash_attn/_C*.so never lands in a wheel, and a rebuild sees the
same paths (part of a bit-identical rebuild). Kernel objects are not copied: the
shared object cache (FLASH_ATTN_OBJECT_CACHE) serves every cell.

csrc/ is a symlink to the checkout's own csrc/, not a copy: nvcc derives the names of
anonymous namespaces (and with them the code layout) from the absolute path of the
source it compiles, while the object cache's key is path-independent. Compiling every
kernel from the one real path (build_tools resolves symlinks) makes an object the same
whichever cell, or `make build`, put it into the cache, so a wheel's bytes do not
depend on the cache's history.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# what a wheel is built from (setup.py's inputs); anything else stays out
SOURCE_FILES = (
    "setup.py",
    "pyproject.toml",
    "README.md",
    "flash_attn_interface.py",
    "recipes/stable_abi.json",  # build_tools/request.py: the stable binding's floors
)
SOURCE_DIRS = ("flash_attn", "build_tools")
LINKED_DIRS = ("csrc",)
_IGNORE = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.pyc", "*.egg-info")


def stage_sources(repo: Path, dest: Path) -> Path:
    """Replace dest with a fresh copy of the build inputs; returns dest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, dest / name)
    for name in SOURCE_DIRS:
        shutil.copytree(repo / name, dest / name, ignore=_IGNORE)
    for name in LINKED_DIRS:
        (dest / name).symlink_to((repo / name).resolve(), target_is_directory=True)
    return dest
