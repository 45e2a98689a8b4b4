"""Where a model's time goes: ONNX Runtime's own per-kernel profile, summed by op type.

`dlopt bench --profile` adds this table beside the latency table. It is how a slow kernel shows up:
on this 2-core AMD EPYC, MiniLM's INT8 profile put 11.6 % of the run in 12 SkipLayerNormalization
nodes (300 us each, against ~30 us for the same sum and LayerNormalization unfused), which led to
dlopt.optimize.kernel_choice. The profile runs in its own session after the timed rounds, because
profiling slows every kernel call a little; its times are ORT's wall-clock kernel durations, so read
the shares, not the absolute numbers, on a busy machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OpTime:
    op_type: str
    ms_per_run: float  # summed kernel time of this op type's nodes, per run
    share: float  # of all kernel time
    nodes: int  # distinct nodes of this type that ran
    provider: str  # the execution provider that ran them (the first seen, if several)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op_type": self.op_type,
            "ms_per_run": self.ms_per_run,
            "share": self.share,
            "nodes": self.nodes,
            "provider": self.provider,
        }


def op_times(events: list[Mapping[str, Any]], runs: int) -> list[OpTime]:
    """Sum ORT profile events ("Node" events named "<node>_kernel_time") by op type, largest first."""
    total: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    provider: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op = str(args.get("op_name", "?"))
        total[op] = total.get(op, 0.0) + float(event.get("dur", 0))
        nodes.setdefault(op, set()).add(str(event["name"])[: -len("_kernel_time")])
        provider.setdefault(op, str(args.get("provider", "")))
    grand = sum(total.values())
    rows = [
        OpTime(op, us / max(runs, 1) / 1e3, us / grand if grand else 0.0, len(nodes[op]), provider[op])
        for op, us in total.items()
    ]
    return sorted(rows, key=lambda r: -r.ms_per_run)


def profile_session(
    target,
    model_path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 20,
    threads: int = 1,
    graph_opt_level: str = "all",
    device_id: int = 0,
    allow_fallback: bool = False,
) -> list[OpTime]:
    """Run `model_path` `runs` times on `target` (after two unprofiled warm-up runs) in a profiling
    session and return its kernel time by op type."""
    with tempfile.TemporaryDirectory(prefix="dlopt-profile-") as tmp:
        handle = target.create_session(
            Path(model_path),
            threads=threads,
            graph_opt_level=graph_opt_level,
            device_id=device_id,
            allow_fallback=allow_fallback,
            profile_prefix=str(Path(tmp) / "profile"),
        )
        bound = target.bind(handle, feeds)
        for _ in range(runs):
            bound()
        trace = handle.session.end_profiling()
        events = json.loads(Path(trace).read_text())
    # The warm-up is not counted: the first calls allocate buffers and would inflate every op's time.
    return op_times(_drop_first_runs(events, 2), max(runs - 2, 1))


def _drop_first_runs(events: list[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """Events after the `count`-th "model_run" session event (each run of the model logs one)."""
    ends = [e.get("ts", 0) + e.get("dur", 0) for e in events if e.get("name") == "model_run"]
    if len(ends) <= count:
        return list(events)
    cutoff = sorted(ends)[count - 1]
    return [e for e in events if e.get("ts", 0) >= cutoff]


__all__ = ["OpTime", "op_times", "profile_session"]
