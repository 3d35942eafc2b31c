"""The torch check at import and the doctor (`python -m flash_attn`), on the CPU.

The judgement is tested on constructed facts; the import check and the doctor also run
for real in a subprocess, on a copy of the package whose build record says what the
test wants (the record is all the check reads; the extension is a stand-in file).
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_attn import _torch_check
from flash_attn._build_info import BuildInfo
from flash_attn._doctor import FAIL, NOTE, OK, Facts, Gpu, Kernels, diagnose
from flash_attn._torch_check import Installed, import_error, locate
from flash_attn._variant import (
    RECORD_NAME,
    SKIP_CHECK_ENV,
    BuiltAgainst,
    TorchFacts,
    Variant,
    VariantError,
    minor_of,
    mismatches,
)

PACKAGE = Path(_torch_check.__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
BASE = "https://wheels.example"

TORCH_213 = TorchFacts("2.13.0+cu130", "13.0", True, "2.13.0")
CPU_213 = TorchFacts("2.13.1+cpu", None, True, "2.13.1+cpu")


def built(version: str = "2.13.0+cu130", cuda: str | None = "13.0", abi: bool = True,
          nvcc: str = "13.0") -> BuiltAgainst:
    return BuiltAgainst(TorchFacts(version, cuda, abi), nvcc)


# --- variants, records, mismatches -------------------------------------------------


def test_variant_names_and_labels_round_trip() -> None:
    v = Variant("13.0", "2.13", True)
    assert v.name == "cu130-torch2.13-cxx11abiTRUE"
    assert Variant.from_label(v.local_label) == v
    # pip and uv normalise the label to lower case ("...cxx11abitrue")
    assert Variant.from_label(v.local_label.lower()) == v
    assert Variant.from_label("cu128torch2.9cxx11abiFALSE") == Variant("12.8", "2.9", False)
    assert Variant.from_label("") is None and Variant.from_label("cpu") is None
    assert v.index_url(BASE + "/") == f"{BASE}/whl/{v.name}/simple"


def test_a_variant_follows_the_torch_and_a_cpu_torch_takes_the_given_cuda() -> None:
    assert Variant.for_torch(TORCH_213) == Variant("13.0", "2.13", True)
    assert Variant.for_torch(CPU_213, "13.0").name == "cu130-torch2.13-cxx11abiTRUE"
    with pytest.raises(VariantError, match="CPU build"):
        Variant.for_torch(CPU_213)


def test_pip_command_names_only_the_variant_index_and_keeps_torch() -> None:
    v = Variant("13.0", "2.13", True)
    fresh = v.pip_install(BASE, keep=CPU_213)
    # the public version: "==2.13.1" matches the installed 2.13.1+cpu, "==2.13.1+cpu" would
    # not match PyPI's 2.13.1
    assert fresh == f'pip install flash-attn "torch==2.13.1" --index-url {v.index_url(BASE)}'
    replace = v.pip_install(BASE, keep=CPU_213, replace=True)
    assert replace.split() == [
        "pip", "install", "--force-reinstall", "--no-deps", "flash-attn",
        "--index-url", v.index_url(BASE),
    ]
    for command in (fresh, replace):
        assert "extra-index" not in command and "pypi" not in command


def test_a_minor_release_runs_any_patch_release() -> None:
    assert mismatches(built("2.13.0+cu130"), TorchFacts("2.13.5+cu130", "13.0", True)) == []
    assert mismatches(built("2.13.0"), CPU_213) == []  # CPU torch: imports, runs nothing


def test_mismatches_name_both_sides() -> None:
    [torch_minor] = mismatches(built("2.14.0+cu130"), TORCH_213)
    assert torch_minor.describe() == "built for torch 2.14, running torch 2.13.0+cu130"
    [abi] = mismatches(built(abi=False), TORCH_213)
    assert abi.describe() == "built for C++11 ABI FALSE, running C++11 ABI TRUE"
    [cuda] = mismatches(built(nvcc="12.8", cuda="12.8"), TORCH_213)
    assert cuda.describe() == "built for CUDA 12.8, running CUDA 13.0"
    # the kernels' CUDA decides, not the CUDA of the torch the binding was compiled with
    assert mismatches(built(cuda=None, nvcc="13.0"), TORCH_213) == []
    assert len(mismatches(built("2.12.0", abi=False, nvcc="12.8"), TORCH_213)) == 3


def test_record_round_trips_and_bad_records_name_the_file() -> None:
    record = built("2.14.0+cu130")
    assert BuiltAgainst.from_json(record.to_json()) == record
    assert record.variant.name == "cu130-torch2.14-cxx11abiTRUE"
    for bad in ("{", '{"format": 2}', '{"format": 1, "torch": "x", "torch_cuda": null, '
                '"cxx11abi": true, "cuda": "13.0"}'):
        with pytest.raises(VariantError, match="/site/flash_attn/_built_against.json"):
            BuiltAgainst.from_json(bad, "/site/flash_attn/_built_against.json")
    with pytest.raises(VariantError, match="'torch'"):
        minor_of("torch")


# --- the check at import --------------------------------------------------------------


def fake_install(root: Path, record: BuiltAgainst | None, extension: bool = True) -> Path:
    """root/flash_attn: the package's Python files, a stand-in extension, a record."""
    pkg = root / "flash_attn"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.json"))
    if extension:
        (pkg / f"_C{SUFFIX}").write_bytes(b"not an ELF file")
    if record is not None:
        (pkg / RECORD_NAME).write_text(record.to_json())
    return pkg


