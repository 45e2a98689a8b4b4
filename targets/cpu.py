"""The CPU target: ONNX Runtime's default CPU execution provider (MLAS kernels)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import ClassVar

from dlopt.targets.base import CPU_PROVIDER, Target


class CpuTarget(Target):
    name: ClassVar[str] = "cpu"
    description: ClassVar[str] = "ONNX Runtime CPU execution provider"
    providers: ClassVar[tuple[str, ...]] = (CPU_PROVIDER,)
    # fp16 models run on the CPU EP only through casts or slow reference kernels: not listed.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int4")
    device_type: ClassVar[str] = "cpu"
    cpu_time_measures_work: ClassVar[bool] = True

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


# AMD cores by (family, model range): virtual machines often report only "AMD EPYC", and int8 speed
# differs by core: Zen 1 splits 256-bit AVX2 ops in two, and there MiniLM's int8 GEMMs measured no faster
# than float (DynamicQuantizeMatMul 57.6 ms vs MatMul 78 ms for more nodes), against ~1.9x on later cores.
_AMD_CORES = ((23, range(0x00, 0x30), "Zen/Zen+"), (23, range(0x30, 0x100), "Zen 2"),
              (25, range(0x00, 0x10), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"), (25, range(0x20, 0x60), "Zen 3"),
              (25, range(0x60, 0x100), "Zen 4"), (26, range(0x00, 0x100), "Zen 5"))


def core_name(vendor: str, family: int, model: int) -> str | None:
    """The microarchitecture of an AMD x86 core from its cpuinfo family and model, else None."""
    if vendor != "AuthenticAMD":
        return None
    return next((name for fam, models, name in _AMD_CORES if fam == family and model in models), None)


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name; where it carries no model number (as in many virtual machines: "AMD EPYC"),
    the x86 family/model and core are added, since they decide which kernels are fastest."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name")
        if name:
            if not any(ch.isdigit() for ch in name) and fields.get("cpu family", "").isdigit() \
                    and fields.get("model", "").isdigit():
                family, model = int(fields["cpu family"]), int(fields["model"])
                core = core_name(fields.get("vendor_id", ""), family, model)
                name += f" (family {family} model {model}{', ' + core if core else ''})"
            return name
    return platform.processor() or platform.machine()
