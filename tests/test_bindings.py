"""The two bindings (csrc/binding, one source): the build request that picks one, the
stable variant and build record, and the compiled modules themselves.

The module tests build for real against the torch installed here (kernel objects come
from the shared cache, so only the binding compiles): the stable binding's undefined
symbols must be the stable C shims and the limited Python API alone, and the classic
one must still compile and register the same ops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from build_tools.knobs import BuildConfigError
from build_tools.request import (
    BuildRequest,
    StableAbi,
    classic_requirement,
    cxx_std_for,
    developer_request,
)
from flash_attn._variant import BuiltAgainst, TorchFacts, Variant, mismatches

ROOT = Path(__file__).resolve().parent.parent
ABI = StableAbi.load()


# --- the floor and the request --------------------------------------------------------


def test_stable_floor_macros_follow_the_recipe() -> None:
    abi = StableAbi("2.10", "3.10")
    assert abi.target_version == "0x020a000000000000"  # torch/csrc/stable/version.h
    assert abi.limited_api == "0x030a0000"
    assert abi.abi3_tag == "cp310"
    assert abi.requirement == "torch>=2.10"
    assert abi.serves("2.10.0+cu128") and abi.serves("2.15.0") and not abi.serves("2.9.1")


def test_the_floor_matches_torch_s_own_limited_api_floor() -> None:
    # BuildExtension defines Py_LIMITED_API as torch's floor; the wheel tag is ours
    import torch.utils.cpp_extension as cpp

    if not hasattr(cpp, "min_supported_cpython"):
        pytest.skip(f"torch {torch.__version__} has no limited-API support")
    assert cpp.min_supported_cpython.lower() == ABI.limited_api


def test_recipe_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "stable_abi.json"
    bad.write_text('{"torch_floor": "two"}')
    with pytest.raises(BuildConfigError, match="stable_abi.json"):
        StableAbi.load(bad)


@pytest.mark.parametrize(
    ("env", "torch_version", "binding", "requirement"),
    [
        ({}, "2.13.0+cpu", "stable", "torch>=2.10"),
        ({}, "2.9.1", "classic", "torch==2.9.*"),
        ({"FLASH_ATTN_BINDING": "classic"}, "2.13.0", "classic", "torch==2.13.*"),
        ({"FLASH_ATTN_BINDING": "Stable"}, "2.10.0", "stable", "torch>=2.10"),
    ],
)
def test_developer_request_picks_the_binding(
    env: dict[str, str], torch_version: str, binding: str, requirement: str
) -> None:
    request = developer_request(env, torch_version, ABI)
    assert (request.binding, request.torch_requirement) == (binding, requirement)
    assert request.cxx_std == cxx_std_for(torch_version)


def test_developer_request_refuses_what_cannot_be_built() -> None:
    with pytest.raises(BuildConfigError, match=r"FLASH_ATTN_BINDING='fast'.*auto"):
        developer_request({"FLASH_ATTN_BINDING": "fast"}, "2.13.0", ABI)
    with pytest.raises(BuildConfigError, match=r"needs torch >= 2.10.*2.9.1"):
        developer_request({"FLASH_ATTN_BINDING": "stable"}, "2.9.1", ABI)


def test_request_carries_kernels_and_label_and_round_trips(tmp_path: Path) -> None:
    env = {
        "FLASH_ATTN_CUDA_ARCHS": "90",
        "FLASH_ATTN_HEAD_DIMS": "64",
        "FLASH_ATTN_LOCAL_VERSION": "cu13torchstable.ci",
    }
    request = developer_request(env, "2.14.1", ABI)
    assert request.kernel_env() == {"FLASH_ATTN_CUDA_ARCHS": "90", "FLASH_ATTN_HEAD_DIMS": "64"}
    assert request.local_label == "cu13torchstable.ci"
    path = tmp_path / "request.json"
    request.write(path)
    assert BuildRequest.read(path) == request


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"binding": "fast"}, "binding 'fast' is not one of classic, stable"),
        ({"cxx_std": "c++11"}, "cxx_std 'c\\+\\+11'"),
        ({"torch_requirement": "numpy"}, "not a requirement on torch"),
        ({"colour": "red"}, "unknown fields \\['colour'\\]"),
    ],
)
def test_bad_request_names_the_field(data: dict[str, str], message: str) -> None:
    good = json.loads(developer_request({}, "2.13.0", ABI).to_json())
    with pytest.raises(BuildConfigError, match=message):
        BuildRequest.from_json(json.dumps({**good, **data}), "request.json")


def test_classic_requirement_is_the_minor() -> None:
    assert classic_requirement("2.13.0+cu130") == "torch==2.13.*"


# --- the stable variant and its record ---------------------------------------------------


def test_stable_variant_names_and_labels_round_trip() -> None:
    v = Variant.stable_for("13.0")
    assert (v.name, v.local_label) == ("cu13-torchstable", "cu13torchstable")
    assert Variant.from_label("cu13torchstable") == v
    ci = Variant.stable_for("13.2", "ci")
    assert (ci.name, ci.local_label) == ("cu13-torchstable-ci", "cu13torchstable.ci")
    assert Variant.from_label("cu13torchstable.ci") == ci
    # a classic label still reads as before
    assert Variant.from_label("cu130torch2.9cxx11abiTRUE") == Variant("13.0", "2.9", True)


def test_for_torch_picks_stable_from_the_floor() -> None:
    new = TorchFacts("2.15.0+cu132", "13.2", True)
    old = TorchFacts("2.9.1+cu130", "13.0", True)
    assert Variant.for_torch(new, stable_floor="2.10") == Variant.stable_for("13.2")
    assert Variant.for_torch(old, stable_floor="2.10") == Variant("13.0", "2.9", True)
    assert Variant.for_torch(new) == Variant("13.2", "2.15", True)  # floor unknown


def stable_record(torch_version: str = "2.10.0+cu130") -> BuiltAgainst:
    return BuiltAgainst(TorchFacts(torch_version, "13.0", True), "13.0", "stable", "2.10")


def test_stable_record_round_trips_and_names_its_variant() -> None:
    record = stable_record()
    assert BuiltAgainst.from_json(record.to_json()) == record
    assert record.stable and record.variant == Variant.stable_for("13.0")


@pytest.mark.parametrize(
    ("running", "what"),
    [
        (TorchFacts("2.10.0+cu130", "13.0", True), []),
        (TorchFacts("2.15.0+cu132", "13.2", True), []),  # any newer minor, any 13.x
        (TorchFacts("2.13.0+cpu", None, True), []),  # a CPU torch imports it
        (TorchFacts("2.9.1+cu130", "13.0", True), ["torch"]),
        (TorchFacts("2.13.0+cu128", "12.8", True), ["CUDA"]),
    ],
)
def test_stable_build_fits_every_torch_from_the_floor(running: TorchFacts, what: list[str]) -> None:
    assert [m.what for m in mismatches(stable_record(), running)] == what


def test_a_stable_record_without_a_floor_is_refused() -> None:
    data = json.loads(stable_record().to_json())
    del data["stable_floor"]
    with pytest.raises(ValueError, match="stable_floor"):
        BuiltAgainst.from_json(json.dumps(data))


# --- the compiled modules ------------------------------------------------------------------


def _module() -> Path | None:
    found = sorted((ROOT / "flash_attn").glob("_C.*.so"))
    return found[0] if len(found) == 1 else None


def _undefined(module: Path) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(
        [nm, "-D", "--undefined-only", str(module)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def test_the_stable_module_imports_only_stable_shims_from_torch() -> None:
    module = _module()
    if module is None or not module.name.endswith(".abi3.so"):
        pytest.skip("no stable build in this checkout (make build with torch >= the floor)")
    symbols = _undefined(module)
    versioned = [s for s in symbols if "@" in s or s.startswith(("_ITM_", "__gmon"))]
    rest = sorted(set(symbols) - set(versioned))
    # every other symbol comes from torch's C shims or the limited Python API
    outside = [s for s in rest if not s.startswith(("aoti_torch_", "torch_", "Py"))]
    assert outside == [], outside
    python = [s for s in rest if s.startswith("Py")]
    assert python == ["PyModule_Create2"], python  # in the limited API since 3.2
    assert not any("c10" in s or "at::" in s for s in symbols)


def test_the_classic_binding_still_builds_and_registers_the_same_ops(tmp_path: Path) -> None:
    """FLASH_ATTN_BINDING=classic, built into a copy of the package (the in-place
    module is left alone), imported in a fresh process: same schemas, C++ API linked."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit to link the kernels' runtime")
    pkg = tmp_path / "site" / "flash_attn"
    shutil.copytree(ROOT / "flash_attn", pkg, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    cache = os.environ.get("FLASH_ATTN_OBJECT_CACHE") or str(ROOT / "build" / "kernels")
    env = {
        **os.environ,
        "FLASH_ATTN_BINDING": "classic",
        "FLASH_ATTN_OBJECT_CACHE": cache,
        # the ci kernel set: objects CI compiled already
        "FLASH_ATTN_CUDA_ARCHS": "90",
        "FLASH_ATTN_HEAD_DIMS": "64",
        "FLASH_ATTN_DTYPES": "bf16",
    }
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "temp"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (module,) = (tmp_path / "lib" / "flash_attn").glob("_C.*.so")
    assert not module.name.endswith(".abi3.so")
    record = json.loads((module.parent / "_built_against.json").read_text())
    assert record["binding"] == "classic" and record["stable_floor"] == ABI.torch_floor
    shutil.copy2(module, pkg / module.name)
    shutil.copy2(module.parent / "_built_against.json", pkg / "_built_against.json")
    probe = (
        "import torch, flash_attn._C\n"
        "ops = torch.ops.flash_attn\n"
        "print(str(ops.fwd.default._schema)); print(str(ops.bwd.default._schema))\n"
        "print(str(ops.dropout_mask.default._schema))\n"
        "print(str(ops.fwd_kv.default._schema))\n"
        "print(ops.build_info())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(pkg.parent)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    fwd, bwd, mask, fwd_kv, info = run.stdout.splitlines()[:5]
    from flash_attn._ops import BWD_SCHEMA, DROPOUT_MASK_SCHEMA, FWD_KV_SCHEMA, FWD_SCHEMA

    assert fwd == "flash_attn::" + FWD_SCHEMA and bwd == "flash_attn::" + BWD_SCHEMA
    assert mask == "flash_attn::" + DROPOUT_MASK_SCHEMA
    assert fwd_kv == "flash_attn::" + FWD_KV_SCHEMA
    assert json.loads(info)["head_dims"] == [64]
    assert any("c10" in s for s in _undefined(module))  # the C++ API: one torch only
