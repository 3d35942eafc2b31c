"""Build flash-attn for the toolchain this runs in.

    python3 setup.py build_ext --inplace          # a development build (make build)
    pip install --no-build-isolation -e .         # the same, installed editable

Two steps. The kernels (csrc/kernels/*.cu and the generated instantiations)
never see torch: nvcc compiles each to its own object in a content-addressed
cache (build/kernels), reused by every later build that has the same sources,
flags, nvcc and archs. Then the binding flash_attn._C (csrc/binding/*.cpp, the
only C++ that includes torch) is compiled as a host-only torch extension and
linked with those objects and the static CUDA runtime.

Knobs (environment variables; README.md, "Build knobs"):
FLASH_ATTN_CUDA_ARCHS, FLASH_ATTN_HEAD_DIMS, FLASH_ATTN_DTYPES,
FLASH_ATTN_BACKWARD, MAX_JOBS, NVCC_THREADS, FLASH_ATTN_NVCC_MEM_GB,
FLASH_ATTN_NVCC_FLAGS, FLASH_ATTN_OBJECT_CACHE, FLASH_ATTN_LOCAL_VERSION, CUDA_HOME.

Next to the extension goes flash_attn/_built_against.json: the torch (version, CUDA,
C++ ABI) and the CUDA toolkit it was compiled with. `import flash_attn` compares it
with the running torch and refuses a build for another one (flash_attn/_variant.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from setuptools import find_packages, setup  # noqa: E402

from build_tools.cache import write_text_if_changed  # noqa: E402
from build_tools.kernels import KernelBuildError, KernelLayout, build_kernel_objects  # noqa: E402
from build_tools.knobs import BuildConfigError, knobs_from_env, load_catalog  # noqa: E402
from build_tools.toolchain import probe_toolchain  # noqa: E402
from build_tools.version import read_version, with_local_label  # noqa: E402

EXTENSION = "flash_attn._C"
KERNELS_DIR = ROOT / "csrc" / "kernels"
BINDING_DIR = ROOT / "csrc" / "binding"

NO_TORCH = """
flash-attn compiles against the torch that is installed, and this build's Python
({python}) cannot import it: {error}.

If torch is installed and you ran `pip install` without `--no-build-isolation`,
pip is building in a fresh, isolated environment that has no torch (on purpose:
a torch downloaded there would not match the one you run). Install torch first,
then build without isolation:

    python3 -m pip install torch
    python3 -m pip install --no-build-isolation flash-attn    # or: -e . in a checkout
"""


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"\nerror: {message.strip()}\n\n")
    raise SystemExit(1)


def _torch_cxx_std(torch_version: str) -> str:
    """torch >= 2.13 headers need C++20; older ones build with C++17."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    major_minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return "-std=c++20" if major_minor >= (2, 13) else "-std=c++17"


def _newer(source: Path, target: Path) -> bool:
    """True when target is missing or older than source."""
    return not target.exists() or source.stat().st_mtime > target.stat().st_mtime


