"""recipes/conda: the variant file is the generator's output over MATRIX=release, the
recipe parses, and rattler-build renders exactly one package per cell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from build_tools.request import StableAbi
from build_tools.version import read_version
from scripts.factory import cli
from scripts.factory.conda import RECIPE_YAML, VARIANTS_YAML, conda_variants, render_variants
from scripts.factory.matrix import LocalFacts, load_spec, select_cells, stable_pythons

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec()
CELLS = select_cells("release", SPEC, LocalFacts("3.12"))
CLASSIC = {(c.cuda, c.torch, c.python, "classic") for c in CELLS if c.cxx11abi and not c.stable}
# a stable cell: one package per CPython it serves (conda pins a package to its CPython),
# each requiring pytorch >= the floor at run time
STABLE = {
    (c.cuda, c.torch_floor, p, "stable") for c in CELLS if c.stable for p in stable_pythons(SPEC)
}
EXPECTED = CLASSIC | STABLE


def variants() -> dict[str, Any]:
    return dict(yaml.safe_load(VARIANTS_YAML.read_text()))


ABI = StableAbi.load()


def test_committed_variant_file_is_the_generators_output(tmp_path: Path) -> None:
    text = render_variants(conda_variants(CELLS, stable_pythons(SPEC)), "release")
    assert VARIANTS_YAML.read_text() == text
    assert cli.main(["conda-variants", "--check"]) == 0
    stale = tmp_path / "variants.yaml"
    stale.write_text(VARIANTS_YAML.read_text().replace('"2.9"', '"2.8"'))
    assert stale.read_text() != VARIANTS_YAML.read_text()
    assert cli.main(["conda-variants", "--check", "--output", str(stale)]) == 1
    assert cli.main(["conda-variants", "--output", str(stale)]) == 0
    assert stale.read_text() == VARIANTS_YAML.read_text()


def test_variants_are_zipped_into_exactly_the_release_cells() -> None:
    data = variants()
    zipped = data["zip_keys"][0]
    assert zipped == [
        "cuda_compiler",
        "cuda_compiler_version",
        "pytorch",
        "python",
        "flash_attn_binding",
    ]
    lengths = {len(data[key]) for key in zipped}
    assert lengths == {len(EXPECTED)} and len(CLASSIC) == len([c for c in CELLS if not c.stable])
    assert STABLE and all(SPEC.stable.serves(torch) for _, torch, _, _ in STABLE)
    rows = set(
        zip(
            data["cuda_compiler_version"],
            data["pytorch"],
            data["python"],
            data["flash_attn_binding"],
        )
    )
    assert rows == EXPECTED
    for compiler, cuda in zip(data["cuda_compiler"], data["cuda_compiler_version"]):
        assert compiler == ("nvcc" if cuda.startswith("11.") else "cuda-nvcc")


def test_recipe_parses_and_builds_the_factorys_way() -> None:
    recipe = yaml.safe_load(RECIPE_YAML.read_text())
    assert recipe["schema_version"] == 1
    assert recipe["context"]["version"] == read_version(REPO / "flash_attn" / "__init__.py")
    assert recipe["context"]["archs"] == ";".join(SPEC.kernels["full"].archs)
    host = recipe["requirements"]["host"]
    assert "pytorch ${{ pytorch }}.* cuda*" in host and "python" in host
    assert "cuda-version ${{ cuda_compiler_version }}.*" in host
    assert '${{ compiler("cuda") }}' in recipe["requirements"]["build"]
    (pin,) = [r for r in recipe["requirements"]["run"] if isinstance(r, dict)]
    assert pin == {
        "if": 'flash_attn_binding == "stable"',
        "then": "pytorch >=${{ pytorch }} cuda*",
        "else": "pytorch ${{ pytorch }}.* cuda*",
    }

    script = recipe["build"]["script"]
    assert "--no-build-isolation" in script["content"][0]
    assert script["env"]["FLASH_ATTN_CUDA_ARCHS"] == "${{ archs }}"
    assert script["env"]["FLASH_ATTN_BINDING"] == "${{ flash_attn_binding }}"


def test_rattler_build_renders_one_package_per_cell() -> None:
    rb = pytest.importorskip(
        "rattler_build", reason="py-rattler-build is not installed (see .ci/run)"
    )
    platform = rb.PlatformConfig(
        target_platform="linux-64", build_platform="linux-64", host_platform="linux-64"
    )
    rendered = rb.Stage0Recipe.from_file(str(RECIPE_YAML)).render(
        rb.VariantConfig.from_file(str(VARIANTS_YAML)), rb.RenderConfig(platform=platform)
    )
    seen = {
        (
            v.variant["cuda_compiler_version"],
            v.variant["pytorch"],
            v.variant["python"],
            v.variant["flash_attn_binding"],
        )
        for v in rendered
    }
    assert len(rendered) == len(EXPECTED) and seen == EXPECTED
    strings = [v.recipe.build.string for v in rendered]
    assert len(set(strings)) == len(strings)  # no two variants collide in a channel
    classic = next(
        v
        for v in rendered
        if v.variant["pytorch"] == "2.9" and v.variant["cuda_compiler_version"] == "13.0"
    )
    assert classic.variant["flash_attn_binding"] == "classic"
    assert classic.recipe.build.string.startswith("cuda130_torch29_py")
    assert "pytorch 2.9.* cuda*" in classic.recipe.requirements.host
    assert "pytorch 2.9.* cuda*" in classic.recipe.requirements.run
    assert "cuda-nvcc_linux-64 13.0.*" in classic.recipe.requirements.build
    # a stable package builds against the floor and runs under every pytorch from it on
    stable = next(
        v
        for v in rendered
        if v.variant["flash_attn_binding"] == "stable"
        and v.variant["cuda_compiler_version"].startswith("13.")
    )
    assert stable.variant["pytorch"] == ABI.torch_floor
    assert "torch" + ABI.torch_floor.replace(".", "") + "stable" in stable.recipe.build.string
    assert f"pytorch >={ABI.torch_floor} cuda*" in stable.recipe.requirements.run
