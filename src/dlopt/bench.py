"""The latency harness behind `dlopt bench` (and the gate, which drives `InterleavedSampler` itself).

How a measurement goes, and why:
1. Each model is loaded on the target (`Target.create_session`, which refuses a silent fallback to
   the CPU); its size on disk, session-creation time and the memory it added (process RSS, and device
   memory on a GPU) are recorded.
2. Per batch size, the inputs are generated (or read from --data) and bound on the device once
   (`Target.bind`), so the timed call is the model and nothing else.
3. Warm-up runs all models round-robin until each one's latency has settled (the median of the last
   5 runs no more than 5 % below the 5 before: runs stopped getting faster), not for a fixed count:
   first runs pay for allocation, lazy initialisation and autotuning, and how many runs that takes
   depends on the model and target.
   It stops at a cap (a quarter of the budget) and says so when latencies never settled.
4. Very fast models are timed in groups: from the warm-up latencies, each sample is `runs_per_sample`
   back-to-back runs (at least ~1 ms of work), so the clocks' own cost and resolution do not dominate
   a sample and the CI has real width. Timed rounds run the models interleaved, every model once per
   round, until the time budget or the round count is reached; the order rotates (A B C, B C A, C A B, …) so no model always runs
   in the same position. Interleaving puts every model through the same machine states (other jobs, frequency,
   thermal), so their ratio is fair even when absolute times drift; garbage collection is off in
   the loop. Each call records wall time and the calling thread's CPU time.
   The budget is one deadline for everything (session setup, binding, warm-up, timed rounds and the
   bootstrap), from the moment `benchmark` is called (the CLI: from the process start): a round is not
   started when it would end past the deadline. Stored samples are capped (`max_samples`): when the cap
   is reached, adjacent rounds are merged pairwise (their mean, the pairing kept), so memory and the
   bootstrap's cost stay bounded however fast the model.
5. Ratios to the first model are the median over rounds of (model time / first model's time in the
   same round), with a bootstrap 95 % confidence interval over rounds (dlopt.stats.ratio_ci): the
   two runs of a round share the machine's state, so its quotient cancels most of the noise.

The floor of what a ratio can show: two sessions of the *same* file differ by about 1 % on a 30 us
model (0.986-0.992 in repeated runs here, CIs excluding 1), from where their buffers land in memory;
rotating the order did not change that. Ratios within ~2 % of 1 for tiny models are not a finding.

Which clock decides: with one intra-op thread on the CPU the work runs on the calling thread, and its
CPU time leaves out time the thread spent descheduled. On a shared machine that is far steadier than
wall time (spreads of ~2 % against 35-61 % seen on a busy 2-core CI box) and the ratio of CPU times is
the ratio of work done. With more threads, pool threads' time is invisible to the calling thread, and
on a GPU the thread only waits: wall time is the honest clock there. `clock="auto"` picks accordingly.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import re
import resource
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.inputs import parse_input_shapes
from dlopt.stats import DEFAULT_BOOTSTRAP, RATIO_METHODS, Interval, Summary, has_settled, ratio_ci, summarize

SCHEMA_NAME = "dlopt.bench"
SCHEMA_VERSION = 1
CLOCKS = ("cpu", "wall")
DEFAULT_BUDGET_S = 30.0
DEFAULT_SEQ_LEN = 128
MIN_TIMED_ROUNDS = 3  # even past the deadline: fewer cannot give a ratio's CI

ClockFn = Callable[[], tuple[float, float]]  # -> (wall seconds, calling thread's CPU seconds)
ProgressFn = Callable[[str, float], None]  # (what is happening, fraction done of the whole measurement)


def read_clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    target: str = "cpu"
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    seq_len: int = DEFAULT_SEQ_LEN  # for dynamic axes other than the first (the batch axis)
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: shapes of generated inputs (--input-shape)
    budget_s: float = DEFAULT_BUDGET_S  # wall time of the whole run: loading, warm-up, timed rounds, statistics
    rounds: int | None = None  # a fixed number of timed rounds per batch size instead of the budget
    min_rounds: int = 20  # fewer fit in the budget: the run says so (it still stops at the deadline)
    min_sample_s: float = 1e-3  # a sample is at least this much work: faster models run several times per sample
    max_samples: int = 2000  # per model and batch size; more rounds are merged pairwise (budget runs only)
    clock: str = "auto"  # "cpu", "wall", or "auto" (the target's choice for this thread count)
    warmup_window: int = 5
    warmup_tolerance: float = 0.05
    warmup_max_fraction: float = 0.25  # of each batch size's share of the budget
    graph_opt_level: str = "all"
    allow_fallback: bool = False
    cuda_graph: bool = False
    device_id: int = 0
    confidence: float = 0.95
    ratio_method: str = "round-median"  # see dlopt.stats.ratio_ci
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    profile: bool = False  # after timing, ORT's kernel profile summed by op type (dlopt.profile)
    profile_runs: int = 22  # profiled runs per model and batch size; the first two are not counted


def validate_config(config: BenchConfig) -> None:
    if config.threads < 1:
        raise InputError(f"threads must be at least 1, got {config.threads}", "pass {threads=1} or more")
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(config.batch_sizes)}",
                         "e.g. 1, 8, 32")
    if config.seq_len < 1:
        raise InputError(f"the sequence length must be at least 1, got {config.seq_len}", "e.g. {seq_len=128}")
    if config.rounds is None and config.budget_s <= 0:
        raise InputError(f"the time budget must be positive, got {config.budget_s} s", "e.g. 30 s")
    if config.max_samples < 2 or config.min_sample_s < 0:
        raise InputError("max_samples must be at least 2 and min_sample_s non-negative", "use the defaults")
    if config.rounds is not None and config.rounds < 2:
        raise InputError(f"rounds must be at least 2, got {config.rounds}", "e.g. {rounds=200}")
    if config.clock not in (*CLOCKS, "auto"):
        raise InputError(f"unknown clock {config.clock!r}", "choose cpu, wall or auto")
    if config.ratio_method not in RATIO_METHODS:
        raise InputError(f"unknown ratio method {config.ratio_method!r}", f"choose {', '.join(RATIO_METHODS)}")
    if config.profile and config.profile_runs < 3:
        raise InputError(f"profile runs must be at least 3, got {config.profile_runs}", "e.g. 22")
    if not 0.5 <= config.confidence < 1.0:
        raise InputError(f"confidence must be in [0.5, 1), got {config.confidence}", "e.g. 0.95")
    parse_input_shapes(config.input_shapes)


def parse_duration(text: str) -> float:
    """'30', '30s', '1.5m', '500ms' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*", str(text))
    if not match:
        raise InputError(f"cannot read {text!r} as a duration", "write e.g. 30s, 2m or 500ms")
    value = float(match.group(1))
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, None: 1.0}[match.group(2)]


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    try:
        sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"cannot read batch sizes from {text!r}", "write positive integers, e.g. 1,8,32")
    return sizes


