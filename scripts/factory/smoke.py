"""Smoke gate: a wheel is published only after it works in a fresh venv with exactly its torch.

The smoke venv holds the wheel and nothing else; it sees the toolchain's environment (the
cell's torch, where the toolchain installed it) through a .pth file, so each cell's smoke
costs no torch download and no second copy of torch on disk.

Checks: the venv's torch is the cell's; `import flash_attn` and `flash_attn._C`
(a wrong torch or C++ ABI shows up here as `undefined symbol`); the extension's
C++ ABI (from its dynamic symbols) equals torch._C._GLIBCXX_USE_CXX11_ABI and the
cell's; the GPU code it embeds (`cuobjdump --list-elf`) is the cell's arch list;
with a GPU, one attention call against a reference. A failing wheel goes to
quarantine with its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from build_tools.toolchain import cuda_tool, sass_arch

from .installer import hermetic_env
from .matrix import Cell

_CHECK = r"""
import json, sys
out = {"prefix": sys.prefix}
import torch
out["torch"] = torch.__version__
out["torch_cxx11abi"] = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
out["gpu"] = torch.cuda.is_available()
try:
    import flash_attn
    out["flash_attn"] = flash_attn.__version__
    out["flash_attn_file"] = flash_attn.__file__
    import flash_attn._C as ext
    out["ext_file"] = ext.__file__
    out["build_info"] = json.loads(torch.ops.flash_attn.build_info())
except Exception as e:
    out["import_error"] = "%s: %s" % (type(e).__name__, e)
if "import_error" not in out:
    from flash_attn import _ops
    ops = torch.ops.flash_attn
    out["schemas"] = {
        "fwd": [str(ops.fwd.default._schema), "flash_attn::" + _ops.FWD_SCHEMA],
        "bwd": [str(ops.bwd.default._schema), "flash_attn::" + _ops.BWD_SCHEMA],
        "fwd_kv": [str(ops.fwd_kv.default._schema) if hasattr(ops, "fwd_kv") else None,
                   "flash_attn::" + _ops.FWD_KV_SCHEMA],
        "dropout_mask": [
            str(ops.dropout_mask.default._schema) if hasattr(ops, "dropout_mask") else None,
            "flash_attn::" + _ops.DROPOUT_MASK_SCHEMA,
        ],
    }
    from flash_attn import flash_attn_func
    dev = "cuda" if out["gpu"] else "cpu"
    def attempt(call):
        try:
            call()
            return None
        except Exception as e:
            return "%s: %s" % (type(e).__name__, e)
    # the input checks: q of rank 3 is refused before anything runs
    bad = torch.zeros(2, 8, 64, dtype=torch.bfloat16, device=dev)
    out["input_check"] = attempt(lambda: flash_attn_func(bad, bad, bad))
    if not out["gpu"]:
        # a valid call goes as far as it can without a GPU: the Python front end stops at
        # the device check; the op itself through torch's dispatcher (CPU: no kernel)
        q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
        out["launch_api"] = attempt(lambda: flash_attn_func(q, q, q))
        out["launch_op"] = attempt(lambda: ops.fwd(
            q, q, q, None, None, 8, 8, 0.125, -1, -1, 0.0, None, 0.0, None))