def _variant_module() -> Any:
    """flash_attn/_variant.py (the build record's format and the variant names), loaded
    by path: importing flash_attn here would run its torch check against the build that
    is being replaced."""
    spec = importlib.util.spec_from_file_location(
        "_flash_attn_variant", ROOT / "flash_attn" / "_variant.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def _build_record(variant: Any, torch: Any, nvcc_version: str) -> str:
    """The JSON of what this build compiles against (flash_attn/_variant.py, BuiltAgainst)."""
    facts = variant.TorchFacts(
        version=str(torch.__version__),
        cuda=torch.version.cuda,
        cxx11abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    )
    return str(variant.BuiltAgainst(facts, variant.minor_of(nvcc_version)).to_json())


def _relative(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def extension_and_cmdclass() -> tuple[list[Any], dict[str, Any]]:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        _fail(NO_TORCH.format(error=e, python=sys.executable))
    variant = _variant_module()

    class BuildFlashAttn(BuildExtension):  # type: ignore[misc]
        """Compile the kernel objects first, then the binding linked with them; the
        build record goes next to the extension, wherever the extension goes."""

        def build_extensions(self) -> None:
            env = dict(os.environ)
            try:
                knobs = knobs_from_env(env, load_catalog(KERNELS_DIR / "generate.py"))
                toolchain = probe_toolchain(env)
                cache = env.get("FLASH_ATTN_OBJECT_CACHE", "").strip()
                layout = KernelLayout.standard(ROOT, Path(cache) if cache else None)
                objects = build_kernel_objects(layout, knobs, toolchain)
            except (BuildConfigError, KernelBuildError) as e:
                _fail(str(e))
            link_args = [
                f"-L{toolchain.cudart_static_dir}",
                "-lcudart_static",
                "-lrt",
                "-ldl",
                "-lpthread",
                # keep the static runtime's symbols private to this module, so
                # that torch's shared libcudart cannot interpose on them
                "-Wl,--exclude-libs,libcudart_static.a",
            ]
            # The object list is content-addressed (a changed kernel is a new file, whose
            # mtime may be old: another checkout compiled it), so the link inputs are named
            # in a manifest whose mtime changes exactly when they do.
            manifest = layout.link_manifest
            write_text_if_changed(manifest, "".join(f"{a}\n" for a in [*objects, *link_args]))
            # The record is written before linking and is a dependency of the
            # extension: another torch changes it, which relinks the extension (an
            # up-to-date extension is never paired with a record of another torch).
            record = self._built_record()
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_if_changed(record, _build_record(variant, torch, toolchain.nvcc_version))
            # torch's BuildExtension sets force (ninja then decides what to compile), and
            # distutils relinks whatever a forced build finds. Relink only when the
            # manifest or the record, or an object given to the linker (the binding's,
            # which ninja rebuilt, or a kernel's), is newer than the module.
            relink = False
            for ext in self.extensions:
                ext.extra_objects = [str(o) for o in objects]
                ext.extra_link_args = list(ext.extra_link_args or []) + link_args
                ext.depends = list(ext.depends or []) + [str(manifest), str(record)]
                module = Path(self.get_ext_fullpath(ext.name))
                relink |= _newer(manifest, module) or _newer(record, module)
            self.compiler.force = relink
            super().build_extensions()

        def _built_record(self) -> Path:
            """The record next to the extension in the build directory (what a wheel
            holds); in-place and editable builds copy both into the sources."""
            extension = Path(self.build_lib) / self.get_ext_filename(EXTENSION)
            return extension.parent / variant.RECORD_NAME

        def copy_extensions_to_source(self) -> None:
            super().copy_extensions_to_source()
            built = self._built_record()
            if built.is_file():
                write_text_if_changed(ROOT / "flash_attn" / variant.RECORD_NAME, built.read_text())

    binding_sources = sorted(BINDING_DIR.glob("*.cpp"))
    if not binding_sources:
        _fail(f"no binding sources: {BINDING_DIR.relative_to(ROOT)}/*.cpp is empty")
    headers = sorted(KERNELS_DIR.glob("*.h")) + sorted(BINDING_DIR.glob("*.h"))
    extension = CppExtension(
        name=EXTENSION,
        sources=_relative(binding_sources),
        include_dirs=[str(KERNELS_DIR)],
        depends=_relative(headers),
        # -g0: Python's CFLAGS ask for debug info, which costs a third of the
        # binding's compile time and most of its size
        extra_compile_args={"cxx": ["-O2", "-g0", _torch_cxx_std(torch.__version__)]},
    )
    return [extension], {"build_ext": BuildFlashAttn.with_options(use_ninja=True)}


def main() -> None:
    os.chdir(ROOT)  # setuptools wants source paths relative to the project
    try:
        version = with_local_label(
            read_version(ROOT / "flash_attn" / "__init__.py"),
            os.environ.get("FLASH_ATTN_LOCAL_VERSION"),
        )
    except BuildConfigError as e:
        _fail(str(e))
    ext_modules, cmdclass = extension_and_cmdclass()
    setup(
        version=version,
        packages=find_packages(include=["flash_attn", "flash_attn.*"]),
        py_modules=["flash_attn_interface"],
        package_data={"flash_attn": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
