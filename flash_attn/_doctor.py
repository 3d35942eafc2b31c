"""``python -m flash_attn``: is this flash_attn right for this torch and these GPUs?

For installed users (no source checkout needed). It reports the torch (version, CUDA,
C++ ABI), the GPUs and their compute capability, what this flash_attn was built for
(the build record: torch, CUDA; the extension's build_info: archs, head dims, dtypes),
whether the extension loads and its kernels cover each GPU, and, where something does
not fit, the variant to install and the exact pip command. Exit status 0 when nothing
failed, 1 otherwise. Without a GPU it says so and checks the rest.

Facts are gathered in one place (``gather``) and judged in another (``diagnose``, pure),
so the judgement is tested with any facts, and the factory's ``make doctor`` runs this
same module in the interpreter it inspects.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flash_attn._torch_check import (
    Installed,
    describe_build,
    fix_lines,
    locate,
    needed_variant,
    running_torch,
    skip_requested,
)
from flash_attn._variant import (
    INDEX_PLACEHOLDER,
    INDEX_URL_ENV,
    RECORD_NAME,
    SKIP_CHECK_ENV,
    TorchFacts,
    Variant,
    index_base,
    mismatches,
    torch_install_command,
)

OK, NOTE, FAIL = "ok", "note", "FAIL"
# the NVIDIA driver lists one directory per GPU here, whatever torch can see
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class Kernels:
    """The extension's build_info(): what kernels it holds."""

    cuda_archs: tuple[str, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    backward: bool


@dataclass(frozen=True)
class Facts:
    """Everything the doctor judges, gathered from this interpreter."""

    python: str
    executable: str
    torch: TorchFacts | None
    torch_error: str  # why torch could not be imported
    gpus: tuple[Gpu, ...]
    no_gpu_reason: str  # why torch sees no GPU ("" when it sees some)
    driver_gpus: int  # GPUs the NVIDIA driver lists (seen whether or not torch sees them)
    installed: Installed
    extension_error: str | None  # None: not tried (it would not be safe, or nothing to load)
    kernels: Kernels | None
    coverage: dict[int, bool | None] = field(default_factory=dict)  # GPU index -> covered


@dataclass(frozen=True)
class Finding:
    status: str  # OK, NOTE or FAIL
    topic: str
    text: str


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)
    fix: list[str] = field(default_factory=list)

    def add(self, status: str, topic: str, text: str) -> None:
        self.findings.append(Finding(status, topic, text))

    @property
    def ok(self) -> bool:
        return all(f.status != FAIL for f in self.findings)

    def render(self) -> str:
        width = max((len(f.topic) for f in self.findings), default=0)
        lines = ["flash_attn doctor"]
        lines += [f"  [{f.status:>4}] {f.topic:<{width}}  {f.text}" for f in self.findings]
        if self.fix:
            lines += ["", *self.fix]
        verdict = "all good" if self.ok else "something does not fit (see FAIL above)"
        lines += ["", f"{verdict}: exit status {0 if self.ok else 1}"]
        return "\n".join(lines)


def _list(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values) or "none"


def diagnose(facts: Facts, base_url: str = INDEX_PLACEHOLDER) -> Diagnosis:
    """Judge the facts: one finding per topic, and the fix where something failed."""
    d = Diagnosis()
    d.add(OK, "python", f"{facts.python} ({facts.executable})")
    running = facts.torch
    if running is None:
        d.add(FAIL, "torch", f"cannot be imported: {facts.torch_error}")
        d.fix = ["Install torch first; flash-attn wheels are built per torch minor release."]
        return d
    d.add(OK, "torch", running.describe())
    installed = facts.installed
    where = "source checkout" if installed.source_checkout else "installed"
    d.add(OK, "flash_attn", f"{installed.version} at {installed.package_dir} ({where})")

    record = installed.record
    found = mismatches(record, running) if record is not None else []
    if installed.extension is None:
        d.add(FAIL, "built for", "nothing: flash_attn._C is not built")
    elif installed.record_error:
        d.add(FAIL, "built for", f"unknown: {installed.record_error}")
    elif record is None:
        d.add(NOTE, "built for", f"unknown: no {RECORD_NAME} (a build older than the check)")
    elif found:
        d.add(FAIL, "built for", f"{describe_build(record)}: does NOT fit this torch")
        for m in found:
            d.add(FAIL, "", m.describe())
    else:
        d.add(OK, "built for", f"{describe_build(record)}: fits this torch")
    if skip_requested():
        d.add(NOTE, SKIP_CHECK_ENV, "set: `import flash_attn` does not check this")
    _judge_extension(d, facts, bool(found))
    cpu_torch_on_gpus = _judge_gpus(d, facts, running)

    if installed.extension is None or installed.record_error or found or facts.extension_error:
        d.fix = fix_lines(installed, running, base_url, needed_variant(running, record))
    elif cpu_torch_on_gpus:
        d.fix = _cuda_torch_fix(installed, running)
    return d


def _judge_extension(d: Diagnosis, facts: Facts, mismatched: bool) -> None:
    topic = "flash_attn._C"
    if facts.extension_error is None:
        if facts.installed.extension is not None:
            why = "built for another torch" if mismatched else "its build record is unreadable"
            d.add(FAIL, topic, f"not loaded ({why}: loading it could crash this process)")
        return
    if facts.extension_error:
        d.add(FAIL, topic, f"does not load: {facts.extension_error}")
        return
    k = facts.kernels
    if k is None:
        d.add(OK, topic, "loads")
        return
    d.add(
        OK,
        topic,
        f"loads: archs {_list(k.cuda_archs)}; head dims {_list(k.head_dims)}; "
        f"dtypes {_list(k.dtypes)}; backward {'yes' if k.backward else 'no'}",
    )


