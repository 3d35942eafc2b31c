"""Build flash-attn for the toolchain this runs in.

    python3 setup.py build_ext --inplace          # a development build (make build)
    pip install --no-build-isolation -e .         # the same, installed editable

Two steps. The kernels (csrc/kernels/*.cu and the generated instantiations)
never see torch: nvcc compiles each to its own object in a content-addressed
cache (build/kernels), reused by every later build that has the same sources,
flags, nvcc and archs. Then the binding flash_attn._C (csrc/binding/*.cpp, the
only C++ that includes torch) is compiled as a host-only torch extension and
linked with those objects and the static CUDA runtime.

What is built is one BuildRequest (build_tools/request.py): the binding, the kernel
set, the version label, the torch requirement and the C++ standard. The wheel factory
writes it and names it in FLASH_ATTN_BUILD_REQUEST; without that, it comes from the
environment (README.md, "Build knobs"): FLASH_ATTN_BINDING (auto, stable, classic),
FLASH_ATTN_CUDA_ARCHS, FLASH_ATTN_HEAD_DIMS, FLASH_ATTN_DTYPES, FLASH_ATTN_BACKWARD,
FLASH_ATTN_LOCAL_VERSION. How it is built stays in the environment: MAX_JOBS,
NVCC_THREADS, FLASH_ATTN_NVCC_MEM_GB, FLASH_ATTN_NVCC_FLAGS, FLASH_ATTN_OBJECT_CACHE,
CUDA_HOME.

Two bindings from one source (csrc/binding/torch_api.h). "stable": the LibTorch stable
ABI and the limited Python API, TORCH_TARGET_VERSION at the floor of
recipes/stable_abi.json: one _C.abi3.so (a cp310-abi3 wheel) for every torch from the
floor on. "classic": the C++ API of the torch it compiles against, for that torch minor
alone (torch below the floor). `auto` (the default) picks stable where torch allows.

Next to the extension goes flash_attn/_built_against.json: the torch (version, CUDA,
C++ ABI) and the CUDA toolkit it was compiled with. `import flash_attn` compares it
with the running torch and refuses a build for another one (flash_attn/_variant.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from setuptools import find_packages, setup  # noqa: E402

from build_tools.cache import write_text_if_changed  # noqa: E402
from build_tools.kernels import KernelBuildError, KernelLayout, build_kernel_objects  # noqa: E402
from build_tools.knobs import BuildConfigError, knobs_from_env, load_catalog  # noqa: E402
from build_tools.request import (  # noqa: E402
    KERNEL_KNOBS,
    REQUEST_ENV,
    BuildRequest,
    StableAbi,
    developer_request,
)
from build_tools.toolchain import probe_toolchain  # noqa: E402
from build_tools.version import read_version, with_local_label  # noqa: E402

if TYPE_CHECKING:
    from types import ModuleType

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


def _build_record(
    variant: Any, torch: Any, nvcc_version: str, request: BuildRequest, abi: StableAbi
) -> str:
    """The JSON of what this build compiles against (flash_attn/_variant.py, BuiltAgainst)."""
    facts = variant.TorchFacts(
        version=str(torch.__version__),
        cuda=torch.version.cuda,
        cxx11abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    )
    record = variant.BuiltAgainst(
        facts, variant.minor_of(nvcc_version), request.binding, abi.torch_floor
    )
    return str(record.to_json())


def load_request(torch_version: str, abi: StableAbi) -> BuildRequest:
    """The factory's request (FLASH_ATTN_BUILD_REQUEST), else the developer's."""
    path = os.environ.get(REQUEST_ENV, "").strip()
    request = (
        BuildRequest.read(Path(path)) if path else developer_request(os.environ, torch_version, abi)
    )
    if request.stable and not abi.serves(torch_version):
        raise BuildConfigError(
            f"{REQUEST_ENV}={path}: a stable build needs torch >= {abi.torch_floor}, "
            f"and this build's torch is {torch_version}"
        )
    return request


def _remove_other_modules(module: Path) -> None:
    """Delete flash_attn/_C.* modules next to `module` other than itself (a classic
    _C.cpython-311-x86_64-linux-gnu.so beside a stable _C.abi3.so, or the reverse)."""
    for other in module.parent.glob("_C.*.so"):
        if other.name != module.name:
            other.unlink()


def _relative(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _import_torch() -> tuple[ModuleType, ModuleType]:
    try:
        import torch
        import torch.utils.cpp_extension as cpp_extension
    except ImportError as e:
        _fail(NO_TORCH.format(error=e, python=sys.executable))
    return torch, cpp_extension


def _stable_extension(
    cpp_extension: ModuleType,
    sources: list[str],
    depends: list[str],
    cxx: list[str],
    abi: StableAbi,
) -> Any:
    """The binding on the stable ABI: torch's headers at TORCH_TARGET_VERSION, no
    pybind11, no torch/csrc/api, linked with libtorch_cpu alone (the C shims)."""
    from setuptools import Extension

    # BuildExtension defines Py_LIMITED_API as torch's own floor; the wheel's abi3 tag
    # comes from recipes/stable_abi.json: they must agree
    torch_floor = str(getattr(cpp_extension, "min_supported_cpython", "")).lower()
    if torch_floor and torch_floor != abi.limited_api:
        _fail(
            f"this torch builds limited-API extensions for Py_LIMITED_API={torch_floor}, "
            f"recipes/stable_abi.json says python_floor {abi.python_floor} ({abi.limited_api})"
        )
    torch_include = cpp_extension.include_paths()[0]  # <torch>/include (no csrc/api)
    return Extension(
        name=EXTENSION,
        sources=sources,
        include_dirs=[str(KERNELS_DIR), torch_include],
        library_dirs=cpp_extension.library_paths(),
        # libstdc++ first: torch's libtorch_cpu.so exports std::string instantiations
        # without a symbol version, and a C++17 build (torch < 2.13 headers) would bind
        # its references to them there (the smoke gate's nm check names them)
        libraries=["stdc++", "torch_cpu"],
        depends=depends,
        language="c++",
        py_limited_api=True,
        define_macros=[
            ("FLASH_ATTN_STABLE_ABI", "1"),
            ("TORCH_TARGET_VERSION", abi.target_version),
        ],
        extra_compile_args={"cxx": cxx},
    )


def extension_and_cmdclass(
    request: BuildRequest, abi: StableAbi
) -> tuple[list[Any], dict[str, Any]]:
    torch, cpp_extension = _import_torch()
    BuildExtension = cpp_extension.BuildExtension  # noqa: N806
    variant = _variant_module()

    class BuildFlashAttn(BuildExtension):  # type: ignore[misc]
        """Compile the kernel objects first, then the binding linked with them; the
        build record goes next to the extension, wherever the extension goes."""

        def build_extensions(self) -> None:
            # the kernel set is the request's alone: a knob exported in the shell never
            # adds to a request that leaves it at its default
            env = {k: v for k, v in os.environ.items() if k not in KERNEL_KNOBS.values()}
            env.update(request.kernel_env())
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
            write_text_if_changed(
                record, _build_record(variant, torch, toolchain.nvcc_version, request, abi)
            )
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
            # the other binding's module would shadow this one (import tries
            # .cpython-3XY-... before .abi3.so) or ship beside it in the wheel
            _remove_other_modules(Path(self.get_ext_fullpath(EXTENSION)))
            super().build_extensions()

        def _built_record(self) -> Path:
            """The record next to the extension in the build directory (what a wheel
            holds); in-place and editable builds copy both into the sources."""
            extension = Path(self.build_lib) / self.get_ext_filename(EXTENSION)
            return extension.parent / variant.RECORD_NAME

        def copy_extensions_to_source(self) -> None:
            super().copy_extensions_to_source()
            _remove_other_modules(ROOT / "flash_attn" / Path(self.get_ext_filename(EXTENSION)).name)
            built = self._built_record()
            if built.is_file():
                write_text_if_changed(ROOT / "flash_attn" / variant.RECORD_NAME, built.read_text())

    binding_sources = sorted(BINDING_DIR.glob("*.cpp"))
    if not binding_sources:
        _fail(f"no binding sources: {BINDING_DIR.relative_to(ROOT)}/*.cpp is empty")
    headers = sorted(KERNELS_DIR.glob("*.h")) + sorted(BINDING_DIR.glob("*.h"))
    # -g0: Python's CFLAGS ask for debug info, which costs a third of the binding's
    # compile time and most of its size
    cxx = ["-O2", "-g0", "-fvisibility=hidden", f"-std={request.cxx_std}"]
    if request.stable:
        extension = _stable_extension(
            cpp_extension, _relative(binding_sources), _relative(headers), cxx, abi
        )
    else:
        extension = cpp_extension.CppExtension(
            name=EXTENSION,
            sources=_relative(binding_sources),
            include_dirs=[str(KERNELS_DIR)],
            depends=_relative(headers),
            extra_compile_args={"cxx": cxx},
        )
    return [extension], {"build_ext": BuildFlashAttn.with_options(use_ninja=True)}


def main() -> None:
    os.chdir(ROOT)  # setuptools wants source paths relative to the project
    torch, _ = _import_torch()
    try:
        abi = StableAbi.load()
        request = load_request(str(torch.__version__), abi)
        version = with_local_label(
            read_version(ROOT / "flash_attn" / "__init__.py"), request.local_label
        )
    except BuildConfigError as e:
        _fail(str(e))
    ext_modules, cmdclass = extension_and_cmdclass(request, abi)
    # an abi3 wheel (cp310-abi3) for the stable binding, whatever CPython builds it
    options = {"bdist_wheel": {"py_limited_api": abi.abi3_tag}} if request.stable else {}
    setup(
        version=version,
        install_requires=[request.torch_requirement],
        options=options,
        packages=find_packages(include=["flash_attn", "flash_attn.*"]),
        py_modules=["flash_attn_interface"],
        package_data={"flash_attn": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
