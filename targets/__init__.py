"""dlopt.targets (the repository folder targets/ is installed under this name)."""

if __name__ != "dlopt.targets":  # imported as a top-level 'targets' from the repo root: a second copy
    raise ImportError("import this package as dlopt.targets (pip install -e . first)")

# --- the target registry (one registry: `dlopt bench/eval --target NAME` and the library both use it)
from dlopt.errors import InputError  # noqa: E402
from dlopt.targets.base import BoundRun, Target, TargetSession  # noqa: E402
from dlopt.targets.cpu import CpuTarget  # noqa: E402
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


register_target(CpuTarget())
register_target(CudaTarget())
register_target(MobileTarget())
register_target(XnnpackTarget())

__all__ = ["TARGETS", "BoundRun", "CpuTarget", "CudaTarget", "MobileTarget", "Target", "TargetSession", "get_target",
           "register_target", "XnnpackTarget"]
