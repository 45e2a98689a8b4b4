"""The CPU target (ONNX Runtime's default CPU execution provider, MLAS kernels), and the one reader
of this host's CPU: `host_cpu()` -> vendor, family/model, core, ISA flags (VNNI, ARM dot product)."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dlopt.targets.base import CPU_PROVIDER, Int8Form, Target

X86_MACHINES = ("x86_64", "amd64", "i686", "i386", "x86")
ARM64_MACHINES = ("aarch64", "arm64", "armv8l")


class CpuTarget(Target):
    name: ClassVar[str] = "cpu"
    description: ClassVar[str] = "ONNX Runtime CPU execution provider"
    providers: ClassVar[tuple[str, ...]] = (CPU_PROVIDER,)
    # fp16 models run on the CPU EP only through casts or slow reference kernels: not listed.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int4")
    device_type: ClassVar[str] = "cpu"
    cpu_time_measures_work: ClassVar[bool] = True
    int8: ClassVar[Int8Form | None] = Int8Form(
        dynamic=True,
        activation="host",
        per_channel=True,
        note="this host's MLAS kernels: u8 activations x s8 weights on x86, s8 x s8 on ARM",
    )
    package_formats: ClassVar[tuple[str, ...]] = ("onnx",)
    kernels_measurable_here: ClassVar[bool] = True

    def is_available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as e:  # a broken install: onnxruntime is a core dependency
            return False, f"onnxruntime cannot be imported ({e})"
        if CPU_PROVIDER not in ort.get_available_providers():
            return False, f"this onnxruntime has no {CPU_PROVIDER} (providers: {ort.get_available_providers()})"
        return True, f"onnxruntime {ort.__version__} {CPU_PROVIDER}"

    def device_name(self, device_id: int = 0) -> str:
        return cpu_model_name()


# ---------------------------------------------------------------------------------------------
# The host CPU: the one /proc/cpuinfo reader
# ---------------------------------------------------------------------------------------------

# AMD cores by (family, model range): virtual machines often report only "AMD EPYC", and int8 speed
# differs by core: Zen 1 splits 256-bit AVX2 ops in two, and there MiniLM's int8 GEMMs measured no faster
# than float (DynamicQuantizeMatMul 57.6 ms vs MatMul 78 ms for more nodes), against ~1.9x on later cores.
_AMD_CORES = (
    (23, range(0x00, 0x30), "Zen/Zen+"),
    (23, range(0x30, 0x100), "Zen 2"),
    (25, range(0x00, 0x10), "Zen 3"),
    (25, range(0x10, 0x20), "Zen 4"),
    (25, range(0x20, 0x60), "Zen 3"),
    (25, range(0x60, 0x100), "Zen 4"),
    (26, range(0x00, 0x100), "Zen 5"),
)
# ARM: /proc/cpuinfo has no model name on most aarch64 kernels, only "CPU implementer" and "CPU part".
# A few common cores (Arm's own part numbers, as in util-linux lscpu's table); others are named by number.
_ARM_IMPLEMENTERS = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x51: "Qualcomm",
    0x61: "Apple",
    0xC0: "Ampere",
}
_ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",
}
# The flags that decide which int8/float kernels run (reported; all flags are kept in HostCpu.flags).
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
    "fphp",
    "asimdhp",
    "sve",
    "sve2",
)
_X86_VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def core_name(vendor: str, family: int, model: int) -> str | None:
    """The microarchitecture of an AMD x86 core from its cpuinfo family and model, else None."""
    if vendor != "AuthenticAMD":
        return None
    return next((name for fam, models, name in _AMD_CORES if fam == family and model in models), None)


@dataclass(frozen=True)
class HostCpu:
    """What /proc/cpuinfo says about this machine's CPU (its first processor block)."""

    machine: str  # platform.machine(), lower case: x86_64, aarch64, arm64 ...
    vendor: str  # x86 vendor_id (AuthenticAMD, GenuineIntel); ARM implementer name (ARM, Apple ...); "" unknown
    model_name: str  # "model name" as written, "" where the kernel gives none (most aarch64)
    family: int | None  # x86 cpu family; ARM: the CPU architecture (8)
    model: int | None  # x86 model; ARM: the CPU part number
    core: str | None  # microarchitecture where known: "Zen/Zen+", "Neoverse-N1" ...
    flags: tuple[str, ...]  # every ISA flag, sorted (x86 "flags", ARM "Features")

    @classmethod
    def with_flags(cls, machine: str, flags: tuple[str, ...]) -> HostCpu:
        """A CPU known by its machine and ISA flags only: what the INT8 recipe reasons about for another
        CPU than this one (and what tests build)."""
        return cls(
            machine=machine, vendor="", model_name="", family=None, model=None, core=None, flags=tuple(sorted(flags))
        )

    @property
    def is_x86(self) -> bool:
        return self.machine in X86_MACHINES

    @property
    def is_arm64(self) -> bool:
        return self.machine in ARM64_MACHINES

    @property
    def vnni(self) -> bool:
        """x86 int8 dot product (AVX512-VNNI, AVX-VNNI or AMX): u8·s8 sums in 32 bits, full-range weights exact."""
        return bool(_X86_VNNI & set(self.flags))

    @property
    def dotprod(self) -> bool:
        """ARM int8 dot product (sdot/udot, cpuinfo 'asimddp')."""
        return "asimddp" in self.flags

    @property
    def i8mm(self) -> bool:
        """ARM int8 matrix multiply (smmla, cpuinfo 'i8mm')."""
        return "i8mm" in self.flags

    @property
    def int8_dot(self) -> bool:
        """An int8 dot-product instruction of either ISA (VNNI on x86, sdot on ARM)."""
        return self.vnni or self.dotprod

    @property
    def isa_flags(self) -> tuple[str, ...]:
        """The flags among ISA_FLAGS that this CPU has, sorted."""
        return tuple(f for f in self.flags if f in ISA_FLAGS)

    @property
    def label(self) -> str:
        """The CPU's name; where it carries no model number (as in many virtual machines: "AMD EPYC"),
        the x86 family/model and core are added, since they decide which kernels are fastest."""
        if self.model_name:
            if (
                not any(ch.isdigit() for ch in self.model_name)
                and self.is_x86
                and self.family is not None
                and self.model is not None
            ):
                core = f", {self.core}" if self.core else ""
                return f"{self.model_name} (family {self.family} model {self.model}{core})"
            return self.model_name
        if self.core:
            return f"{self.vendor} {self.core}".strip()
        if self.vendor and self.model is not None:
            return f"{self.vendor} part {self.model:#x}"
        return platform.processor() or self.machine


