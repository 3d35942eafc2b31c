"""Doctor: which variant an environment needs, whether its flash_attn matches, the pip command."""

from __future__ import annotations

from .matrix import MatrixSpec
from .probe import PythonFacts


def diagnose(facts: PythonFacts, spec: MatrixSpec, base_url: str = "<index>") -> list[str]:
    lines = [f"python {facts.python} ({facts.executable})"]
    if facts.torch is None:
        lines.append("torch: not importable" + (f" ({facts.error})" if facts.error else ""))
        lines.append("install torch first; flash-attn wheels are built per torch minor")
        return lines
    abi = "TRUE" if facts.cxx11abi else "FALSE"
    lines.append(
        f"torch {facts.torch}: CUDA {facts.torch_cuda or 'none (CPU build)'}, cxx11abi {abi}"
    )
    if facts.gpu_arch:
        lines.append(f"GPU: sm_{facts.gpu_arch}")
    minor = facts.torch_minor or ""
    release = spec.torch.get(minor)
    if release is None:
        lines.append(f"no wheels for torch {minor}: the table knows {', '.join(spec.torch)}")
        return lines
    cuda = facts.torch_cuda or release.index_cuda
    variant = f"cu{cuda.replace('.', '')}-torch{minor}-cxx11abi{abi}"
    label = f"cu{cuda.replace('.', '')}torch{minor}cxx11abi{abi}"
    lines.append(f"needs variant {variant} (cp{facts.python.replace('.', '')})")
    if facts.flash_attn is None:
        lines.append("flash-attn: not installed")
    elif facts.flash_attn.lower().endswith(label.lower()):
        lines.append(f"flash-attn {facts.flash_attn}: matches")
    else:
        lines.append(f"flash-attn {facts.flash_attn}: does NOT match (wants +{label})")
    lines.append(f"pip install flash-attn --index-url {base_url}/whl/{variant}/simple")
    return lines