def test_import_error_is_empty_where_the_build_fits(tmp_path: Path) -> None:
    pkg = fake_install(tmp_path, built("2.13.0+cu130"))
    assert import_error(locate(pkg, "2.9.0"), TORCH_213, BASE) == ""


def test_nothing_is_checked_without_an_extension_or_without_a_record(tmp_path: Path) -> None:
    unbuilt = fake_install(tmp_path / "a", built("2.14.0"), extension=False)
    assert import_error(locate(unbuilt), TORCH_213, BASE) == ""
    unrecorded = locate(fake_install(tmp_path / "b", None))
    assert unrecorded.record is None and unrecorded.record_error == ""
    assert import_error(unrecorded, TORCH_213, BASE) == ""


def test_an_unreadable_record_refuses_the_import(tmp_path: Path) -> None:
    pkg = fake_install(tmp_path, None)
    (pkg / RECORD_NAME).write_text("{}")
    error = import_error(locate(pkg), TORCH_213, BASE)
    assert "cannot tell which torch" in error and SKIP_CHECK_ENV in error


def test_mismatch_message_names_versions_variant_and_command(tmp_path: Path) -> None:
    pkg = fake_install(tmp_path, built("2.14.0+cu130"))
    installed = locate(pkg, "2.9.0")
    message = import_error(installed, CPU_213, BASE)
    needed = Variant("13.0", "2.13", True)  # a CPU torch takes the build's CUDA
    assert "built for torch 2.14, running torch 2.13.1+cpu" in message
    assert f"variant {needed.name}" in message
    assert needed.pip_install(BASE, keep=CPU_213, replace=installed.distribution) in message
    assert SKIP_CHECK_ENV in message and "python -m flash_attn" in message


def test_a_cuda_mismatch_says_the_kernels_cuda(tmp_path: Path) -> None:
    pkg = fake_install(tmp_path, built("2.13.0+cu128", cuda="12.8", nvcc="12.8"))
    message = import_error(locate(pkg), TORCH_213, BASE)
    assert "built for CUDA 12.8, running CUDA 13.0" in message
    assert "kernels are CUDA 12.8 code" in message and "undefined symbol" not in message
    assert Variant("13.0", "2.13", True).index_url(BASE) in message


def test_a_source_checkout_is_told_to_rebuild(tmp_path: Path) -> None:
    pkg = fake_install(tmp_path, built("2.14.0+cu130"))
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    message = import_error(locate(pkg), TORCH_213, BASE)
    assert "make build" in message and "--no-build-isolation" in message
    assert "--index-url" not in message


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["python", "-m", "flash_attn"], "flash_attn"),
        (["python", "-mflash_attn"], "flash_attn"),
        (["python", "-Im", "flash_attn", "--base-url", "x"], "flash_attn"),
        (["python", "-W", "ignore", "-X", "dev", "-m", "flash_attn"], "flash_attn"),
        (["python", "-Werror::ImportWarning", "-m", "pkg.tool"], "pkg.tool"),
        (["python", "-c", "import flash_attn", "-m", "flash_attn"], None),
        (["python", "script.py", "-m", "flash_attn"], None),
        (["python"], None),
    ],
)
def test_which_module_python_runs(argv: list[str], module: str | None) -> None:
    assert _torch_check._module_run(argv) == module


