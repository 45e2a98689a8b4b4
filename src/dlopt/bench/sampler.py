"""The interleaved sampler: warm-up until latencies settle, rotated timed rounds, grouped runs
of fast models, the ratio CIs (see dlopt.bench for the method).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dlopt.bench.config import CLOCKS, ClockFn, read_clocks
from dlopt.stats import DEFAULT_BOOTSTRAP, Interval, Summary, has_settled, ratio_ci, summarize


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

    def __init__(
        self, runners: Sequence[Callable[[], object]], *, clock: ClockFn = read_clocks, max_samples: int | None = None
    ):
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

    def warm_up(
        self,
        *,
        max_seconds: float,
        clock: str = "wall",
        window: int = 5,
        tolerance: float = 0.05,
        on_round: Callable[[float], None] | None = None,
    ) -> WarmupReport:
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
                settled = all(
                    has_settled(s[-2 * window :], window=window, tolerance=tolerance) for s in self._warm[clock]
                )
                if len(self._warm["wall"][0]) > 2 * self.WARM_KEPT:
                    for per_model in self._warm.values():
                        for values in per_model:
                            del values[: -self.WARM_KEPT]
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

    def run_for(
        self,
        seconds: float,
        *,
        min_rounds: int = 0,
        max_rounds: int | None = None,
        on_round: Callable[[float], None] | None = None,
    ) -> int:
        """Add timed rounds for at most `seconds` of wall time (but at least `min_rounds`); returns
        rounds added. A round is not started when, as long as the slowest so far, it would end late."""
        start = time.perf_counter()
        added = 0
        longest = 0.0
        with _gc_paused():
            while True:
                elapsed = time.perf_counter() - start
                if added >= min_rounds and (
                    elapsed + longest > seconds or (max_rounds is not None and added >= max_rounds)
                ):
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

    def ratio(
        self,
        index: int,
        clock: str = "wall",
        *,
        baseline: int = 0,
        method: str = "round-median",
        confidence: float = 0.95,
        n_boot: int = DEFAULT_BOOTSTRAP,
        seed: int = 0,
    ) -> Interval:
        """Latency of model `index` relative to model `baseline` over the rounds so far, with a
        bootstrap CI over rounds (dlopt.stats.ratio_ci; default: median of per-round ratios)."""
        return ratio_ci(
            self.samples(baseline, clock),
            self.samples(index, clock),
            method=method,
            paired=True,
            confidence=confidence,
            n_boot=n_boot,
            seed=seed,
        )


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


def median_cpu_ms(run: Callable[[], object], rounds: int) -> float:
    """Median thread CPU time of one call of `run`, in ms, over `rounds` timed calls after one untimed call:
    a quick ranking figure (a one-thread ORT session runs on the calling thread), not a benchmark with a CI."""
    run()
    sampler = InterleavedSampler([run])
    sampler.run_rounds(rounds)
    return float(np.median(sampler.samples(0, "cpu"))) * 1e3


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
