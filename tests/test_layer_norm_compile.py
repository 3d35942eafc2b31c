"""The fused norms' Triton kernels compile for the GPU, checked on a machine without one.

Triton compiles for a named target without a device (its own ptxas turns the PTX into
machine code), so the launches that layer_norm_fn makes are recorded on CPU tensors (the
kernels replaced by recorders) and each distinct specialisation is compiled for sm_90
(and one set for sm_80). This catches what Triton's interpreter cannot: errors of the
compiler proper (types, layouts, names a kernel cannot see). The backward must also keep
to its register cap (its grid assumes BACKWARD_MAX_REGISTERS registers a thread), and
its plain variants (no dropout, no parallel branch) must fit in it without spilling.
The others spill a little, depending on the Triton version (sm_90, hidden 1024-8192,
bf16/fp16): Triton 3.6 none except the parallel branch at 8192 (8-112 bytes a thread);
Triton 3.9 8 bytes with dropout at 1024, and 8-176 bytes with the parallel branch.

Uses Triton internals (the binder that turns launch arguments into a signature); where
the installed Triton lacks them, or lacks ptxas, the tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton", reason="flash_attn.ops.triton needs Triton to import")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("the kernels are interpreted here, not compiled", allow_module_level=True)

from flash_attn.ops.triton import layer_norm as ln  # noqa: E402

KERNELS = ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel")
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _internals() -> Any:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this Triton ({triton.__version__}) lacks an internal the test uses: {e}")
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(NVIDIA_BIN, "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas at {ptxas} (TRITON_PTXAS_PATH)")
    return GPUTarget, ASTSource, make_backend, create_function_from_signature


class _Recorder:
    def __init__(self, name: str, seen: list[tuple[str, tuple, dict]]) -> None:
        self.name, self.seen = name, seen

    def __getitem__(self, grid: object):
        def launch(*args: object, **kwargs: object) -> None:
            self.seen.append((self.name, args, kwargs))

        return launch


def _record_launches(monkeypatch, calls: list[dict]) -> list[tuple[str, Any, tuple, dict]]:
    """(name, real kernel, args, kwargs) of every launch the calls make, fwd and bwd."""
    k = ln._kernels()
    real = {name: getattr(k, name) for name in KERNELS}
    seen: list[tuple[str, tuple, dict]] = []
    for name in KERNELS:
        monkeypatch.setattr(k, name, _Recorder(name, seen))
    monkeypatch.setattr(ln, "_interpreting", lambda: True)
    monkeypatch.setattr(k, "_sm_count", lambda dev: 132)  # an H100/H200's grid
    for call in calls:
        hidden, dtype = call["hidden"], call.get("dtype", torch.bfloat16)

        def t(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, dtype=dt, requires_grad=True)

        rms = call.get("rms", False)
        outs = ln.layer_norm_fn(
            t(64, hidden),
            t(hidden, dt=call.get("weight_dtype", dtype)),
            None if rms else t(hidden, dt=call.get("weight_dtype", dtype)),
            residual=t(64, hidden, dt=call.get("residual_dtype", dtype)),
            x1=t(64, hidden) if call.get("x1") else None,
            weight1=t(hidden) if call.get("x1") else None,
            rowscale=torch.rand(64, dtype=dtype) if call.get("rowscale") else None,
            dropout_p=call.get("p", 0.0),
            prenorm=True,
            is_rms_norm=rms,
        )
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [(name, real[name], args, kwargs) for name, args, kwargs in seen]


def _compile(arch: int, launches: list[tuple[str, Any, tuple, dict]]) -> list[tuple[str, str, Any]]:
    """Each distinct specialisation compiled for sm_<arch>: (kernel, key, compiled); the
    key names the arguments Triton specialised as constants (None ones among them)."""
    GPUTarget, ASTSource, make_backend, create_function_from_signature = _internals()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    done: dict[str, tuple[str, str, Any]] = {}
    for name, fn, args, kwargs in launches:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kw = dict(kwargs, debug=False)
        bound, spec, opts = binder(*args, **kw)
        consts = [n for n, v in bound.items() if v is None]
        key = f"{name} None={','.join(consts)} {spec} {opts}"
        if key in done:
            continue
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        done[key] = (name, key, compiled)
    return list(done.values())


def _cuobjdump() -> str | None:
    tool = os.path.join(NVIDIA_BIN, "cuobjdump")
    return tool if os.path.exists(tool) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict[str, int] | None:
    """REG, STACK, LOCAL of a cubin (cuobjdump --dump-resource-usage), None without it."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|STACK):(\d+)", text)}


CALLS = [
    dict(hidden=1024),
    dict(hidden=1024, p=0.1, rms=True),
    dict(hidden=4096, p=0.1),
    dict(hidden=8192, dtype=torch.float16, p=0.1),
    dict(hidden=1000, dtype=torch.float16, p=0.1, x1=True),
    dict(hidden=96, dtype=torch.float32, rowscale=True, weight_dtype=torch.float32,
         residual_dtype=torch.float32, p=0.2),  # fmt: skip
]


def test_kernels_compile_for_sm90_and_the_backward_does_not_spill(monkeypatch):
    compiled = _compile(90, _record_launches(monkeypatch, CALLS))
    assert {name for name, _, _ in compiled} == set(KERNELS)
    cap = ln._kernels()._BACKWARD_OPTIONS.get("maxnreg")
    plain = 0
    for name, key, kernel in compiled:
        assert kernel.asm.get("cubin"), f"{key}: no machine code"
        if name != "_norm_bwd_kernel":
            continue
        res = _resources(kernel.asm["cubin"])
        if res is None:
            continue  # no cuobjdump: compiled is all we can say
        if cap is not None:
            assert res["REG"] <= cap, f"{key}: {res['REG']} registers, over the cap {cap}"
        # no dropout (SEEDS None) and no parallel branch (W1 None): the plain variants
        nones = set(key.split()[1].removeprefix("None=").split(","))
        if {"SEEDS", "W1"} <= nones:
            plain += 1
            spilled = res.get("STACK", 0) + res.get("LOCAL", 0)
            assert spilled == 0, f"{key}: spills {spilled} bytes a thread (stack/local)"
    assert plain > 0 or _cuobjdump() is None, "no plain backward variant was checked"


def test_kernels_compile_for_sm80(monkeypatch):
    compiled = _compile(80, _record_launches(monkeypatch, CALLS[2:4]))
    assert {name for name, _, _ in compiled} == set(KERNELS)
    assert all(kernel.asm.get("cubin") for _, _, kernel in compiled)