def _run(root: Path, *args: str, skip: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != SKIP_CHECK_ENV}
    env["PYTHONPATH"] = str(root)
    if skip:
        env[SKIP_CHECK_ENV] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def running() -> TorchFacts:
    return TorchFacts(torch.__version__, torch.version.cuda, torch._C._GLIBCXX_USE_CXX11_ABI)


def test_import_refuses_a_build_for_another_torch_and_the_doctor_says_why(
    tmp_path: Path,
) -> None:
    """For real, in a fresh interpreter (each costs an `import torch`: two runs only)."""
    other = f"{int(running().minor.split('.')[1]) + 1}"
    fake_install(tmp_path, built(f"2.{other}.0+cu130", abi=running().cxx11abi))
    refused = _run(tmp_path, "-c", "import flash_attn")
    assert refused.returncode == 1
    assert "TorchMismatchError" in refused.stderr
    assert f"built for torch 2.{other}, running torch {torch.__version__}" in refused.stderr

    doctor = _run(tmp_path, "-m", "flash_attn", "--base-url", BASE)
    assert doctor.returncode == 1, doctor.stderr
    assert "[FAIL]" in doctor.stdout and "does NOT fit this torch" in doctor.stdout
    needed = Variant.for_torch(running(), "13.0").index_url(BASE)
    assert f"--index-url {needed}" in doctor.stdout
    assert "not loaded (built for another torch" in doctor.stdout


def test_check_at_import_raises_an_import_error_unless_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = fake_install(tmp_path / "other", built("2.14.0+cu130", abi=running().cxx11abi))
    fits = fake_install(tmp_path / "fits", BuiltAgainst(running(), "13.0"))
    monkeypatch.delenv(SKIP_CHECK_ENV, raising=False)
    cpu_213 = TorchFacts("2.13.0+cpu", None, running().cxx11abi)
    monkeypatch.setattr(_torch_check, "running_torch", lambda distribution=True: cpu_213)
    monkeypatch.setattr(_torch_check, "PACKAGE_DIR", other)
    with pytest.raises(ImportError, match="built for torch 2.14, running torch 2.13.0"):
        _torch_check.check_at_import("2.9.0")
    monkeypatch.setenv(SKIP_CHECK_ENV, "1")
    _torch_check.check_at_import("2.9.0")
    monkeypatch.setenv(SKIP_CHECK_ENV, "0")
    monkeypatch.setattr(_torch_check, "PACKAGE_DIR", fits)
    monkeypatch.setattr(_torch_check, "running_torch", lambda distribution=True: running())
    _torch_check.check_at_import("2.9.0")


# --- the doctor's judgement -------------------------------------------------------------


KERNELS = Kernels(("80", "90a"), (64, 128), ("fp16", "bf16"), True)


def facts(tmp_path: Path, running: TorchFacts | None = TORCH_213, gpus: tuple[Gpu, ...] = (),
          record: BuiltAgainst | None = None, extension_error: str | None = "",
          kernels: Kernels | None = KERNELS, driver_gpus: int = 0) -> Facts:
    if record is None:
        record = built()
    installed = locate(fake_install(tmp_path, record), "2.9.0")
    info = BuildInfo(KERNELS.head_dims, KERNELS.dtypes, KERNELS.backward, KERNELS.cuda_archs)
    return Facts(
        python="3.11.7", executable="/venv/bin/python", torch=running, torch_error="",
        gpus=gpus, no_gpu_reason="" if gpus else "torch.cuda.is_available() is False",
        driver_gpus=driver_gpus, installed=installed, extension_error=extension_error,
        kernels=kernels, coverage={g.index: info.runs_on(g.capability) for g in gpus},
    )


def statuses(d: object) -> dict[str, str]:
    return {f.topic: f.status for f in d.findings if f.topic}  # type: ignore[attr-defined]


def test_all_good_without_a_gpu_says_so(tmp_path: Path) -> None:
    d = diagnose(facts(tmp_path))
    assert d.ok and d.fix == []
    assert statuses(d) == {"python": OK, "torch": OK, "flash_attn": OK, "GPU": NOTE,
                           "built for": OK, "flash_attn._C": OK}
    assert "exit status 0" in d.render()


