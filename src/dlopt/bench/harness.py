"""The run: load the models on the target, bind their inputs, warm up and time them interleaved
under one deadline, and record the machine the numbers belong to.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench.config import CLOCKS, DEFAULT_SEQ_LEN, MIN_TIMED_ROUNDS, BenchConfig, ProgressFn, validate_config
from dlopt.bench.data import length_sorting, model_feed_batches, model_feeds, padding_share, sorted_by_length
from dlopt.bench.results import BatchRun, BenchResult, LoadedModel, ModelRun
from dlopt.bench.sampler import InterleavedSampler, Repeated, runs_per_sample
from dlopt.errors import InputError
from dlopt.inputs import parse_input_shapes
from dlopt.stats import summarize


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


def file_labels(paths: Sequence[Path]) -> list[str]:
    """A label per model file: its name, its path where names collide, numbered where a file repeats."""
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


def load_models(
    paths: Sequence[str | os.PathLike], config: BenchConfig, progress: ProgressFn | None = None
) -> tuple[Any, list[LoadedModel]]:
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
    for path, label, (size, digest) in zip(resolved, file_labels(resolved), facts):
        if progress is not None:
            progress(f"loading {label}", 0.0)
        rss_before = process.memory_info().rss
        device_before = target.memory_in_use(config.device_id)
        handle = target.create_session(
            path,
            threads=config.threads,
            graph_opt_level=config.graph_opt_level,
            provider_options=provider_options,
            allow_fallback=config.allow_fallback,
            device_id=config.device_id,
        )
        device_after = target.memory_in_use(config.device_id)
        loaded.append(
            LoadedModel(
                label=label,
                path=path,
                size_bytes=size,
                sha256=digest,
                handle=handle,
                rss_added_bytes=max(0, process.memory_info().rss - rss_before),
                device_added_bytes=(
                    device_after - device_before if device_before is not None and device_after is not None else None
                ),
            )
        )
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
            self._progress(
                f"{what}, {max(0.0, self.at - now):.0f} s left", min(1.0, (now - self.started) / self.budget_s)
            )


def benchmark(
    paths: Sequence[str | os.PathLike],
    config: BenchConfig = BenchConfig(),
    *,
    data: Mapping[str, np.ndarray] | None = None,
    data_source: str = "the data",
    progress: ProgressFn | None = None,
    started: float | None = None,
) -> BenchResult:
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
        "device": target.device_name(config.device_id)
        if not any(m.handle.fell_back for m in models)
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
    return BenchResult(
        config=config,
        clock=clock,
        clock_reason=clock_reason,
        target=target_facts,
        models=tuple(models),
        batches=tuple(batch_runs),
        peak_rss_bytes=int(peak),
        machine=machine_fingerprint(config.threads, target, config.device_id),
        data_source=data_source if data is not None else None,
    )


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


def bind_models(
    target,
    models: Sequence[LoadedModel],
    *,
    batch: int | None = 1,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
    data_source: str = "the data",
    device_id: int = 0,
    progress: ProgressFn | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> BoundModels:
    """Generate (or take from `data`) each model's inputs, bind them on the target's device and run
    each model once (its cold first run, timed). The gate's entry point into the harness:
    `InterleavedSampler(bind_models(target, load_models(paths, config)[1]).runners)`."""
    import psutil

    process = psutil.Process()
    runners, first_run_s, rss_added, device_added = [], [], [], []
    shapes: dict[str, tuple[int, ...]] = {}
    data_count, all_feeds = 1, []
    for m in models:
        feeds_list = model_feed_batches(
            m, batch=batch, seq_len=seq_len, seed=seed, data=data, data_source=data_source, input_shapes=input_shapes
        )
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
    return BoundModels(
        runners=tuple(runners),
        input_shapes=shapes,
        first_run_s=tuple(first_run_s),
        rss_added_bytes=tuple(rss_added),
        device_added_bytes=tuple(device_added),
        data_batches=data_count if data is not None else 0,
        padding=padding_share(all_feeds),
    )


def _measure_batch(
    target,
    models: Sequence[LoadedModel],
    config: BenchConfig,
    batch: int | None,
    data: Mapping[str, np.ndarray] | None,
    data_source: str,
    clock: str,
    share: float | None,
    report: ProgressFn,
) -> BatchRun:
    bind_started = time.perf_counter()
    bound = bind_models(
        target,
        models,
        batch=batch,
        seq_len=config.seq_len,
        seed=config.seed,
        data=data,
        data_source=data_source,
        device_id=config.device_id,
        progress=report,
        input_shapes=parse_input_shapes(config.input_shapes),
    )
    shapes = bound.input_shapes
    runners = bound.runners
    # Where the batches mix real lengths, each model also runs on the same samples sorted by length, in the
    # same rounds: a trimmed model's ratio sorted / as given is what sorting requests by length gains
    # (an untrimmed one computes every padded position either way: its ratio is the control, about 1).
    sorting = length_sorting(data, batch)
    if sorting is not None and data is not None and batch is not None:  # length_sorting needs both
        ordered = bind_models(
            target,
            models,
            batch=batch,
            seq_len=config.seq_len,
            seed=config.seed,
            data=sorted_by_length(data, batch),
            data_source=f"{data_source} sorted by length",
            device_id=config.device_id,
            progress=report,
        )
        runners = runners + ordered.runners
    effective_batch = batch if batch is not None else int(next(iter(shapes.values()))[0]) if shapes else 1
    warm_sampler = InterleavedSampler(runners)
    start = time.perf_counter()
    if share is not None:  # `share` started before binding: the batch ends at `share` from then
        share = max(0.0, share - (start - bind_started))
        warm_cap = share * config.warmup_max_fraction
    else:
        warm_cap = 30.0  # a fixed round count has no budget; still, never warm up forever
    label = f"batch {effective_batch}"
    warm = warm_sampler.warm_up(
        max_seconds=warm_cap,
        clock=clock,
        window=config.warmup_window,
        tolerance=config.warmup_tolerance,
        on_round=lambda f: report(f"{label}: warming up", 0.1 * f),
    )
    repeat = runs_per_sample(warm_sampler, clock, config.min_sample_s)
    sampler = InterleavedSampler(
        [Repeated(run, repeat) if repeat > 1 else run for run in runners],
        max_samples=config.max_samples if config.rounds is None else None,
    )
    if config.rounds is not None:
        sampler.run_rounds(config.rounds, on_round=lambda f: report(f"{label}: measuring", 0.1 + 0.9 * f))
    else:
        # kept for after the rounds: the bootstrap of every ratio (its cost grows with the samples that
        # will be stored), and the kernel profile if asked for
        run_s = [float(np.median(warm_sampler.warmup_samples(i, "wall")[-5:])) for i in range(len(models))]
        assert share is not None, "a time share is given whenever the rounds are not fixed"
        remaining = max(0.0, share - (time.perf_counter() - start))
        expected = min(config.max_samples, remaining / max(sum(run_s) * repeat, 1e-6))
        # each model's to the first; each sorted run's to its model's and to the first's
        ratio_count = len(models) - 1 + 2 * (len(runners) - len(models))
        statistics_s = 2 * ratio_count * config.n_boot * expected * BOOTSTRAP_S_PER_ELEMENT
        profile_s = (
            sum(m.handle.load_s + config.profile_runs * t for m, t in zip(models, run_s)) if config.profile else 0.0
        )
        remaining = max(0.0, remaining - statistics_s - profile_s)
        sampler.run_for(
            remaining, min_rounds=MIN_TIMED_ROUNDS, on_round=lambda f: report(f"{label}: measuring", 0.1 + 0.9 * f)
        )
    seconds = time.perf_counter() - start
    profiles: list[tuple[Any, ...] | None] = [None] * len(models)
    if config.profile:
        from dlopt.profile import profile_session

        for i, m in enumerate(models):
            report(f"{label}: profiling {m.label}", 1.0)
            feeds = model_feeds(
                m, batch=batch, seq_len=config.seq_len, seed=config.seed, data=data, data_source=data_source
            )
            profiles[i] = tuple(
                profile_session(
                    target,
                    m.path,
                    feeds,
                    runs=config.profile_runs,
                    threads=config.threads,
                    graph_opt_level=config.graph_opt_level,
                    device_id=config.device_id,
                    allow_fallback=config.allow_fallback,
                )
            )
    results = []
    for i in range(len(models)):
        samples = {c: sampler.samples(i, c) / repeat for c in CLOCKS}  # seconds per run
        ratios = {
            c: (
                sampler.ratio(
                    i,
                    c,
                    method=config.ratio_method,
                    confidence=config.confidence,
                    n_boot=config.n_boot,
                    seed=config.seed,
                )
                if i > 0
                else None
            )
            for c in CLOCKS
        }
        results.append(
            ModelRun(
                samples=samples,
                summaries={c: summarize(samples[c]) for c in CLOCKS},
                ratios=ratios,
                first_run_s=bound.first_run_s[i],
                rss_added_bytes=bound.rss_added_bytes[i],
                device_added_bytes=bound.device_added_bytes[i],
                profile=profiles[i],
            )
        )
    if sorting is not None:
        sorting = {
            **sorting,
            "input_shapes": {k: list(v) for k, v in shapes.items()},
            "latency": [
                _sorted_latency(sampler, m.label, i, len(models) + i, clock, repeat, config)
                for i, m in enumerate(models)
            ],
        }
    report(f"{label}: done", 1.0)
    return BatchRun(
        batch=effective_batch,
        input_shapes=shapes,
        rounds=sampler.timed_rounds,
        seconds=seconds,
        warmup=warm,
        models=tuple(results),
        runs_per_sample=repeat * sampler.merged,
        samples=sampler.rounds,
        data_batches=bound.data_batches,
        padding=bound.padding,
        length_sorting=sorting,
    )


def _sorted_latency(
    sampler: InterleavedSampler, label: str, given: int, ordered: int, clock: str, repeat: int, config: BenchConfig
) -> dict[str, Any]:
    """One model on the samples sorted by length vs as given (the same rounds): medians and their ratio."""

    def ratio(index: int, baseline: int) -> dict[str, Any]:
        return sampler.ratio(
            index,
            clock,
            baseline=baseline,
            method=config.ratio_method,
            confidence=config.confidence,
            n_boot=config.n_boot,
            seed=config.seed,
        ).as_dict()

    return {
        "model": label,
        "clock": clock,
        "median_ms_as_given": float(np.median(sampler.samples(given, clock))) / repeat * 1e3,
        "median_ms_sorted": float(np.median(sampler.samples(ordered, clock))) / repeat * 1e3,
        "ratio_sorted_to_given": ratio(ordered, given),
        # sorted vs the first model on the batches as given (the reference of every ratio of the run)
        "ratio_sorted_to_first": ratio(ordered, 0),
    }


def measure_speedup(
    baseline_onnx: Path, onnx_path: Path, *, budget_s: float, batch: int = 1, seq_len: int = 128
) -> dict[str, Any]:
    """Latency of `onnx_path` against `baseline_onnx`, one thread, interleaved: the speedup line of prune and
    distill."""
    from dlopt.bench.config import BenchConfig

    result = benchmark(
        [baseline_onnx, onnx_path], BenchConfig(threads=1, batch_sizes=(batch,), seq_len=seq_len, budget_s=budget_s)
    )
    run = result.batches[0]
    ratio = run.models[1].ratios[result.clock]
    assert ratio is not None, "None only for the first model"
    return {
        "clock": result.clock,
        "batch": run.batch,
        "rounds": run.rounds,
        "baseline_ms": run.models[0].summaries[result.clock].median * 1e3,
        "ms": run.models[1].summaries[result.clock].median * 1e3,
        "speedup": 1.0 / ratio.estimate,
        "speedup_low": 1.0 / ratio.high,
        "speedup_high": 1.0 / ratio.low,
    }
