"""The bindings' error messages (csrc/binding/torch_api.h: fa::fail, FA_CHECK, shape_text).

On the H200 machine the stable-ABI module crashed (SIGSEGV inside
std::ostream::_M_insert<long>, reached from shape_text) the first time a message
formatted a number through a C++ stream: a bad k_new shape took the process down
instead of raising. The messages are now built with std::string, std::to_string and
snprintf. These tests compile the header alone (both ABIs, against the torch installed
here, no GPU needed) and check the text numbers, floats, bools, chars and shapes give,
and that no binding source formats through a stream again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDING = ROOT / "csrc" / "binding"

PROGRAM = r"""
#include "torch_api.h"
#include <cstdio>
int main() {
  try {
    FA_CHECK(1 + 1 == 3, "v_new must have shape (batch, seqlen_new, nheads_k, head_dim) = (",
             int64_t(3), ", ", 4, ", ", 2L, ", ", 128u, "), got ", fa::shape_text({3, 4, 1, 128}),
             "; p ", 1.5, " q ", 0.25f, " ", true, " ", 'x', " ", std::string("end"), " ",
             fa::shape_text({}));
  } catch (const std::runtime_error &e) {
    std::fputs(e.what(), stdout);
    return 0;
  }
  return 1;
}
"""

EXPECTED = (
    "flash_attn: v_new must have shape (batch, seqlen_new, nheads_k, head_dim) = (3, 4, 2, 128), "
    "got [3, 4, 1, 128]; p 1.5 q 0.25 true x end []"
)


def _torch_paths() -> tuple[list[str], str, str]:
    """Include flags, library folder and C++ standard (the build's, build_tools.request)."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    from build_tools.request import cxx_std_for

    lib = str(Path(torch.__file__).parent / "lib")
    std = cxx_std_for(torch.__version__)
    return [f"-I{p}" for p in cpp_extension.include_paths()], lib, std


@pytest.mark.parametrize("stable", [1, 0], ids=["stable", "classic"])
def test_messages_format_numbers_without_a_stream(stable: int, tmp_path: Path) -> None:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes, lib, std = _torch_paths()
    src = tmp_path / "messages.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "messages"
    cmd = [cxx, f"-std={std}", "-w", f"-DFLASH_ATTN_STABLE_ABI={stable}", f"-I{BINDING}",
           f"-I{ROOT / 'csrc' / 'kernels'}", *includes, str(src), "-o", str(exe), f"-L{lib}",
           "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == EXPECTED


def test_no_binding_source_formats_through_a_stream() -> None:
    stream = re.compile(r"ostringstream|stringstream|std::cout|std::cerr|\s<<\s")
    for path in sorted(BINDING.iterdir()):
        if path.suffix not in (".h", ".cpp"):
            continue
        hits = [
            f"{path.name}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if stream.search(line) and not line.lstrip().startswith("//")
        ]
        assert not hits, "a C++ stream in the binding (messages use std::string):\n" + "\n".join(
            hits
        )