def _judge_gpus(d: Diagnosis, facts: Facts, running: TorchFacts) -> bool:
    """One line per GPU; True where torch is a CPU build on a machine with GPUs."""
    if running.cuda is None and facts.driver_gpus > 0:
        d.add(
            FAIL,
            "GPU",
            f"the NVIDIA driver lists {facts.driver_gpus} GPU(s), but torch "
            f"{running.version} is a CPU build: no kernel can run",
        )
        return True
    if not facts.gpus:
        d.add(NOTE, "GPU", f"none visible ({facts.no_gpu_reason}): kernel coverage not checked")
        return False
    from flash_attn._checks import ARCHS_KNOB, MIN_CAPABILITY

    archs = _list(facts.kernels.cuda_archs) if facts.kernels is not None else ""
    for gpu in facts.gpus:
        topic, what = f"GPU {gpu.index}", f"{gpu.name}, {gpu.sm}"
        covered = facts.coverage.get(gpu.index)
        if gpu.capability < MIN_CAPABILITY:
            d.add(FAIL, topic, f"{what}: older than sm_80, which the kernels need")
        elif facts.kernels is None:
            d.add(NOTE, topic, f"{what}: coverage unknown (flash_attn._C not loaded)")
        elif covered is False:
            d.add(
                FAIL,
                topic,
                f"{what}: NOT covered by this build's archs ({archs}); a build for it needs "
                f"{ARCHS_KNOB} to include {gpu.capability[0]}{gpu.capability[1]}",
            )
        elif covered is None:
            d.add(NOTE, topic, f"{what}: this build's archs ({archs}) are spelled oddly")
        else:
            d.add(OK, topic, f"{what}: covered by this build (archs {archs})")
    return False


def _cuda_torch_fix(installed: Installed, running: TorchFacts) -> list[str]:
    """A CUDA build of the same torch, for the CUDA this flash_attn was built with."""
    record = installed.record
    label = Variant.from_label(installed.version.partition("+")[2])
    cuda = record.cuda if record is not None else label.cuda if label is not None else None
    if cuda is None:
        return [
            "Install a CUDA build of the same torch (https://pytorch.org), then run "
            "`python -m flash_attn` again."
        ]
    return [
        "Install a CUDA build of the same torch, then run `python -m flash_attn` again:",
        "",
        f"    {torch_install_command(running.minor, cuda)}",
    ]


# --- gathering --------------------------------------------------------------


def _driver_gpu_count() -> int:
    try:
        return sum(1 for _ in DRIVER_GPUS.iterdir())
    except OSError:
        return 0


def _gpus() -> tuple[tuple[Gpu, ...], str]:
    import torch

    if torch.version.cuda is None:
        return (), "torch is a CPU build"
    try:
        if not torch.cuda.is_available():
            return (), "torch.cuda.is_available() is False"
        return tuple(
            Gpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())
        ), ""
    except Exception as exc:  # a broken driver: reported, not raised
        return (), f"{type(exc).__name__}: {exc}"


def _load_extension(installed: Installed, running: TorchFacts) -> tuple[str | None, Kernels | None]:
    """Load flash_attn._C the way an attention call does, unless its record says it
    was built for another torch (loading it could crash this process)."""
    if installed.extension is None:
        return None, None
    if installed.record_error or (
        installed.record is not None and mismatches(installed.record, running)
    ):
        return None, None
    from flash_attn import _ops

    error = _ops.current().load()
    if error:
        return error, None
    try:
        info = _ops.build_info()
    except Exception as exc:  # a build_info that does not parse: reported
        return f"{type(exc).__name__}: {exc}", None
    kernels = Kernels(info.cuda_archs, info.head_dims, info.dtypes, info.backward)
    return "", kernels


def gather(version: str) -> Facts:
    """The facts of this interpreter (imports torch; loads flash_attn._C where safe)."""
    python = ".".join(str(v) for v in sys.version_info[:3])
    installed = locate(version=version)
    try:
        running = running_torch()
    except Exception as exc:  # ImportError, or a torch that fails while importing
        return Facts(
            python,
            sys.executable,
            None,
            f"{type(exc).__name__}: {exc}",
            (),
            "",
            0,
            installed,
            None,
            None,
        )
    gpus, no_gpu = _gpus()
    error, kernels = _load_extension(installed, running)
    coverage: dict[int, bool | None] = {}
    if kernels is not None:
        from flash_attn._build_info import BuildInfo

        info = BuildInfo(kernels.head_dims, kernels.dtypes, kernels.backward, kernels.cuda_archs)
        coverage = {g.index: info.runs_on(g.capability) for g in gpus}
    return Facts(
        python=python,
        executable=sys.executable,
        torch=running,
        torch_error="",
        gpus=gpus,
        no_gpu_reason=no_gpu,
        driver_gpus=_driver_gpu_count(),
        installed=installed,
        extension_error=error,
        kernels=kernels,
        coverage=coverage,
    )


def _installed_version() -> str:
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flash_attn",
        description="Check that this flash_attn fits this torch and these GPUs, and say "
        "what to install where not. Exit status 0 when everything fits, 1 otherwise.",
    )
    p.add_argument(
        "--base-url",
        default=index_base(),
        help="where the wheel indexes are published, for the install command "
        f"(default: ${INDEX_URL_ENV} or {INDEX_PLACEHOLDER})",
    )
    args = p.parse_args(argv)
    import flash_attn

    facts = gather(getattr(flash_attn, "__version__", "") or _installed_version())
    diagnosis = diagnose(facts, args.base_url)
    print(diagnosis.render())
    return 0 if diagnosis.ok else 1
