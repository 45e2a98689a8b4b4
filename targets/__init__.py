"""dlopt.targets (the repository folder targets/ is installed under this name)."""

if __name__ != "dlopt.targets":  # imported as a top-level 'targets' from the repo root: a second copy
    raise ImportError("import this package as dlopt.targets (pip install -e . first)")

# --- the target registry (one registry: `dlopt bench/eval --target NAME`, the stages and `dlopt package`
# all ask it; stages read a target's capabilities instead of listing target names)
from dlopt.errors import InputError  # noqa: E402
from dlopt.targets.arm64 import Arm64Target  # noqa: E402
from dlopt.targets.base import RUNTIMES, BoundRun, Capabilities, Int8Form, Int8Types, Target, TargetSession  # noqa: E402
from dlopt.targets.cpu import CpuTarget, HostCpu, cpu_model_name, host_cpu  # noqa: E402
from dlopt.targets.cuda import CudaTarget  # noqa: E402
from dlopt.targets.mobile import MobileTarget  # noqa: E402
from dlopt.targets.xnnpack import XnnpackTarget  # noqa: E402

TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target (the mobile targets join this way); names are unique."""
    if target.name in TARGETS and type(TARGETS[target.name]) is not type(target):
        raise ValueError(f"target name {target.name!r} is taken by {type(TARGETS[target.name]).__name__}")
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}", f"known targets: {', '.join(TARGETS)}") from None


def capabilities(name: str) -> Capabilities:
    """What target `name` declares: runtime, providers, precisions, INT8 form, FP16, package formats.
    Raises InputError for an unknown name."""
    return get_target(name).capabilities()


def target_names(
    kind: str | None = None, *, int8: bool | None = None, fp16_native: bool | None = None, package: bool | None = None
) -> list[str]:
    """Registered target names, in registration order, filtered by runtime `kind` ("onnxruntime",
    "executorch"), by whether dlopt quantizes to INT8 for them (`int8`), by native FP16, and by
    whether `dlopt package` builds a bundle for them (`package`)."""
    if kind is not None and kind not in RUNTIMES:
        raise InputError(f"unknown runtime kind {kind!r}", f"choose one of {', '.join(RUNTIMES)}")
    names = []
    for name, target in TARGETS.items():
        caps = target.capabilities()
        if kind is not None and caps.runtime != kind:
            continue
        if int8 is not None and (caps.int8 is not None) != int8:
            continue
        if fp16_native is not None and caps.fp16_native != fp16_native:
            continue
        if package is not None and bool(caps.package_formats) != package:
            continue
        names.append(name)
    return names


register_target(CpuTarget())
register_target(Arm64Target())
register_target(CudaTarget())
register_target(MobileTarget())
register_target(XnnpackTarget())

__all__ = [
    "RUNTIMES",
    "TARGETS",
    "Arm64Target",
    "BoundRun",
    "Capabilities",
    "CpuTarget",
    "CudaTarget",
    "HostCpu",
    "Int8Form",
    "Int8Types",
    "MobileTarget",
    "Target",
    "TargetSession",
    "XnnpackTarget",
    "capabilities",
    "cpu_model_name",
    "get_target",
    "host_cpu",
    "register_target",
    "target_names",
]
