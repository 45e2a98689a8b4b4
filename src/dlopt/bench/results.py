"""What a benchmark returns: the loaded models, per batch size and model the samples and ratios."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench.config import CLOCKS, SCHEMA_NAME, SCHEMA_VERSION, BenchConfig
from dlopt.bench.sampler import WarmupReport
from dlopt.stats import Interval, Summary


@dataclass(frozen=True)
class LoadedModel:
    label: str
    path: Path
    size_bytes: int  # the .onnx file plus its external data files
    sha256: str
    handle: Any  # dlopt.targets.TargetSession
    rss_added_bytes: int  # process RSS growth from creating the session
    device_added_bytes: int | None  # device memory growth from creating the session (GPU), None on the host


@dataclass(frozen=True)
class ModelRun:
    """One model at one batch size: its samples (seconds) per clock and the derived numbers."""

    samples: Mapping[str, np.ndarray]
    summaries: Mapping[str, Summary]
    ratios: Mapping[str, Interval | None]  # to the first model; None for the first
    first_run_s: float  # wall time of the very first run at this batch (cold: allocation, autotuning)
    rss_added_bytes: int  # process RSS growth from binding the inputs and the first run
    device_added_bytes: int | None  # the same on the device (GPU); None on the host
    profile: tuple[Any, ...] | None = None  # dlopt.profile.OpTime rows with BenchConfig.profile


@dataclass(frozen=True)
class BatchRun:
    batch: int
    input_shapes: Mapping[str, tuple[int, ...]]
    rounds: int
    seconds: float
    warmup: WarmupReport
    models: tuple[ModelRun, ...]
    data_batches: int = 0  # real batches from --data cycled through, one per call (0: generated inputs)
    padding: float | None = None  # share of padding tokens (mask 0) in the timed inputs; None: no mask input
    runs_per_sample: int = 1  # runs whose mean latency is one stored sample (grouped runs x merged rounds)
    samples: int | None = None  # stored samples per model (rounds, or fewer when rounds were merged)
    length_sorting: Mapping[str, Any] | None = None  # tokens per sample a trimmed model computes (data.length_sorting)


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    clock: str
    clock_reason: str
    target: Mapping[str, Any]
    models: tuple[LoadedModel, ...]
    batches: tuple[BatchRun, ...]
    peak_rss_bytes: int
    machine: Mapping[str, Any]
    data_source: str | None = None  # where real inputs came from (--data), None: generated
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        from dlopt.stage import config_to_dict
        from dlopt.tables import environment

        def run_dict(run: ModelRun, model: LoadedModel, batch: int) -> dict[str, Any]:
            median = run.summaries[self.clock].median
            return {
                "model": model.label,
                "latency_ms": {c: run.summaries[c].as_dict(1e3) for c in CLOCKS},
                "first_run_ms": run.first_run_s * 1e3,
                "rss_added_bytes": run.rss_added_bytes,
                "device_added_bytes": run.device_added_bytes,
                "throughput_per_s": batch / median if median > 0 else None,
                "ratio": {c: (ratio.as_dict() if (ratio := run.ratios[c]) is not None else None) for c in CLOCKS},
                "samples_ms": {c: np.round(run.samples[c] * 1e3, 6).tolist() for c in CLOCKS},
                **({"profile": [t.as_dict() for t in run.profile]} if run.profile is not None else {}),
            }

        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "config": config_to_dict(self.config),
            "clock": self.clock,
            "clock_reason": self.clock_reason,
            "target": dict(self.target),
            "machine": dict(self.machine),
            "environment": environment(),
            "models": [
                {
                    "label": m.label,
                    "path": str(m.path),
                    "size_bytes": m.size_bytes,
                    "sha256": m.sha256,
                    "load_s": m.handle.load_s,
                    "rss_added_bytes": m.rss_added_bytes,
                    "device_added_bytes": m.device_added_bytes,
                    "runs_on": m.handle.runs_on,
                    "providers": list(m.handle.active_providers),
                }
                for m in self.models
            ],
            "batches": [
                {
                    "batch": b.batch,
                    "input_shapes": {k: list(v) for k, v in b.input_shapes.items()},
                    "data_batches": b.data_batches,
                    "padding": b.padding,
                    **({"length_sorting": dict(b.length_sorting)} if b.length_sorting else {}),
                    "rounds": b.rounds,
                    "samples": b.rounds if b.samples is None else b.samples,
                    "runs_per_sample": b.runs_per_sample,
                    "seconds": b.seconds,
                    "warmup": {"rounds": b.warmup.rounds, "seconds": b.warmup.seconds, "settled": b.warmup.settled},
                    "results": [run_dict(r, m, b.batch) for r, m in zip(b.models, self.models)],
                }
                for b in self.batches
            ],
            "peak_rss_bytes": self.peak_rss_bytes,
        }
