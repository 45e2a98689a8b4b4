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


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