def test_gpu_coverage_follows_the_build_archs(tmp_path: Path) -> None:
    gpus = (Gpu(0, "A100", (8, 0)), Gpu(1, "RTX 3090", (8, 6)), Gpu(2, "H100", (9, 0)),
            Gpu(3, "B200", (10, 0)), Gpu(4, "T4", (7, 5)))
    d = diagnose(facts(tmp_path, gpus=gpus))
    s = statuses(d)
    assert [s[f"GPU {i}"] for i in range(5)] == [OK, OK, OK, FAIL, FAIL]
    texts = {f.topic: f.text for f in d.findings}
    assert "NOT covered" in texts["GPU 3"] and "FLASH_ATTN_CUDA_ARCHS" in texts["GPU 3"]
    assert "older than sm_80" in texts["GPU 4"]
    assert not d.ok


def test_a_build_for_another_torch_fails_with_the_install_command(tmp_path: Path) -> None:
    d = diagnose(facts(tmp_path, record=built("2.14.0+cu130"), extension_error=None,
                       kernels=None), BASE)
    assert not d.ok
    lines = d.render()
    assert "built for torch 2.14, running torch 2.13.0+cu130" in lines
    assert "not loaded (built for another torch" in lines
    assert Variant("13.0", "2.13", True).index_url(BASE) in "\n".join(d.fix)


def test_gpus_are_listed_where_the_extension_is_not_loaded(tmp_path: Path) -> None:
    gpus = (Gpu(0, "H100", (9, 0)), Gpu(1, "T4", (7, 5)))
    d = diagnose(facts(tmp_path, gpus=gpus, record=built("2.14.0"), extension_error=None,
                       kernels=None))
    s = statuses(d)
    assert s["GPU 0"] == NOTE and s["GPU 1"] == FAIL
    assert "coverage unknown" in d.render()


def test_an_unreadable_record_fails_and_the_extension_is_not_loaded(tmp_path: Path) -> None:
    f = facts(tmp_path)
    (f.installed.package_dir / RECORD_NAME).write_text('{"format": 1}')
    unreadable = locate(f.installed.package_dir)
    d = diagnose(Facts(**{**f.__dict__, "installed": unreadable, "extension_error": None,
                          "kernels": None}))
    assert statuses(d)["built for"] == FAIL and statuses(d)["flash_attn._C"] == FAIL
    assert "build record is unreadable" in d.render() and d.fix


def test_an_extension_that_does_not_load_fails(tmp_path: Path) -> None:
    d = diagnose(facts(tmp_path, extension_error="ImportError: undefined symbol: _ZN3c10",
                       kernels=None))
    assert statuses(d)["flash_attn._C"] == FAIL and d.fix


def test_an_unbuilt_extension_fails(tmp_path: Path) -> None:
    f = facts(tmp_path)
    (f.installed.package_dir / f"_C{SUFFIX}").unlink()
    unbuilt = locate(f.installed.package_dir)
    assert unbuilt.extension is None
    d = diagnose(Facts(**{**f.__dict__, "installed": unbuilt, "extension_error": None,
                          "kernels": None}))
    assert statuses(d)["built for"] == FAIL and not d.ok


def test_a_cpu_torch_on_a_gpu_machine_fails_with_the_torch_command(tmp_path: Path) -> None:
    d = diagnose(facts(tmp_path, running=CPU_213, driver_gpus=2))
    assert statuses(d)["GPU"] == FAIL
    assert any("download.pytorch.org/whl/cu130" in line for line in d.fix)
    assert any('"torch==2.13.*"' in line for line in d.fix)
    # without a GPU, a CPU torch is fine for what it can do: import, CPU tests
    assert diagnose(facts(tmp_path / "cpu", running=CPU_213)).ok


def test_no_torch_fails_and_says_install_torch(tmp_path: Path) -> None:
    d = diagnose(facts(tmp_path, running=None))
    assert statuses(d)["torch"] == FAIL and "Install torch" in d.fix[0]


def test_the_in_place_build_records_the_torch_it_was_built_with() -> None:
    """After `make build` (or ci-build) the record sits next to the extension and fits
    this torch; skipped where the extension is not built."""
    here: Installed = locate(PACKAGE)
    if here.extension is None:
        pytest.skip("flash_attn._C is not built here")
    assert here.record is not None, here.record_error
    assert here.record.torch.version == torch.__version__
    assert mismatches(here.record, running()) == []
