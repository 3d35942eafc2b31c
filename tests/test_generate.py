"""csrc/kernels/generate.py: the instantiation list and the registry it writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

GENERATE = Path(__file__).resolve().parents[1] / "csrc" / "kernels" / "generate.py"


def generate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(out), *args],
        capture_output=True,
        text=True,
    )


def registry_entries(out: Path) -> list[tuple[int, str, int]]:
    text = (out / "registry.cu").read_text()
    return [
        (int(h), dtype, int(d))
        for h, dtype, d in re.findall(r"\{(\d+), FLASH_(FP16|BF16), (\d)", text)
    ]


def build_info(out: Path) -> dict[str, object]:
    text = (out / "registry.cu").read_text()
    literal = re.search(r'kBuildInfo = "(.*)";', text)
    assert literal
    return json.loads(literal.group(1).replace('\\"', '"'))


def test_one_translation_unit_per_instantiation(tmp_path: Path) -> None:
    result = generate(tmp_path, "--head-dims", "128,64", "--dtypes", "bf16,fp16", "--backward", "1")
    assert result.returncode == 0, result.stderr
    units = sorted(p.name for p in tmp_path.glob("flash_*.cu"))
    assert units == sorted(
        f"flash_{d}_hdim{h}_{t}.cu"
        for d in ("fwd", "bwd")
        for h in (64, 128)
        for t in ("fp16", "bf16")
    )
    unit = (tmp_path / "flash_bwd_hdim128_bf16.cu").read_text()
    assert "run_bwd<128, __nv_bfloat16>" in unit
    assert "torch" not in unit.lower()
    assert sorted(registry_entries(tmp_path)) == sorted(
        (h, t, d) for h in (64, 128) for t in ("FP16", "BF16") for d in (0, 1)
    )
    assert build_info(tmp_path) == {
        "backward": True,
        "cuda_archs": ["80", "90"],
        "dtypes": ["fp16", "bf16"],
        "head_dims": [64, 128],
        "sm90_kernels": True,
    }
    assert "#define FLASH_HAS_SM90A 1" in unit


def test_wgmma_kernels_only_with_hopper_code(tmp_path: Path) -> None:
    assert generate(tmp_path, "--head-dims", "64", "--archs", "80;86").returncode == 0
    assert build_info(tmp_path)["sm90_kernels"] is False
    assert "FLASH_HAS_SM90A" not in (tmp_path / "flash_fwd_hdim64_bf16.cu").read_text()
    assert generate(tmp_path, "--head-dims", "64", "--archs", "90a").returncode == 0
    assert build_info(tmp_path)["sm90_kernels"] is True


def test_wgmma_header_is_current() -> None:
    gen = Path(__file__).resolve().parents[1] / "csrc" / "kernels" / "gen_wgmma.py"
    done = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inference_only_build_drops_backward_and_stale_units(tmp_path: Path) -> None:
    assert generate(tmp_path, "--head-dims", "64", "--backward", "1").returncode == 0
    assert (tmp_path / "flash_bwd_hdim64_bf16.cu").exists()
    result = generate(tmp_path, "--head-dims", "64", "--backward", "0", "--archs", "90")
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("flash_bwd_*.cu"))
    assert {d for _, _, d in registry_entries(tmp_path)} == {0}
    info = build_info(tmp_path)
    assert info["backward"] is False and info["cuda_archs"] == ["90"]


def test_unchanged_output_keeps_its_mtime(tmp_path: Path) -> None:
    assert generate(tmp_path, "--head-dims", "64").returncode == 0
    unit = tmp_path / "flash_fwd_hdim64_fp16.cu"
    before = unit.stat().st_mtime_ns
    assert generate(tmp_path, "--head-dims", "64").returncode == 0
    assert unit.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("flag", "value", "knob"),
    [
        ("--head-dims", "64,100", "FLASH_ATTN_HEAD_DIMS"),
        ("--dtypes", "fp32", "FLASH_ATTN_DTYPES"),
        ("--head-dims", "", "FLASH_ATTN_HEAD_DIMS"),
    ],
)
def test_bad_values_name_the_knob_and_the_valid_ones(
    tmp_path: Path, flag: str, value: str, knob: str
) -> None:
    result = generate(tmp_path, flag, value)
    assert result.returncode != 0
    assert knob in result.stderr and "valid:" in result.stderr
    assert not list(tmp_path.glob("*.cu"))