# --------------------------------------------------------------------------- the sequential API


@dataclass(frozen=True, kw_only=True)
class WarmupReport:
    rounds: int
    seconds: float
    settled: bool


class InterleavedSampler:
    """Runs several prepared models in rounds (each model once per round, the order rotating) and
    keeps every timing; more rounds can be added at
    any time, and the ratio's bootstrap CI asked for in between. This is the sequential API the gate
    drives ("measure A and B interleaved, add rounds, give me the CI so far").

    A class and not a function because its state (the samples so far) is the point: the caller
    decides when to stop from the statistics of what was measured.

    `runners` are zero-argument callables that run one model once (e.g. `Target.bind(...)` results).
    `max_samples`: when that many samples are stored, adjacent ones are merged pairwise (each pair's
    mean, for every model and clock alike, so the rounds' pairing is kept), and from then on each new
    sample is the mean of as many consecutive rounds: memory and the bootstrap's cost stay bounded
    while the whole run still counts. `merged` says how many rounds a sample averages (the last
    rounds of a run that do not fill a sample are not stored).
    """

    WARM_KEPT = 4096  # warm-up samples kept per model (the latest): only the last few decide anything

    def __init__(self, runners: Sequence[Callable[[], object]], *, clock: ClockFn = read_clocks,
                 max_samples: int | None = None):
        if not runners:
            raise ValueError("nothing to measure")
        if max_samples is not None and max_samples < 2:
            raise ValueError("max_samples must be at least 2")
        self._runners = list(runners)
        self._clock = clock
        self._timed: dict[str, list[list[float]]] = {c: [[] for _ in runners] for c in CLOCKS}
        self._warm: dict[str, list[list[float]]] = {c: [[] for _ in runners] for c in CLOCKS}
        self._rounds_started = 0
        self._max_samples = max_samples - max_samples % 2 if max_samples is not None else None
        self._pending: dict[str, list[list[float]]] = {c: [[] for _ in runners] for c in CLOCKS}
        self.merged = 1  # rounds averaged into each stored sample
        self.timed_rounds = 0  # rounds run, before any merging

    @property
    def rounds(self) -> int:
        """Stored samples per model (timed rounds, or merged groups of them)."""
        return len(self._timed["wall"][0])

    def _timed_round(self) -> None:
        self._round(self._pending)
        self.timed_rounds += 1
        if len(self._pending["wall"][0]) < self.merged:
            return
        for clock, per_model in self._pending.items():
            for i, values in enumerate(per_model):
                self._timed[clock][i].append(sum(values) / len(values))
                values.clear()
        if self._max_samples is not None and self.rounds >= self._max_samples:
            for per_model in self._timed.values():
                for i, values in enumerate(per_model):
                    x = np.asarray(values, dtype=np.float64)
                    per_model[i] = ((x[0::2] + x[1::2]) / 2.0).tolist()
            self.merged *= 2

    @property
    def models(self) -> int:
        return len(self._runners)

    def _round(self, store: dict[str, list[list[float]]]) -> None:
        clock = self._clock
        n = len(self._runners)
        # The order rotates every round (A B C, B C A, C A B, ...): each model runs in each position
        # equally often, so whatever a run leaves behind in caches for the next one (warm or cold)
        # does not always favour the same model.
        shift = self._rounds_started % n
        self._rounds_started += 1
        for i in [(k + shift) % n for k in range(n)]:
            run = self._runners[i]
            wall0, cpu0 = clock()
            run()
            wall1, cpu1 = clock()
            store["wall"][i].append(wall1 - wall0)
            store["cpu"][i].append(cpu1 - cpu0)

    def warm_up(self, *, max_seconds: float, clock: str = "wall", window: int = 5, tolerance: float = 0.05,
                on_round: Callable[[float], None] | None = None) -> WarmupReport:
        """Run rounds (not kept as samples) until every model's `clock` latency has settled, or
        `max_seconds` have passed (then `settled` is False). At least 2 * window rounds."""
        _check_clock(clock)
        start = time.perf_counter()
        rounds = 0
        settled = False
        with _gc_paused():
            while True:
                self._round(self._warm)
                rounds += 1
                elapsed = time.perf_counter() - start
                if on_round is not None:
                    on_round(min(1.0, elapsed / max_seconds) if max_seconds > 0 else 1.0)
                settled = all(has_settled(s[-2 * window:], window=window, tolerance=tolerance)
                              for s in self._warm[clock])
                if len(self._warm["wall"][0]) > 2 * self.WARM_KEPT:
                    for per_model in self._warm.values():
                        for values in per_model:
                            del values[:-self.WARM_KEPT]
                if settled or elapsed >= max_seconds:
                    break
        return WarmupReport(rounds=rounds, seconds=time.perf_counter() - start, settled=settled)

    def run_rounds(self, n: int, *, on_round: Callable[[float], None] | None = None) -> None:
        """Add `n` timed rounds."""
        with _gc_paused():
            for k in range(n):
                self._timed_round()
                if on_round is not None:
                    on_round((k + 1) / n)

    def run_for(self, seconds: float, *, min_rounds: int = 0, max_rounds: int | None = None,
                on_round: Callable[[float], None] | None = None) -> int:
        """Add timed rounds for at most `seconds` of wall time (but at least `min_rounds`); returns
        rounds added. A round is not started when, as long as the slowest so far, it would end late."""
        start = time.perf_counter()
        added = 0
        longest = 0.0
        with _gc_paused():
            while True:
                elapsed = time.perf_counter() - start
                if added >= min_rounds and (elapsed + longest > seconds
                                            or (max_rounds is not None and added >= max_rounds)):
                    break
                self._timed_round()
                added += 1
                longest = max(longest, time.perf_counter() - start - elapsed)
                if on_round is not None:
                    on_round(min(1.0, (time.perf_counter() - start) / seconds) if seconds > 0 else 1.0)
        return added

    def samples(self, index: int, clock: str = "wall") -> np.ndarray:
        """Timed latencies of model `index` in seconds, in round order."""
        _check_clock(clock)
        return np.asarray(self._timed[clock][index], dtype=np.float64)

    def warmup_samples(self, index: int, clock: str = "wall") -> np.ndarray:
        _check_clock(clock)
        return np.asarray(self._warm[clock][index], dtype=np.float64)

    def summary(self, index: int, clock: str = "wall") -> Summary:
        return summarize(self.samples(index, clock))

    def ratio(self, index: int, clock: str = "wall", *, baseline: int = 0, method: str = "round-median",
              confidence: float = 0.95, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> Interval:
        """Latency of model `index` relative to model `baseline` over the rounds so far, with a
        bootstrap CI over rounds (dlopt.stats.ratio_ci; default: median of per-round ratios)."""
        return ratio_ci(self.samples(baseline, clock), self.samples(index, clock), method=method, paired=True,
                        confidence=confidence, n_boot=n_boot, seed=seed)


class Repeated:
    """Runs `run` `times` times back to back: one timed sample of a very fast model.

    Why: a model that runs in microseconds gives thousands of rounds a second; bootstrapping all of
    them (n_boot x rounds) would soon cost more than the measuring, the clocks' own overhead and
    resolution become part of each sample (a CI of zero width), and storing them grows without bound.
    Grouping keeps a sample at a chosen minimum of work (`runs_per_sample`), as timeit does."""

    def __init__(self, run: Callable[[], object], times: int):
        self.run, self.times = run, times

    def __call__(self) -> None:
        for _ in range(self.times):
            self.run()


def runs_per_sample(sampler: InterleavedSampler, clock: str, min_sample_s: float, max_runs: int = 1000) -> int:
    """How many runs make one sample of at least `min_sample_s`, from the fastest model's settled
    warm-up latency (the median of its last 5 warm-up runs)."""
    fastest = min(float(np.median(sampler.warmup_samples(i, clock)[-5:])) for i in range(sampler.models))
    if fastest <= 0:
        return max_runs
    return max(1, min(max_runs, math.ceil(min_sample_s / fastest)))


class _gc_paused:
    """Garbage collection off inside a timed loop (as timeit does): a collection is not the model's cost."""

    def __enter__(self):
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self._was:
            gc.enable()


def _check_clock(clock: str) -> None:
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r} (choose {', '.join(CLOCKS)})")