if out["gpu"] and "import_error" not in out:
    try:
        from flash_attn import flash_attn_func
        info = out["build_info"]
        d = 64 if 64 in info["head_dims"] else info["head_dims"][0]
        dt = torch.bfloat16 if "bf16" in info["dtypes"] else torch.float16
        q, k, v = (torch.randn(2, 256, 4, d, device="cuda", dtype=dt) for _ in range(3))
        o = flash_attn_func(q, k, v, causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
        low = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
        err = (o.float() - ref).abs().max().item()
        base = (low.float() - ref).abs().max().item()
        out["numeric"] = {"max_err": err, "ref_err": base, "ok": err <= 2 * base + 1e-5}
    except Exception as e:
        out["numeric"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
print("SMOKE_JSON=" + json.dumps(out))
"""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped, with the reason in detail
    detail: str


@dataclass
class SmokeResult:
    cell_id: str
    wheel: str
    checks: list[Check] = field(default_factory=list)
    log: str = ""
    quarantined: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok is not False for c in self.checks)

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"

    def summary(self) -> str:
        failed = [c for c in self.checks if c.ok is False]
        if not failed:
            skipped = [c.name for c in self.checks if c.ok is None]
            return "passed" + (f" (skipped: {', '.join(skipped)})" if skipped else "")
        return "failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status
        return data


def build_torch_of_another_major(
    cell: Cell, torch: str | None, torch_cuda: str | None, where: str
) -> Check | None:
    """A stable cell builds against the floor's package-index torch, which may be of
    another CUDA major than the cell's kernels (torch 2.10+cu128 for cu13 kernels): the
    wheel refuses to import under it by design (flash_attn/_torch_check.py), so its import
    smoke is not run there. A skipped check saying `where` it is tested, else None."""
    major = cell.cuda.split(".")[0]
    if not (cell.stable and torch_cuda and torch_cuda.split(".")[0] != major):
        return None
    return Check(
        "build-env", None, f"build torch {torch} is CUDA {torch_cuda}, not {major}.x: {where}"
    )


def extension_abi(symbols: str) -> bool | None:
    """The C++ ABI an extension was compiled with, from its demangled dynamic symbols:
    True (std::__cxx11 strings), False (old std::string), None (no std::string seen)."""
    if "std::__cxx11::" in symbols:
        return True
    if re.search(r"std::(string|basic_string<)", symbols):
        return False
    return None


def read_symbols(so: Path) -> str:
    nm = shutil.which("nm")
    if nm is None:
        return ""
    done = subprocess.run([nm, "-D", "-C", str(so)], capture_output=True, text=True, check=False)
    return done.stdout


def find_cuobjdump(env: Mapping[str, str] | None = None) -> str | None:
    """cuobjdump in the CUDA toolkit (build_tools.toolchain.find_cuda_home), on PATH, or
    from the pip package nvidia-cuda-cuobjdump in this interpreter's sys.path."""
    search = [Path(p) for p in sys.path if p]
    found = cuda_tool("cuobjdump", os.environ if env is None else env, search)
    return str(found) if found is not None else None


def parse_elf_archs(listing: str) -> set[str]:
    """'ELF file    1: _C.1.sm_90.cubin' lines -> {'90'} (90a stays 90a)."""
    return set(re.findall(r"\bsm_(\d+a?)\b", listing))


def embedded_archs(so: Path, cuobjdump: str | None = None) -> tuple[set[str] | None, str]:
    exe = cuobjdump or find_cuobjdump()
    if exe is None:
        return None, "no cuobjdump (CUDA_HOME/bin, PATH, or pip install nvidia-cuda-cuobjdump)"
    done = subprocess.run([exe, "--list-elf", str(so)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"cuobjdump failed: {(done.stderr or done.stdout).strip()[:200]}"
    return parse_elf_archs(done.stdout), exe


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """cmd with the machine's pip configuration dropped (a constraint or find-links there
    must not change what the smoke venv installs), its output in log."""
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=cwd, env=hermetic_env()
    )
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
    return done


def evaluate(cell: Cell, expected_torch: str, data: dict[str, Any]) -> list[Check]:
    """The checks over what the venv reported (pure: unit-tested without building)."""
    checks = [
        Check(
            "torch",
            data.get("torch") == expected_torch,
            f"venv has torch {data.get('torch')}, the cell's toolchain {expected_torch}",
        )
    ]
    error = data.get("import_error")
    checks.append(Check("import", not error, error or f"flash_attn {data.get('flash_attn')}"))
    if error:
        return checks
    ext_abi = data.get("ext_cxx11abi")
    torch_abi = data.get("torch_cxx11abi")
    if ext_abi is None:
        checks.append(Check("cxx11abi", None, "no std::string symbol in the extension"))
    else:
        ok = ext_abi == torch_abi == cell.cxx11abi
        checks.append(
            Check(
                "cxx11abi",
                ok,
                f"extension {_tf(ext_abi)}, torch {_tf(torch_abi)}, cell {cell.abi_text}",
            )
        )
    info = data.get("build_info") or {}
    declared = set(str(a) for a in info.get("cuda_archs", []))
    elf = data.get("elf_archs")
    want = set(cell.kernels.archs)
    if elf is None:
        checks.append(
            Check(
                "archs",
                None if declared == want else False,
                f"build_info {sorted(declared)}, cell {sorted(want)}; ELF not listed: "
                f"{data.get('elf_note', '')}",
            )
        )
    else:
        checks.append(
            Check(
                "archs",
                set(elf) == {sass_arch(a) for a in want} and declared == want,
                f"cuobjdump sm_{','.join(sorted(elf))}; build_info {','.join(sorted(declared))}; "
                f"cell {','.join(sorted(want))} (arch 90 is built as sm_90a)",
            )
        )
    checks += api_checks(data)
    numeric = data.get("numeric")
    if numeric is None:
        checks.append(Check("gpu", None, "no GPU: numeric check skipped"))
    else:
        checks.append(Check("gpu", bool(numeric.get("ok")), json.dumps(numeric)))
    return checks


def api_checks(data: dict[str, Any]) -> list[Check]:
    """Op registration and schemas, the input checks, and (without a GPU) a valid call
    taken as far as it goes: the clear 'CUDA GPUs only' error, and the op through the
    dispatcher refusing CPU tensors (it has a CUDA kernel only)."""
    schemas = data.get("schemas") or {}
    wrong = [f"{op}: {got!r} != {want!r}" for op, (got, want) in schemas.items() if got != want]
    checks = [
        Check(
            "ops",
            bool(schemas) and not wrong,
            "; ".join(wrong) or f"flash_attn::{', '.join(schemas)} registered, schemas as _ops",
        )
    ]
    refused = str(data.get("input_check") or "")
    checks.append(
        Check(
            "input_check",
            refused.startswith("InputError") and "shape" in refused,
            refused or "flash_attn_func took q of rank 3",
        )
    )
    if "launch_api" in data:
        api, op = str(data.get("launch_api") or ""), str(data.get("launch_op") or "")
        ok = "CUDA GPU" in api and "CPU" in op and "flash_attn::fwd" in op
        checks.append(
            Check("launch", ok, f"flash_attn_func: {api or 'ran'}; op: {op or 'ran'}"[:400])
        )
    return checks


def _tf(flag: Any) -> str:
    return "?" if flag is None else ("TRUE" if flag else "FALSE")


def smoke_wheel(
    cell: Cell,
    wheel: Path,
    python: str,
    expected_torch: str,
    venv: Path,
    log: Path,
    isolated: bool = False,
    cuobjdump: str = "",
) -> SmokeResult:
    """Install the wheel into a fresh venv and check it. The venv sees the environment of
    `python` (the toolchain's: its torch, not a second copy of it) through a .pth file, and
    the base interpreter's site-packages too unless isolated (hermetic toolchains)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"smoke {cell.id}: {wheel.name}\n")
    result = SmokeResult(cell.id, str(wheel), log=str(log))
    if venv.exists():
        shutil.rmtree(venv)
    # isolated: no pip of its own either; the toolchain's (seen through the .pth) installs
    site = ["--without-pip"] if isolated else ["--system-site-packages"]
    done = _run([python, "-m", "venv", *site, str(venv)], log)
    vpy = str(venv / "bin" / "python")
    if done.returncode == 0 and not inherit_parent_env(python, vpy, log) and isolated:
        result.checks.append(
            Check("install", False, f"{python} is not in a venv: nothing for the smoke venv to see")
        )
        return result
    if done.returncode == 0:
        done = _run(
            [
                vpy,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--force-reinstall",
                "--disable-pip-version-check",
                str(wheel),
            ],
            log,
        )
    if done.returncode != 0:
        result.checks.append(Check("install", False, f"venv or pip install failed; see {log}"))
        return result
    result.checks.extend(
        check_environment(cell, vpy, expected_torch, log, venv, cuobjdump=cuobjdump or None)
    )
    return result


_SITE_DIRS = (
    "import json, sys, sysconfig; p = sysconfig.get_paths(); "
    "print(json.dumps({'venv': sys.prefix != sys.base_prefix, "
    "'dirs': sorted({p['purelib'], p['platlib']})}))"
)


def inherit_parent_env(python: str, vpy: str, log: Path) -> list[str]:
    """A venv made by a venv's interpreter is a venv of the base installation, which does
    not see that venv, where the toolchain's torch lives (a hermetic toolchain; a GPU box
    with torch in /opt/<x>/.venv; pytest run from a venv). Then a .pth file in the new venv
    adds the parent venv's site-packages after its own, so the wheel installed in the new
    venv still wins, and the parent's torch is used where it lies (no second copy: no
    download, no disk). Returns the directories added ([] for a base interpreter)."""
    parent = _run([python, "-c", _SITE_DIRS], log)
    child = _run([vpy, "-c", _SITE_DIRS], log)
    if parent.returncode != 0 or child.returncode != 0:
        return []
    info = json.loads(parent.stdout.strip().splitlines()[-1])
    if not info["venv"]:
        return []
    own = json.loads(child.stdout.strip().splitlines()[-1])["dirs"]
    pth = Path(own[0]) / "_factory_parent_env.pth"
    pth.write_text("".join(f"{d}\n" for d in info["dirs"]))
    with log.open("a") as f:
        f.write(f"{pth}: the toolchain's venv {', '.join(info['dirs'])}\n")
    return list(info["dirs"])


def check_environment(
    cell: Cell,
    python: str,
    expected_torch: str,
    log: Path,
    venv: Path | None = None,
    cuobjdump: str | None = None,
) -> list[Check]:
    """The checks, run with `python`, in whose environment the wheel is installed: a fresh
    smoke venv (venv given), or one that another front-end made (cibuildwheel's test venv;
    then the extension must come from that interpreter's own prefix). cuobjdump: the
    toolchain's (provision found or installed it); None: find_cuobjdump()."""
    with tempfile.TemporaryDirectory(prefix="factory-smoke-") as cwd:
        done = _run([python, "-I", "-c", _CHECK], log, cwd=Path(cwd))
    m = re.search(r"^SMOKE_JSON=(.*)$", done.stdout, re.MULTILINE)
    if m is None:
        return [Check("import", False, f"the check crashed (exit {done.returncode})")]
    data: dict[str, Any] = json.loads(m.group(1))
    ext = data.get("ext_file")
    if ext:
        root = venv if venv is not None else Path(str(data.get("prefix", "/nonexistent")))
        if not str(Path(ext).resolve()).startswith(str(root.resolve())):
            data["import_error"] = f"imported {ext}, not the wheel installed in {root}"
        data["ext_cxx11abi"] = extension_abi(read_symbols(Path(ext)))
        archs, note = embedded_archs(Path(ext), cuobjdump)
        data["elf_archs"] = sorted(archs) if archs is not None else None
        data["elf_note"] = note
    checks = evaluate(cell, expected_torch, data)
    with log.open("a") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        for c in checks:
            f.write(f"check {c.name}: {'skip' if c.ok is None else c.ok}: {c.detail}\n")
    return checks


def quarantine(result: SmokeResult, root: Path) -> Path:
    """Move a failed wheel and its log aside; it is never published."""
    dest = root / result.cell_id
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wheel = Path(result.wheel)
    if wheel.exists():
        shutil.move(str(wheel), dest / wheel.name)
    if result.log and Path(result.log).exists():
        shutil.copy2(result.log, dest / "smoke.log")
    (dest / "reason.txt").write_text(result.summary() + "\n")
    result.quarantined = str(dest)
    return dest
