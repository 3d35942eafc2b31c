"""Doctor (`make doctor`): which variant an environment needs, whether its flash-attn
matches, the pip command; then, where flash-attn is installed there, its own doctor.

The variant logic is the package's (flash_attn/_variant.py, through .variant); what
this adds is the matrix table (is there a wheel for this torch at all, and which CUDA
a CPU build of torch would take). The installed package's doctor (`python -m
flash_attn`, flash_attn/_doctor.py) judges the build itself: its record, whether
flash_attn._C loads, whether its kernels cover the GPUs.
"""

from __future__ import annotations

import subprocess

from .matrix import MatrixSpec
from .probe import PythonFacts
from .variant import INDEX_PLACEHOLDER, TorchFacts, Variant


def _torch(facts: PythonFacts) -> TorchFacts:
    assert facts.torch is not None
    return TorchFacts(
        version=facts.torch,
        cuda=facts.torch_cuda,
        cxx11abi=bool(facts.cxx11abi),
        dist_version=facts.torch_dist,
    )


def needed_variant(facts: PythonFacts, spec: MatrixSpec) -> Variant | None:
    """The variant of the torch in `facts`: the stable one of its CUDA major for any torch
    from the stable floor on (one the table does not know yet too: a CPU build takes the
    newest torch's index CUDA); the classic one below; None when there are no wheels."""
    if facts.torch is None:
        return None
    floor = spec.stable.abi.torch_floor
    if facts.torch_minor not in spec.torch:
        if not facts.torch_minor or not spec.stable.serves(facts.torch_minor):
            return None
        newest = spec.torch[spec.newest_torch]
        return Variant.for_torch(_torch(facts), newest.index_cuda, stable_floor=floor)
    release = spec.torch[facts.torch_minor]
    return Variant.for_torch(_torch(facts), release.index_cuda, stable_floor=floor)


def fits(installed: Variant | None, variant: Variant, facts: PythonFacts) -> bool:
    """Whether an installed build's variant serves this torch: the variant it needs, or,
    past the stable floor, a classic build of exactly this torch (it still loads)."""
    if installed is None or installed == variant:
        return installed is not None
    if not variant.stable or installed.stable:
        return False
    torch = _torch(facts)
    return installed == Variant.for_torch(torch, installed.cuda)


def diagnose(facts: PythonFacts, spec: MatrixSpec, base_url: str = INDEX_PLACEHOLDER) -> list[str]:
    lines = [f"python {facts.python} ({facts.executable})"]
    if facts.torch is None:
        lines.append("torch: not importable" + (f" ({facts.error})" if facts.error else ""))
        lines.append(
            "install torch first; flash-attn has one wheel per CUDA major for torch "
            f">= {spec.stable.abi.torch_floor}, one per torch minor below"
        )
        return lines
    torch = _torch(facts)
    lines.append(torch.describe())
    if facts.gpu_arch:
        lines.append(f"GPU: sm_{facts.gpu_arch}")
    variant = needed_variant(facts, spec)
    if variant is None:
        lines.append(
            f"no wheels for torch {facts.torch_minor}: the table knows {', '.join(spec.torch)}"
        )
        return lines
    if variant.stable:
        lines.append(
            f"needs variant {variant.name} (one {spec.stable.abi.abi3_tag}-abi3 wheel for every "
            f"torch >= {spec.stable.abi.torch_floor} and CPython >= {spec.stable.abi.python_floor})"
        )
    else:
        lines.append(f"needs variant {variant.name} (cp{facts.python.replace('.', '')})")
    installed = Variant.from_label(facts.flash_attn.partition("+")[2]) if facts.flash_attn else None
    if facts.flash_attn is None:
        lines.append("flash-attn: not installed")
    elif fits(installed, variant, facts):
        lines.append(
            f"flash-attn {facts.flash_attn}: matches"
            if installed == variant
            else f"flash-attn {facts.flash_attn}: matches (a classic build of this torch; "
            f"the one wheel for every torch >= {spec.stable.abi.torch_floor} is {variant.name})"
        )
        lines.append(variant.pip_install(base_url))
        return lines
    elif installed is None:
        lines.append(f"flash-attn {facts.flash_attn}: no variant label (a source build)")
    else:
        lines.append(
            f"flash-attn {facts.flash_attn}: does NOT match (it is variant {installed.name}; "
            f"this torch wants +{variant.local_label})"
        )
    lines.append(variant.pip_install(base_url, keep=torch, replace=facts.flash_attn is not None))
    return lines


def run_installed_doctor(executable: str, base_url: str) -> tuple[int, str]:
    """`python -m flash_attn` in that interpreter (its installed flash-attn, not this
    checkout's): exit status and output."""
    cmd = [executable, "-I", "-m", "flash_attn", "--base-url", base_url]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=300, cwd="/"
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, f"{' '.join(cmd)} could not run: {e}"
    if "No module named flash_attn.__main__" in done.stderr:
        return 1, (
            "the installed flash-attn has no doctor (`python -m flash_attn`): it was built "
            "before the doctor existed; reinstall it with the command above"
        )
    return done.returncode, (done.stdout + done.stderr).rstrip()


def doctor(facts: PythonFacts, spec: MatrixSpec, base_url: str = INDEX_PLACEHOLDER) -> int:
    """Print the diagnosis, then the installed flash-attn's own; the exit status: 0 when
    there is a variant for this torch and the flash-attn installed (if any) fits it."""
    print("\n".join(diagnose(facts, spec, base_url)))
    variant = needed_variant(facts, spec)
    if variant is None:
        return 1
    if facts.flash_attn is None:
        return 0
    label = Variant.from_label(facts.flash_attn.partition("+")[2])
    status = 1 if label is not None and not fits(label, variant, facts) else 0
    code, output = run_installed_doctor(facts.executable, base_url)
    print(f"\n{output}")
    return max(status, code)
