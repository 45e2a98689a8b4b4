"""What `dlopt gate` is asked to check: GateConfig, its limits and their checks, verdicts and exit codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dlopt.errors import InputError
from dlopt.inputs import parse_input_shapes
from dlopt.stats import RATIO_METHODS

VERDICTS = ("pass", "fail", "inconclusive")
POLICIES = ("exit-3", "fail", "pass")  # what an inconclusive check does to the exit code
EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3

BASELINE_SCHEMA = "dlopt.baseline"
BASELINE_VERSION = 1
GATE_SCHEMA = "dlopt.gate"
GATE_VERSION = 1
DEFAULT_BUDGET_S = 60.0
DEFAULT_SEQ_LEN = 128

ProgressFn = Callable[[str, float], None]  # (what is happening, fraction of the budget spent)


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """What counts as a regression, and how long to look for one.

    Fractions, not percents: max_slowdown=0.05 allows the candidate to be up to 5 % slower."""

    max_slowdown: float = 0.05
    max_accuracy_drop: float | None = None  # absolute drop allowed in every evaluator metric
    metric_drops: tuple[tuple[str, float], ...] = ()  # (metric, drop) limits that override it for one metric
    max_size_growth: float | None = None  # fraction of the baseline's bytes on disk
    budget_s: float = DEFAULT_BUDGET_S  # warm-up + sampling, wall time; loading the models is extra
    confidence: float = 0.95  # over the whole sequential run (Bonferroni over the looks)
    looks: int = 8
    first_look_fraction: float = 1 / 32  # of the sampling budget
    min_rounds: int = 20  # no decision from fewer rounds, except at the last look (a bootstrap of a
    # median from a handful of rounds covers less than its nominal level)
    ratio_method: str = "round-median"  # interleaved mode, see dlopt.stats.ratio_ci; stored mode: median-ratio
    on_inconclusive: str = "exit-3"
    target: str = "cpu"
    threads: int | None = None  # None: 1, or the stored baseline's
    clock: str = "auto"  # "cpu", "wall", or the target's choice ("auto"; a stored baseline's clock)
    batch: int | None = None  # None: 1, or the stored baseline's first batch size
    seq_len: int | None = None  # None: 128, or the stored baseline's
    prompt_len: int | None = None  # LM folders: prompt tokens (None: 128, at most half the context)
    new_tokens: int | None = None  # LM folders: tokens generated per sample (None: 32)
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: shapes of generated inputs (--input-shape)
    seed: int = 0
    graph_opt_level: str = "all"
    warmup_max_fraction: float = 0.2  # of the budget
    n_boot: int = 4000  # the per-look CI sits far in the tails (0.3 % each side): more replicates
    allow_cross_machine: bool = False
    allow_fallback: bool = False
    device_id: int = 0


def validate_config(config: GateConfig) -> None:
    from dlopt.limits import MAX_BATCH, MAX_MEASURE_S, check_number

    numbers = [
        (config.max_slowdown, "the allowed slowdown"),
        (config.max_accuracy_drop, "{max_accuracy_drop=DROP}"),
        (config.max_size_growth, "the allowed size growth"),
        (config.budget_s, "the time budget (s)"),
        (config.confidence, "confidence"),
        *((d, f"the accuracy drop of {m}") for m, d in config.metric_drops),
    ]
    for value, what in numbers:
        if value is not None:
            check_number(value, what)
    MAX_MEASURE_S.check(config.budget_s, "the time budget")
    if config.batch is not None:
        MAX_BATCH.check(config.batch, "batch size")
    if not 0 <= config.max_slowdown < 10:
        raise InputError(
            f"the allowed slowdown must be between 0% and 1000%, got {config.max_slowdown:.1%}",
            "e.g. {max_slowdown=0.05} (5%)",
        )
    drops = ([config.max_accuracy_drop] if config.max_accuracy_drop is not None else []) + [
        d for _, d in config.metric_drops
    ]
    if any(not d >= 0 for d in drops):
        raise InputError(
            f"an accuracy drop limit must not be negative, got {min(drops)}", "e.g. {max_accuracy_drop=0.01}"
        )
    if config.max_size_growth is not None and config.max_size_growth < -1:
        raise InputError(
            f"the allowed size growth must be above -100%, got {config.max_size_growth:.1%}",
            "e.g. {max_size_growth=0.1} (10%)",
        )
    if not config.budget_s > 0:
        raise InputError(f"the time budget must be positive, got {config.budget_s} s", "e.g. 60 s")
    if not 0.5 <= config.confidence < 1:
        raise InputError(f"confidence must be in [0.5, 1), got {config.confidence}", "e.g. {confidence=0.95}")
    if config.looks < 1:
        raise InputError(f"looks must be at least 1, got {config.looks}", "e.g. {looks=8}")
    if config.on_inconclusive not in POLICIES:
        raise InputError(
            f"unknown inconclusive policy {config.on_inconclusive!r}", f"choose one of {', '.join(POLICIES)}"
        )
    if config.ratio_method not in RATIO_METHODS:
        raise InputError(f"unknown ratio method {config.ratio_method!r}", f"choose one of {', '.join(RATIO_METHODS)}")
    if config.clock not in ("auto", "cpu", "wall"):
        raise InputError(f"unknown clock {config.clock!r}", "choose cpu, wall or auto")
    for name in ("threads", "batch", "seq_len"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}", "e.g. 1")
    parse_input_shapes(config.input_shapes)
