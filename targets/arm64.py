"""The `arm64` target: ONNX Runtime's CPU execution provider on an ARM64 CPU (a Graviton, Ampere or
Apple server, a Raspberry Pi). Models quantized for it use s8·s8 INT8, which ARM's int8 dot-product
kernels (sdot, smmla) compute exactly; x86 hosts without VNNI do not, so it runs only on ARM64."""

from __future__ import annotations

from typing import ClassVar

from dlopt.targets.base import CPU_PROVIDER, Int8Form
from dlopt.targets.cpu import CpuTarget, host_cpu


class Arm64Target(CpuTarget):
    name: ClassVar[str] = "arm64"
    description: ClassVar[str] = "ONNX Runtime CPU execution provider on an ARM64 CPU"
    providers: ClassVar[tuple[str, ...]] = (CPU_PROVIDER,)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int4")
    int8: ClassVar[Int8Form | None] = Int8Form(
        dynamic=True, activation="s8", per_channel=True, note="ARM int8 dot-product kernels are s8·s8"
    )
    package_formats: ClassVar[tuple[str, ...]] = ()
    # An ARM64 host times its own kernels as target cpu; arm64 names the deployment, not this host.
    kernels_measurable_here: ClassVar[bool] = False

    def is_available(self) -> tuple[bool, str]:
        cpu = host_cpu()
        if not cpu.is_arm64:
            return False, f"this host is {cpu.machine}, not ARM64"
        return super().is_available()


__all__ = ["Arm64Target"]