def _int(text: str | None) -> int | None:
    """A cpuinfo number: decimal (x86 family/model) or 0x-prefixed hex (ARM implementer/part)."""
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def parse_cpuinfo(text: str, machine: str) -> HostCpu:
    """Read the first processor block of a /proc/cpuinfo text (x86 or ARM layout)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    machine = machine.lower()
    flags = tuple(sorted(set((fields.get("flags") or fields.get("Features") or "").split())))
    if "CPU implementer" in fields:  # ARM
        implementer, part = _int(fields.get("CPU implementer")), _int(fields.get("CPU part"))
        vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer:#x}") if implementer is not None else ""
        return HostCpu(
            machine=machine,
            vendor=vendor,
            model_name=fields.get("model name", ""),
            family=_int(fields.get("CPU architecture")),
            model=part,
            core=_ARM_CORES.get((implementer, part)) if implementer is not None and part is not None else None,
            flags=flags,
        )
    vendor = fields.get("vendor_id", "")
    family, model = _int(fields.get("cpu family")), _int(fields.get("model"))
    core = core_name(vendor, family, model) if family is not None and model is not None else None
    return HostCpu(
        machine=machine,
        vendor=vendor,
        model_name=fields.get("model name", ""),
        family=family,
        model=model,
        core=core,
        flags=flags,
    )


@functools.lru_cache(maxsize=1)
def host_cpu() -> HostCpu:
    """This machine's CPU. Without a readable /proc/cpuinfo (macOS, Windows) only the machine is known."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())


def cpu_model_name() -> str:
    """The CPU's name as labels show it (HostCpu.label of this machine)."""
    return host_cpu().label


__all__ = [
    "ARM64_MACHINES",
    "ISA_FLAGS",
    "X86_MACHINES",
    "CpuTarget",
    "HostCpu",
    "core_name",
    "cpu_model_name",
    "host_cpu",
    "parse_cpuinfo",
]
