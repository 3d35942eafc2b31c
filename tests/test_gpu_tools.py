"""The GPU session tools on the CPU: tools/gpu_load.py's arguments and its refusal
without a GPU, and tools/gpu_session.sh's steps, repeats and summaries with stand-ins
for python3, compute-sanitizer and nvidia-smi (the real runs need the GPU machine)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "tools" / "gpu_session.sh"


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_load", ROOT / "tools" / "gpu_load.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_gpu_load_defaults_and_limits(capsys):
    gpu_load = load_tool()
    config = gpu_load.parse_args([])
    assert (config.seconds, config.size, config.streams) == (600.0, 8192, 1)
    bad = {
        ("--seconds", "0"): "--seconds must be in (0, 3600]; got 0",
        ("--seconds", "3601"): "--seconds must be in (0, 3600]; got 3601",
        ("--size", "100"): "--size must be in [256, 32768]; got 100",
        ("--streams", "17"): "--streams must be in [1, 16]; got 17",
        ("--device", "-1"): "--device must be >= 0; got -1",
    }
    for argv, message in bad.items():
        with pytest.raises(SystemExit):
            gpu_load.parse_args(list(argv))
        assert message in capsys.readouterr().err


def test_gpu_load_summary_line():
    gpu_load = load_tool()
    config = gpu_load.LoadConfig(seconds=10, size=8192, streams=2, device=0)
    line = gpu_load.LoadResult(products=1000, seconds=2.0, stopped_by="SIGTERM").summary(config)
    assert line == (
        "gpu_load: 1000 bf16 matmuls of 8192^3 on 2 stream(s) in 2.0 s (550 TFLOP/s), "
        "stopped by SIGTERM"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_load_refuses_without_a_gpu():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_load.py"), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "gpu_load: no CUDA GPU" in done.stderr


# --- gpu_session.sh with stand-ins -------------------------------------------------

PYTHON3 = r"""#!/usr/bin/env bash
# stand-in for python3: what the session script runs, answered from $STUB_* variables
echo "python3 $* DISABLE=${FLASH_ATTN_DISABLE_SM90-unset}" >> "$STUB_CALLS"
case "$*" in
  "-m pytest"*)
    if [ -n "${STUB_PYTEST_SLEEP:-}" ]; then sleep "$STUB_PYTEST_SLEEP"; fi
    if [ "${STUB_PYTEST_FAIL:-0}" = 1 ]; then
      echo "FAILED tests/test_flash_attn_gpu.py::test_x - AssertionError"
      echo "1 failed, 665 passed, 3 skipped, 2 warnings in 81.50s (0:01:21)"; exit 1
    fi
    echo "666 passed, 3 skipped in 80.12s (0:01:20)" ;;
  "-c import xdist") exit "${STUB_NO_XDIST:-0}" ;;
  "-c "*) echo "torch 2.11.0+cu130 13.0" ;;
  "tools/gpu_load.py"*)
    done_line="gpu_load: 96 bf16 matmuls of 8192^3 on 2 stream(s) in 3.0 s, stopped by SIGTERM"
    trap 'echo "$done_line"; exit 0' TERM
    if [ -n "${STUB_LOAD_DIES:-}" ]; then echo "gpu_load: running on Fake"; exit 0; fi
    sleep 0.2; echo "gpu_load: running on Fake"
    for _ in $(seq 300); do sleep 0.1; done ;;
  "tests/gpu_poison.py"*) echo "poison: median 2.10 ms, max 3.00 ms over 50 calls" ;;
  "setup.py"*) echo "built" ;;
  "tools/sanitizer_case.py"*) echo "sanitizer_case: 21 cases, 0 problems" ;;
  *) echo "unexpected python3 $*" >&2; exit 99 ;;
esac
"""

SANITIZER = r"""#!/usr/bin/env bash
echo "compute-sanitizer $* NOCACHE=${PYTORCH_NO_CUDA_MEMORY_CACHING-unset}" >> "$STUB_CALLS"
tool=$2
while [ "${1#-}" != "$1" ]; do shift 2; done  # options come in pairs here
"$@"
n=$STUB_TOOL_HAZARDS
if [ "$tool" = racecheck ]; then
  echo "========= RACECHECK SUMMARY: $n hazards displayed ($n errors, 0 warnings)"
else
  echo "========= ERROR SUMMARY: $n errors"