# --------------------------------------------------------------------------- inputs

def load_data(path: str | os.PathLike, *, samples: int = 64, seq_len: int = DEFAULT_SEQ_LEN
              ) -> dict[str, np.ndarray]:
    """Arrays from an .npz file (keys = input names), with errors that name the file; or, for
    `model:NAME`, `samples` real inputs of that reference model (dlopt.models: padded sentences at
    seq_len, photos, test images)."""
    if str(path).startswith("model:"):
        from dlopt.models import get_reference_model

        return get_reference_model(str(path)[len("model:"):]).benchmark_inputs(samples, seq_len=seq_len)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} does not exist", "give an .npz file with one array per model input")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zlib.error) as e:
        raise InputError(f"{p} is not a readable .npz file ({e})", "write it with numpy.savez") from e


# --------------------------------------------------------------------------- models and the whole run


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
        from dlopt.report import environment
        from dlopt.stage import config_to_dict

        def run_dict(run: ModelRun, model: LoadedModel, batch: int) -> dict[str, Any]:
            median = run.summaries[self.clock].median
            return {
                "model": model.label,
                "latency_ms": {c: run.summaries[c].as_dict(1e3) for c in CLOCKS},
                "first_run_ms": run.first_run_s * 1e3,
                "rss_added_bytes": run.rss_added_bytes,
                "device_added_bytes": run.device_added_bytes,
                "throughput_per_s": batch / median if median > 0 else None,
                "ratio": {c: (run.ratios[c].as_dict() if run.ratios[c] is not None else None) for c in CLOCKS},
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
            "models": [{
                "label": m.label, "path": str(m.path), "size_bytes": m.size_bytes, "sha256": m.sha256,
                "load_s": m.handle.load_s, "rss_added_bytes": m.rss_added_bytes,
                "device_added_bytes": m.device_added_bytes, "runs_on": m.handle.runs_on,
                "providers": list(m.handle.active_providers),
            } for m in self.models],
            "batches": [{
                "batch": b.batch,
                "input_shapes": {k: list(v) for k, v in b.input_shapes.items()},
                "data_batches": b.data_batches,
                "padding": b.padding,
                "rounds": b.rounds,
                "samples": b.rounds if b.samples is None else b.samples,
                "runs_per_sample": b.runs_per_sample,
                "seconds": b.seconds,
                "warmup": {"rounds": b.warmup.rounds, "seconds": b.warmup.seconds, "settled": b.warmup.settled},
                "results": [run_dict(r, m, b.batch) for r, m in zip(b.models, self.models)],
            } for b in self.batches],
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def choose_clock(config: BenchConfig, target) -> tuple[str, str]:
    if config.clock != "auto":
        return config.clock, "chosen with --clock"
    clock = target.default_clock(config.threads)
    if clock == "cpu":
        return clock, "auto: one thread on the CPU, where thread CPU time is steadier than wall time"
    if not target.cpu_time_measures_work:
        return clock, f"auto: on {target.name} the calling thread waits for the device; wall time measures the work"
    return clock, f"auto: {config.threads} threads; pool threads' CPU time is invisible to the caller, so wall time"


def machine_fingerprint(threads: int, target=None, device_id: int = 0) -> dict[str, Any]:
    """What a latency number depends on besides the model: stored with results so that numbers from
    another machine are recognised as such."""
    import platform

    import onnxruntime as ort
    import psutil

    from dlopt.runtime import isa_line
    from dlopt.targets.cpu import host_cpu

    cpu = host_cpu()
    flags = " ".join(cpu.flags)  # sorted: x86 "flags" or ARM "Features"
    fingerprint = {
        "cpu_model": cpu.label,
        "cpu_isa": isa_line(cpu),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
        "threads": threads,
    }
    if target is not None:
        fingerprint["device"] = target.device_name(device_id)
    return fingerprint


def _file_facts(path: Path) -> tuple[int, str]:
    """Bytes on disk (with external data files) and the sha256 of the .onnx file."""
    from dlopt.fileio import load_onnx

    if path.suffix == ".ort" and path.is_file():
        size = path.stat().st_size  # ORT format (mobile): no protobuf to check; onnxruntime checks it
    else:
        model = load_onnx(path, load_external_data=False)  # clear errors for missing or corrupt files
        size = path.stat().st_size
        seen = set()
        from onnx.external_data_helper import _get_all_tensors

        for tensor in _get_all_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    data_file = path.parent / entry.value
                    if data_file.exists():
                        size += data_file.stat().st_size
        del model
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return size, digest.hexdigest()


def _labels(paths: Sequence[Path]) -> list[str]:
    labels = [p.name for p in paths]
    distinct = {p.resolve() for p in paths}
    if len({p.name for p in distinct}) < len(distinct):  # same file names in different folders: use paths
        labels = [str(p) for p in paths]
    counts: dict[str, int] = {}
    out = []
    for label in labels:  # the same file twice (an A/A check): number them
        counts[label] = counts.get(label, 0) + 1
        out.append(label if counts[label] == 1 else f"{label}#{counts[label]}")
    return out


def _initialize_runtime() -> None:
    """Create and run a one-node session first, so that ONNX Runtime's one-time process setup (its
    environment, kernel registries, allocators: tens of MB) is not counted as the first model's memory,
    and so that the process's first session carries dlopt's session configuration (denormals flushed on
    the calling thread: see dlopt.runtime)."""
    from dlopt.runtime import initialize

    initialize()


def load_models(paths: Sequence[str | os.PathLike], config: BenchConfig,
                progress: ProgressFn | None = None) -> tuple[Any, list[LoadedModel]]:
    """Check the files, create a session per model on the target; returns (target, models)."""
    import psutil

    from dlopt.targets import get_target

    target = get_target(config.target)
    if not paths:
        raise InputError("no model to benchmark", "give one or more .onnx files")
    resolved = [Path(p) for p in paths]
    facts = [_file_facts(p) for p in resolved]  # all files checked before any slow work
    if not config.allow_fallback:
        target.require_available()
    provider_options = target.provider_options(device_id=config.device_id, cuda_graph=config.cuda_graph)
    _initialize_runtime()
    process = psutil.Process()
    loaded = []
    for path, label, (size, digest) in zip(resolved, _labels(resolved), facts):
        if progress is not None:
            progress(f"loading {label}", 0.0)
        rss_before = process.memory_info().rss
        device_before = target.memory_in_use(config.device_id)
        handle = target.create_session(path, threads=config.threads, graph_opt_level=config.graph_opt_level,
                                       provider_options=provider_options, allow_fallback=config.allow_fallback,
                                       device_id=config.device_id)
        device_after = target.memory_in_use(config.device_id)
        loaded.append(LoadedModel(
            label=label, path=path, size_bytes=size, sha256=digest, handle=handle,
            rss_added_bytes=max(0, process.memory_info().rss - rss_before),
            device_added_bytes=(device_after - device_before) if None not in (device_before, device_after) else None,
        ))
    return target, loaded


FINISH_RESERVE_S = 0.15  # after the last batch: the machine fingerprint, the result's tables and JSON
BOOTSTRAP_S_PER_ELEMENT = 5e-8  # a ratio's bootstrap costs about n_boot x samples x this (2-core EPYC, busy)


class _Deadline:
    """The budget as one deadline for the whole run, and the progress callback that shows the time left
    (throttled: a fast model's rounds must not each pay for redrawing a progress bar)."""

    def __init__(self, config: BenchConfig, started: float | None, progress: ProgressFn | None):
        self.started = time.perf_counter() if started is None else started
        self.at = self.started + config.budget_s if config.rounds is None else None
        self.budget_s = config.budget_s
        self._progress = progress
        self._last = -1.0

    def left(self) -> float:
        return math.inf if self.at is None else self.at - time.perf_counter()

    def report(self, what: str, fraction: float) -> None:
        if self._progress is None:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and fraction < 1.0:
            return
        self._last = now
        if self.at is None:
            self._progress(what, fraction)
        else:
            self._progress(f"{what}, {max(0.0, self.at - now):.0f} s left",
                           min(1.0, (now - self.started) / self.budget_s))


def benchmark(paths: Sequence[str | os.PathLike], config: BenchConfig = BenchConfig(), *,
              data: Mapping[str, np.ndarray] | None = None, data_source: str = "the data",
              progress: ProgressFn | None = None, started: float | None = None) -> BenchResult:
    """Measure one or more models on `config.target`, interleaved, at each batch size.

    With `data`, its arrays are the inputs: at each batch size b, consecutive batches of b samples,
    one per timed call in turn (real samples, one batch at a time). Without `config.rounds`, the whole
    call ends within `config.budget_s` of `started` (a time.perf_counter() value; default: now),
    loading and statistics included. Raises InputError / TargetUnavailableError on bad input or a
    target that cannot run here."""
    from dlopt.runtime import runtime_report

    validate_config(config)
    deadline = _Deadline(config, started, progress)
    target, models = load_models(paths, config, deadline.report)
    runs_on = {m.handle.runs_on for m in models}
    from dlopt.targets import get_target

    # After an allowed fallback the work runs on the CPU: the clock is chosen for where it runs.
    clock, clock_reason = choose_clock(config, get_target(sorted(runs_on)[0]) if len(runs_on) == 1 else target)
    target_facts = {
        "name": target.name,
        "runs_on": sorted(runs_on)[0] if len(runs_on) == 1 else "mixed",
        "fell_back": any(m.handle.fell_back for m in models),
        "providers": list(models[0].handle.active_providers),
        "device": target.device_name(config.device_id) if not any(m.handle.fell_back for m in models)
        else "host CPU (fallback)",
        "cuda_graph": config.cuda_graph,
        "threads": config.threads,
        "graph_opt_level": config.graph_opt_level,
        "session": runtime_report(),
    }
    batches = config.batch_sizes
    batch_runs = []
    for k, batch in enumerate(batches):
        def report(what: str, fraction: float, _k=k) -> None:
            deadline.report(what, (_k + min(1.0, fraction)) / len(batches))

        # what is left of the budget, shared equally by the batch sizes still to measure
        share = None if deadline.at is None else max(0.0, deadline.left() - FINISH_RESERVE_S) / (len(batches) - k)
        batch_runs.append(_measure_batch(target, models, config, batch, data, data_source, clock, share, report))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB
    return BenchResult(config=config, clock=clock, clock_reason=clock_reason, target=target_facts,
                       models=tuple(models), batches=tuple(batch_runs), peak_rss_bytes=int(peak),
                       machine=machine_fingerprint(config.threads, target, config.device_id),
                       data_source=data_source if data is not None else None)


@dataclass(frozen=True)
class BoundModels:
    """Models with their inputs bound on the device and run once: ready for an InterleavedSampler."""

    runners: tuple[Any, ...]  # dlopt.targets.BoundRun, one per model
    input_shapes: Mapping[str, tuple[int, ...]]
    first_run_s: tuple[float, ...]
    rss_added_bytes: tuple[int, ...]
    device_added_bytes: tuple[int | None, ...]
    data_batches: int = 0  # real batches cycled through, one per call (0: generated inputs)
    padding: float | None = None  # share of masked-out (padding) tokens in the timed inputs; None: no mask input


MAX_DATA_BATCHES = 32  # real batches bound per model and cycled through (device memory stays small)


def data_batches(specs: Sequence[Any], data: Mapping[str, np.ndarray], source: str, batch: int | None
                 ) -> list[dict[str, np.ndarray]]:
    """`data` cut along its first axis into consecutive batches of `batch` samples (at most
    MAX_DATA_BATCHES; a remainder shorter than `batch` is left out), each checked against the model's
    inputs (`specs`: dlopt.inputs.session_inputs). `batch` None: all of `data` as one batch."""
    from dlopt.inputs import feeds_from_arrays

    if batch is None:
        return [feeds_from_arrays(specs, data, source)]
    rows = {int(np.shape(data[s.name])[0]) for s in specs if s.name in data and np.ndim(data[s.name]) > 0}
    if len(rows) > 1:
        raise InputError(f"{source}: the model's input arrays hold different numbers of samples {sorted(rows)}",
                         "give every input the same first (batch) axis")
    count = rows.pop() if rows else 0
    if count < batch:
        raise InputError(f"{source} holds {count} sample(s), fewer than batch {batch}",
                         "give more samples, or a smaller batch size")
    return [feeds_from_arrays(specs, {k: v[i * batch:(i + 1) * batch] if np.ndim(v) > 0 else v
                                      for k, v in data.items()}, source)
            for i in range(min(count // batch, MAX_DATA_BATCHES))]


def model_feed_batches(model: LoadedModel, *, batch: int | None, seq_len: int, seed: int,
                       data: Mapping[str, np.ndarray] | None, data_source: str = "the data",
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[dict[str, np.ndarray]]:
    """The inputs a model is measured on: real batches of `batch` samples from `data` (one per timed call,
    in turn), or one generated (seeded) batch (model_feeds)."""
    if data is not None:
        from dlopt.inputs import session_inputs

        return data_batches(session_inputs(model.handle.session), data, data_source, batch)
    return [model_feeds(model, batch=batch, seq_len=seq_len, seed=seed, data=None, input_shapes=input_shapes)]


def model_feeds(model: LoadedModel, *, batch: int | None, seq_len: int, seed: int,
                data: Mapping[str, np.ndarray] | None, data_source: str = "the data",
                input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The inputs of one timed call: the first batch of `data` (see model_feed_batches), or generated
    (seeded) for `batch` by dlopt.inputs (free sizes that the model runs on, `input_shapes` as
    --input-shape gives them)."""
    from dlopt.fileio import load_onnx
    from dlopt.inputs import session_inputs, synthetic_feeds, value_ranges
    from dlopt.sessions import trial_run

    session = model.handle.session
    specs = session_inputs(session)
    if data is not None:
        return data_batches(specs, data, data_source, batch)[0]
    # an ORT-format file has no ONNX graph to read the integer inputs' ranges from
    ranges = {} if model.path.suffix == ".ort" else value_ranges(load_onnx(model.path, load_external_data=False))
    return synthetic_feeds(specs, batch=batch, seq_len=seq_len, seed=seed, overrides=input_shapes, ranges=ranges,
                           run=lambda feeds: trial_run(session, feeds))[0]


def padding_share(feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """The share of padding tokens (attention mask 0) over `feeds_list`; None when no integer input is
    named like a mask."""
    masks = [np.asarray(v) for f in feeds_list for k, v in f.items()
             if "mask" in k.lower() and np.issubdtype(np.asarray(v).dtype, np.integer)]
    if not masks:
        return None
    return float(1 - np.mean(np.concatenate([m.ravel() != 0 for m in masks])))


def padding_note(padding: float | None) -> str:
    return f", {100 * padding:.0f} % of tokens padding" if padding else ""


class CyclingRun:
    """Bound runs of one model on several real batches; each call runs the next batch in turn, so a
    timed loop covers the data one batch at a time (in an interleaved round every model sees the same one)."""

    def __init__(self, runs: Sequence[Any]):
        self.runs = list(runs)
        self._next = 0

    def __call__(self) -> None:
        run = self.runs[self._next]
        self._next = (self._next + 1) % len(self.runs)
        run()

    def outputs(self) -> dict[str, np.ndarray]:
        return self.runs[(self._next - 1) % len(self.runs)].outputs()


def bind_models(target, models: Sequence[LoadedModel], *, batch: int | None = 1, seq_len: int = DEFAULT_SEQ_LEN,
                seed: int = 0, data: Mapping[str, np.ndarray] | None = None, data_source: str = "the data",
                device_id: int = 0, progress: ProgressFn | None = None,
                input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> BoundModels:
    """Generate (or take from `data`) each model's inputs, bind them on the target's device and run
    each model once (its cold first run, timed). The gate's entry point into the harness:
    `InterleavedSampler(bind_models(target, load_models(paths, config)[1]).runners)`."""
    import psutil

    process = psutil.Process()
    runners, first_run_s, rss_added, device_added = [], [], [], []
    shapes: dict[str, tuple[int, ...]] = {}
    data_count, all_feeds = 1, []
    for m in models:
        feeds_list = model_feed_batches(m, batch=batch, seq_len=seq_len, seed=seed, data=data,
                                        data_source=data_source, input_shapes=input_shapes)
        if m.handle.provider_options.get("enable_cuda_graph") == "1":
            feeds_list = feeds_list[:1]  # each bound CUDA graph is a session of its own: one real batch
        data_count = len(feeds_list)
        all_feeds = feeds_list
        shapes.update({k: tuple(v.shape) for k, v in feeds_list[0].items()})
        if progress is not None:
            progress(f"binding {m.label}", 0.0)
        rss_before = process.memory_info().rss
        device_before = target.memory_in_use(device_id)
        runs = [target.bind(m.handle, feeds) for feeds in feeds_list]
        bound = runs[0] if len(runs) == 1 else CyclingRun(runs)
        for run in runs[1:]:
            run()  # every batch's buffers allocated before timing (the cycle starts again at the first)
        start = time.perf_counter()
        bound()  # the first run allocates the session's buffers: it belongs to the model's memory
        first_run_s.append(time.perf_counter() - start)
        device_after = target.memory_in_use(device_id)
        rss_added.append(max(0, process.memory_info().rss - rss_before))
        device_added.append(device_after - device_before if None not in (device_before, device_after) else None)
        runners.append(bound)
    return BoundModels(runners=tuple(runners), input_shapes=shapes, first_run_s=tuple(first_run_s),
                       rss_added_bytes=tuple(rss_added), device_added_bytes=tuple(device_added),
                       data_batches=data_count if data is not None else 0, padding=padding_share(all_feeds))


def _measure_batch(target, models: Sequence[LoadedModel], config: BenchConfig, batch: int | None,
                   data: Mapping[str, np.ndarray] | None, data_source: str, clock: str, share: float | None,
                   report: ProgressFn) -> BatchRun:
    bind_started = time.perf_counter()
    bound = bind_models(target, models, batch=batch, seq_len=config.seq_len, seed=config.seed, data=data,
                        data_source=data_source, device_id=config.device_id, progress=report,
                        input_shapes=parse_input_shapes(config.input_shapes))
    shapes = bound.input_shapes
    runners = bound.runners
    effective_batch = batch if batch is not None else int(next(iter(shapes.values()))[0]) if shapes else 1
    warm_sampler = InterleavedSampler(runners)
    start = time.perf_counter()
    if share is not None:  # `share` started before binding: the batch ends at `share` from then
        share = max(0.0, share - (start - bind_started))
        warm_cap = share * config.warmup_max_fraction
    else:
        warm_cap = 30.0  # a fixed round count has no budget; still, never warm up forever
    label = f"batch {effective_batch}"
    warm = warm_sampler.warm_up(max_seconds=warm_cap, clock=clock, window=config.warmup_window,
                                tolerance=config.warmup_tolerance,
                                on_round=lambda f: report(f"{label}: warming up", 0.1 * f))
    repeat = runs_per_sample(warm_sampler, clock, config.min_sample_s)
    sampler = InterleavedSampler([Repeated(run, repeat) if repeat > 1 else run for run in runners],
                                 max_samples=config.max_samples if config.rounds is None else None)
    if config.rounds is not None:
        sampler.run_rounds(config.rounds, on_round=lambda f: report(f"{label}: measuring", 0.1 + 0.9 * f))
    else:
        # kept for after the rounds: the bootstrap of every ratio (its cost grows with the samples that
        # will be stored), and the kernel profile if asked for
        run_s = [float(np.median(warm_sampler.warmup_samples(i, "wall")[-5:])) for i in range(len(models))]
        remaining = max(0.0, share - (time.perf_counter() - start))
        expected = min(config.max_samples, remaining / max(sum(run_s) * repeat, 1e-6))
        statistics_s = 2 * (len(models) - 1) * config.n_boot * expected * BOOTSTRAP_S_PER_ELEMENT
        profile_s = (sum(m.handle.load_s + config.profile_runs * t for m, t in zip(models, run_s))
                     if config.profile else 0.0)
        remaining = max(0.0, remaining - statistics_s - profile_s)
        sampler.run_for(remaining, min_rounds=MIN_TIMED_ROUNDS,
                        on_round=lambda f: report(f"{label}: measuring", 0.1 + 0.9 * f))
    seconds = time.perf_counter() - start
    profiles: list[tuple[Any, ...] | None] = [None] * len(models)
    if config.profile:
        from dlopt.profile import profile_session

        for i, m in enumerate(models):
            report(f"{label}: profiling {m.label}", 1.0)
            feeds = model_feeds(m, batch=batch, seq_len=config.seq_len, seed=config.seed, data=data,
                                data_source=data_source)
            profiles[i] = tuple(profile_session(target, m.path, feeds, runs=config.profile_runs,
                                                threads=config.threads, graph_opt_level=config.graph_opt_level,
                                                device_id=config.device_id, allow_fallback=config.allow_fallback))
    results = []
    for i in range(len(models)):
        samples = {c: sampler.samples(i, c) / repeat for c in CLOCKS}  # seconds per run
        ratios = {c: (sampler.ratio(i, c, method=config.ratio_method, confidence=config.confidence,
                                    n_boot=config.n_boot, seed=config.seed)
                      if i > 0 else None) for c in CLOCKS}
        results.append(ModelRun(samples=samples, summaries={c: summarize(samples[c]) for c in CLOCKS},
                                ratios=ratios, first_run_s=bound.first_run_s[i],
                                rss_added_bytes=bound.rss_added_bytes[i],
                                device_added_bytes=bound.device_added_bytes[i], profile=profiles[i]))
    report(f"{label}: done", 1.0)
    return BatchRun(batch=effective_batch, input_shapes=shapes, rounds=sampler.timed_rounds, seconds=seconds,
                    warmup=warm, models=tuple(results), runs_per_sample=repeat * sampler.merged,
                    samples=sampler.rounds, data_batches=bound.data_batches, padding=bound.padding)


# --------------------------------------------------------------------------- tables


def format_result(result: BenchResult) -> str:
    """The latency table (one row per model and batch size) and the models table, as text."""
    from dlopt.report import format_table

    clock = result.clock
    other = "wall" if clock == "cpu" else "cpu"
    confidence = int(round(result.config.confidence * 100))
    headers = ["model", "batch", f"median ms ({clock})", "p90", "p99", "mean", "std", "min",
               f"median ms ({other})", "items/s", "ratio", f"{confidence}% CI"]
    rows = []
    for b in result.batches:
        for m, r in zip(result.models, b.models):
            s = r.summaries[clock]
            ratio = r.ratios[clock]
            rows.append([m.label, b.batch, s.median * 1e3, s.p90 * 1e3, s.p99 * 1e3, s.mean * 1e3, s.std * 1e3,
                         s.min * 1e3, r.summaries[other].median * 1e3,
                         f"{b.batch / s.median:.1f}" if s.median > 0 else "nan",
                         "1 (base)" if ratio is None else f"{ratio.estimate:.3f}",
                         "" if ratio is None else f"[{ratio.low:.3f}, {ratio.high:.3f}]"])
    # Memory a model added: its session, plus the buffers of its first run at the first batch size.
    first = result.batches[0].models
    show_device = any(m.device_added_bytes is not None for m in result.models)
    model_headers = ["model", "size MB", "load ms", "first run ms", "RSS +MB"] + (
        ["device +MB"] if show_device else []) + ["runs on", "providers"]
    model_rows = []
    for m, r in zip(result.models, first):
        row = [m.label, m.size_bytes / 1e6, m.handle.load_s * 1e3, r.first_run_s * 1e3,
               (m.rss_added_bytes + r.rss_added_bytes) / 1e6]
        if show_device:
            both = (m.device_added_bytes, r.device_added_bytes)
            row.append(sum(both) / 1e6 if None not in both else "n/a")
        row += [m.handle.runs_on, ",".join(p.replace("ExecutionProvider", "") for p in m.handle.active_providers)]
        model_rows.append(row)
    t = result.target
    lines = [
        f"target {t['name']} on {t['device']}, {result.config.threads} thread(s), graph optimization "
        f"{result.config.graph_opt_level}" + (", CUDA graph" if result.config.cuda_graph else ""),
        f"clock: {clock} ({result.clock_reason})",
        f"CPU: {result.machine.get('cpu_model')}, {result.machine.get('cpu_isa')}",
    ]
    session = t.get("session")
    if session:
        entries = ", ".join(f"{k}={v}" for k, v in session["session_config"].items())
        lines.append(f"session config: {entries}; denormals {session['denormals']}")
    if t["fell_back"]:
        lines.append(f"WARNING: {t['name']} is not available here; these are CPU numbers (--allow-fallback)")
    for b in result.batches:
        for m, r in zip(result.models[1:], b.models[1:]):
            ratio = r.ratios[clock]
            speed = (f"{1 / ratio.estimate:.2f}x faster" if ratio.estimate < 1 else f"{ratio.estimate:.2f}x slower")
            verdict = "" if ratio.low > 1 or ratio.high < 1 else " (the CI includes 1: no difference shown)"
            lines.append(f"batch {b.batch}: {m.label} takes {ratio.estimate:.3f}x the time of {result.models[0].label} "
                         f"(95% CI {ratio.low:.3f}-{ratio.high:.3f}, {speed}){verdict}")
    for b in result.batches:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in b.input_shapes.items())
        grouped = (f" (each sample the mean of {b.runs_per_sample} runs, {b.samples} samples)"
                   if b.runs_per_sample > 1 else "")
        source = (f"{b.data_batches} real batch(es) from {result.data_source}, one per call in turn"
                  if b.data_batches else "generated")
        lines.append(f"batch {b.batch}: {b.rounds} interleaved rounds in {b.seconds:.1f} s{grouped}; warm-up "
                     f"{b.warmup.rounds} rounds, {'settled' if b.warmup.settled else 'NOT settled (capped)'}; "
                     f"inputs {shapes} ({source}{padding_note(b.padding)})")
        if result.config.rounds is None and b.rounds < result.config.min_rounds:
            lines.append(f"batch {b.batch}: only {b.rounds} rounds fit in the budget: the CI is wide; "
                         "give a longer --budget")
    return "\n".join([format_table(headers, rows), "", format_table(model_headers, model_rows), "", *lines,
                      f"peak RSS of this process: {result.peak_rss_bytes / 1e6:.0f} MB", *_profile_tables(result)])


def _profile_tables(result: BenchResult, top: int = 8) -> list[str]:
    """With --profile: per batch size and model, the op types that took the most kernel time."""
    from dlopt.report import format_table

    out = []
    for b in result.batches:
        for m, r in zip(result.models, b.models):
            if not r.profile:
                continue
            rows = [[t.op_type, t.nodes, t.ms_per_run, f"{100 * t.share:.1f}"] for t in r.profile[:top]]
            rest = r.profile[top:]
            if rest:
                rows.append([f"({len(rest)} other op types)", sum(t.nodes for t in rest),
                             sum(t.ms_per_run for t in rest), f"{100 * sum(t.share for t in rest):.1f}"])
            title = (f"where the time goes: {m.label}, batch {b.batch} (ONNX Runtime's kernel profile, "
                     f"{result.config.profile_runs - 2} runs; wall time per run)")
            out += ["", title,
                    format_table(["op type", "nodes", "ms / run", "% of kernel time"], rows)]
    return out


__all__ = ["BenchConfig", "BenchResult", "BoundModels", "bind_models", "model_feeds", "InterleavedSampler",
           "SCHEMA_VERSION", "WarmupReport", "benchmark", "choose_clock", "format_result", "load_data",
           "load_models", "machine_fingerprint", "parse_batch_sizes", "parse_duration", "validate_config"]
