"""What `dlopt bench` is asked to do: BenchConfig, its checks, and the parsers of its CLI values."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from dlopt.errors import InputError
from dlopt.inputs import parse_input_shapes
from dlopt.stats import DEFAULT_BOOTSTRAP, RATIO_METHODS

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


def check_sampling(rounds: int | None, clock: str, ratio_method: str) -> None:
    """The interleaved sampler's options, as bench and bench --generate take them."""
    if rounds is not None and rounds < 2:
        raise InputError(f"rounds must be at least 2, got {rounds}", "e.g. {rounds=200}")
    if clock not in (*CLOCKS, "auto"):
        raise InputError(f"unknown clock {clock!r}", "choose cpu, wall or auto")
    if ratio_method not in RATIO_METHODS:
        raise InputError(f"unknown ratio method {ratio_method!r}", f"choose {', '.join(RATIO_METHODS)}")


def validate_config(config: BenchConfig) -> None:
    from dlopt.limits import MAX_BATCH, MAX_MEASURE_S, check_number

    # types and finiteness first (the ranges below compare them); then the limits on the work they ask for
    for count, what in (
        (config.threads, "threads"),
        (config.seq_len, "the sequence length"),
        *((size, "a batch size") for size in config.batch_sizes),
    ):
        check_number(count, what, integer=True)
    for value, what in (
        (config.budget_s, "the time budget (s)"),
        (config.min_sample_s, "min_sample_s"),
        (config.confidence, "confidence"),
        (config.warmup_tolerance, "warmup_tolerance"),
        (config.warmup_max_fraction, "warmup_max_fraction"),
    ):
        check_number(value, what)
    for size in config.batch_sizes:
        MAX_BATCH.check(size, "batch size")
    if config.rounds is None:
        MAX_MEASURE_S.check(config.budget_s, "the time budget")
    if config.threads < 1:
        raise InputError(f"threads must be at least 1, got {config.threads}", "pass {threads=1} or more")
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(config.batch_sizes)}", "e.g. 1, 8, 32")
    if config.seq_len < 1:
        raise InputError(f"the sequence length must be at least 1, got {config.seq_len}", "e.g. {seq_len=128}")
    if config.rounds is None and config.budget_s <= 0:
        raise InputError(f"the time budget must be positive, got {config.budget_s} s", "e.g. 30 s")
    if config.max_samples < 2 or config.min_sample_s < 0:
        raise InputError("max_samples must be at least 2 and min_sample_s non-negative", "use the defaults")
    check_sampling(config.rounds, config.clock, config.ratio_method)
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
    value = float(match.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, None: 1.0}[match.group(2)]
    if not math.isfinite(value):  # 400 digits read as infinity: a run that would never end
        raise InputError(f"duration {text.strip()[:20]}… is not a finite number", "write e.g. 30s, 2m or 500ms")
    return value


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    try:  # every part: "1,,2" is a typo, not two sizes
        sizes = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"cannot read batch sizes from {text!r}", "write positive integers, e.g. 1,8,32")
    from dlopt.limits import MAX_BATCH

    for size in sizes:
        MAX_BATCH.check(size, "batch size")
    return sizes