fi
[ "$n" = 0 ] || exit 9
"""


def run_session(tmp_path: Path, env_extra: dict[str, str]) -> tuple[int, str, str]:
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("needs bash and tar")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (
        ("python3", PYTHON3),
        ("compute-sanitizer", SANITIZER),
        ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 580, 1980 MHz, 1980 MHz'\n"),
    ):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "OUT": str(tmp_path / "out"),
        "LOGS": str(tmp_path / "logs"),
        "STUB_CALLS": str(calls),
        "STUB_TOOL_HAZARDS": "0",
        **env_extra,
    }
    done = subprocess.run(
        ["bash", str(SESSION)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    summary = (tmp_path / "out" / "summary.txt").read_text()
    return done.returncode, summary, calls.read_text()


def test_session_repeats_test_steps_on_both_kernel_paths(tmp_path):
    rc, summary, calls = run_session(
        tmp_path, {"STEPS": "poison test test_n8_sm80 test_busy", "REPEAT": "2"}
    )
    assert rc == 0, summary
    counts = "passed 666, failed 0, skipped 3, errors 0 (pytest exit 0)"
    for line in (
        "poison: median 2.10 ms, max 3.00 ms over 50 calls",
        f"test run 1/2: {counts}",
        f"test run 2/2: {counts}",
        "test: 2/2 runs passed",
        f"test_n8_sm80 run 2/2 (8 workers): {counts}",
        f"test_busy run 1/2: {counts}; load alive to the end: gpu_load: 96 bf16 matmuls",
        "test_busy: 2/2 runs passed",
        "gpu_session: 4 steps, 0 failed",
    ):
        assert line in summary, summary
    pytest_calls = [c for c in calls.splitlines() if c.startswith("python3 -m pytest")]
    assert len(pytest_calls) == 6
    assert all(c.endswith("DISABLE=1") == ("-n 8" in c) for c in pytest_calls), pytest_calls
    assert sum("tools/gpu_load.py" in c for c in calls.splitlines()) == 2
    listed = subprocess.run(
        ["tar", "-tzf", str(tmp_path / "out" / "logs.tgz")], capture_output=True, text=True
    ).stdout
    assert "./test_busy_r2_load.log" in listed and "./test_n8_sm80_r1.log" in listed


def test_session_reports_failures_and_a_load_that_ended_early(tmp_path):
    rc, summary, _ = run_session(
        tmp_path,
        {"STEPS": "test test_busy", "STUB_PYTEST_FAIL": "1", "STUB_LOAD_DIES": "1"},
    )
    assert rc == 1
    assert "test run 1/1: passed 665, failed 1, skipped 3, errors 0 (pytest exit 1)" in summary
    assert "load ENDED BEFORE THE TESTS: gpu_load: running on Fake" in summary
    assert "== test took" in summary and "(FAILED)" in summary
    assert "gpu_session: 2 steps, 2 failed" in summary


def test_session_sanitizer_steps(tmp_path):
    rc, summary, calls = run_session(
        tmp_path, {"STEPS": "sanitize racecheck_sm80 initcheck", "STUB_TOOL_HAZARDS": "0"}
    )
    assert rc == 0, summary
    assert (
        "racecheck_sm80: RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings); "
        "sanitizer_case: 21 cases, 0 problems (exit 0)"
    ) in summary
    sanitizer_calls = [c for c in calls.splitlines() if c.startswith("compute-sanitizer")]
    memcheck, racecheck, initcheck = sanitizer_calls
    assert "--tool memcheck" in memcheck and memcheck.endswith("NOCACHE=1")
    assert "sanitize: ERROR SUMMARY: 0 errors; sanitizer_case: 21 cases, 0 problems" in summary
    assert "--tool racecheck --error-exitcode 9 --kernel-name kns=_ZN5flash" in racecheck
    assert racecheck.endswith("NOCACHE=unset")
    assert "--tool initcheck" in initcheck and "--kernel-name" not in initcheck
    case_calls = [c for c in calls.splitlines() if "sanitizer_case.py" in c and "python3 " in c]
    assert [c.endswith("DISABLE=1") for c in case_calls if c.startswith("python3")] == [
        False,
        True,
        False,
    ]
    rc, summary, _ = run_session(tmp_path, {"STEPS": "racecheck", "STUB_TOOL_HAZARDS": "3"})
    assert rc == 1
    assert "racecheck: RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)" in summary


@pytest.mark.parametrize(
    "env, message",
    [
        ({"STEPS": "test bogus"}, "unknown step bogus; valid: build test"),
        ({"STEPS": "build_sm80"}, "unknown step build_sm80: build has no _sm80 variant"),
        ({"STEPS": "test", "REPEAT": "0"}, "REPEAT must be a positive integer; got '0'"),
    ],
)
def test_session_rejects_bad_knobs_before_running_anything(tmp_path, env, message):
    done = subprocess.run(
        ["bash", str(SESSION)],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "l"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stdout
    assert not (tmp_path / "out" / "summary.txt").exists(), "a step ran"


def test_session_without_xdist_says_what_to_do(tmp_path):
    rc, summary, _ = run_session(tmp_path, {"STEPS": "test_n8", "STUB_NO_XDIST": "1"})
    assert rc == 1
    assert "pytest-xdist is not installed; put its wheel and execnet's into .whl/" in summary
