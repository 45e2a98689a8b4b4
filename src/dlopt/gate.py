"""`dlopt gate`: fail CI on a real latency, accuracy or size regression, and not on noise.

The latency decision is a sequential test on the confidence interval of the latency ratio
candidate / baseline (medians, dlopt.stats.ratio_ci):

- with a baseline *model*, both models run interleaved on this machine (dlopt.bench's
  InterleavedSampler) and the CI is a paired bootstrap over rounds: machine phases hit both models
  alike and cancel in the ratio;
- with a stored baseline (`dlopt bench ... --save-baseline base.json`), only the candidate runs and
  the CI is an unpaired bootstrap against the stored samples. Those were measured at another time,
  so the machine's drift between the two measurements is not in the CI: the interleaved mode is the
  reliable one, and a stored baseline from another machine is refused unless allowed.

Verdicts at each look: *pass* when the CI's upper bound is within 1 + max_slowdown, *fail* when its
lower bound is above it, otherwise keep sampling. Looks happen on a fixed geometric schedule over the
time budget (`looks` of them, the first after budget/32), and when the budget is spent undecided the
verdict is *inconclusive*; a policy says whether that exits 3, fails or passes.

Why the looks are Bonferroni-corrected: checking a 95 % CI again and again while sampling and
stopping at the first decisive one makes a wrong decision much likelier than 5 % (each look is
another chance for noise to cross the line). Each look therefore uses a CI at level
1 - (1 - confidence) / looks, which bounds the chance of a wrong "fail" (true ratio at the threshold
or below) and of a wrong "pass" (true ratio above it) over the whole run by (1 - confidence) / 2
each. The price is a slightly wider CI per look; since regressions worth catching are not at the
threshold to three decimals, decisions still come in seconds.

Exit codes: 0 pass, 1 regression, 2 usage or input error (dlopt.errors.InputError), 3 inconclusive
(with the default policy).
"""

from __future__ import annotations

import json
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench import Repeated, runs_per_sample
from dlopt.errors import InputError
from dlopt.inputs import parse_input_shapes
from dlopt.stats import RATIO_METHODS, Interval, ratio_ci

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
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: shapes of generated inputs (--input-shape)
    seed: int = 0
    graph_opt_level: str = "all"
    warmup_max_fraction: float = 0.2  # of the budget
    n_boot: int = 4000  # the per-look CI sits far in the tails (0.3 % each side): more replicates
    allow_cross_machine: bool = False
    allow_fallback: bool = False
    device_id: int = 0


def validate_config(config: GateConfig) -> None:
    if not 0 <= config.max_slowdown < 10:
        raise InputError(f"the allowed slowdown must be between 0% and 1000%, got {config.max_slowdown:.1%}",
                         "e.g. {max_slowdown=0.05} (5%)")
    drops = ([config.max_accuracy_drop] if config.max_accuracy_drop is not None else []) + [
        d for _, d in config.metric_drops]
    if any(not d >= 0 for d in drops):
        raise InputError(f"an accuracy drop limit must not be negative, got {min(drops)}",
                         "e.g. {max_accuracy_drop=0.01}")
    if config.max_size_growth is not None and config.max_size_growth < -1:
        raise InputError(f"the allowed size growth must be above -100%, got {config.max_size_growth:.1%}",
                         "e.g. {max_size_growth=0.1} (10%)")
    if not config.budget_s > 0:
        raise InputError(f"the time budget must be positive, got {config.budget_s} s", "e.g. 60 s")
    if not 0.5 <= config.confidence < 1:
        raise InputError(f"confidence must be in [0.5, 1), got {config.confidence}", "e.g. {confidence=0.95}")
    if config.looks < 1:
        raise InputError(f"looks must be at least 1, got {config.looks}", "e.g. {looks=8}")
    if config.on_inconclusive not in POLICIES:
        raise InputError(f"unknown inconclusive policy {config.on_inconclusive!r}",
                         f"choose one of {', '.join(POLICIES)}")
    if config.ratio_method not in RATIO_METHODS:
        raise InputError(f"unknown ratio method {config.ratio_method!r}", f"choose one of {', '.join(RATIO_METHODS)}")
    if config.clock not in ("auto", "cpu", "wall"):
        raise InputError(f"unknown clock {config.clock!r}", "choose cpu, wall or auto")
    for name in ("threads", "batch", "seq_len"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}", "e.g. 1")
    parse_input_shapes(config.input_shapes)


# --------------------------------------------------------------------------- the sequential test


@dataclass(frozen=True, kw_only=True)
class Look:
    seconds: float  # since sampling started
    rounds: int
    interval: Interval
    verdict: str  # "pass", "fail" or "undecided"


@dataclass(frozen=True, kw_only=True)
class LatencyOutcome:
    verdict: str  # "pass", "fail" or "inconclusive"
    limit: float  # the ratio candidate / baseline allowed: 1 + max_slowdown
    interval: Interval | None  # at the deciding (or last) look, at the per-look confidence
    looks: tuple[Look, ...]
    rounds: int
    seconds: float  # sampling time (after warm-up)
    look_confidence: float
    reason: str


def look_schedule(budget_s: float, looks: int, first_fraction: float = 1 / 32) -> tuple[float, ...]:
    """Times (seconds from the start of sampling) of the planned looks: geometric from
    budget * first_fraction up to the budget, so clear cases stop early and close ones get the most
    data. The count is fixed in advance, which the Bonferroni correction needs."""
    if looks == 1:
        return (budget_s,)
    ratio = first_fraction ** (1 / (looks - 1))
    return tuple(budget_s * ratio ** (looks - 1 - k) for k in range(looks))


def look_confidence(confidence: float, looks: int) -> float:
    """The two-sided CI level of each look, so that all looks together keep `confidence`."""
    return 1 - (1 - confidence) / looks


def judge(interval: Interval, limit: float) -> str:
    """pass: even the CI's upper bound is within the limit; fail: even its lower bound is above it."""
    if interval.high <= limit:
        return "pass"
    if interval.low > limit:
        return "fail"
    return "undecided"


def sequential_test(add_round: Callable[[], None], rounds: Callable[[], int],
                    ratio_interval: Callable[[float], Interval], *, limit: float, budget_s: float,
                    looks: int = 8, confidence: float = 0.95, first_look_fraction: float = 1 / 32,
                    min_rounds: int = 20, now: Callable[[], float] = time.perf_counter,
                    progress: Callable[[float, Look | None], None] | None = None) -> LatencyOutcome:
    """Add rounds until a look decides or the budget is spent.

    `add_round()` measures one more round; `rounds()` counts them; `ratio_interval(level)` is the CI
    of the ratio at that two-sided level from everything measured so far. `now` is the clock that
    the budget is counted on (injected, so that tests can run on synthetic samples without timing).
    """
    schedule = look_schedule(budget_s, looks, first_look_fraction)
    level = look_confidence(confidence, looks)
    start = now()
    done = 0  # planned looks consumed (a look whose time passed while rounds were too few is merged)
    history: list[Look] = []
    while True:
        add_round()
        elapsed = now() - start
        due = sum(1 for t in schedule if t <= elapsed)
        final = due >= len(schedule)
        if progress is not None:
            progress(min(1.0, elapsed / budget_s), None)
        if due <= done or (rounds() < min_rounds and not final):
            continue
        done = due
        n = rounds()

        def outcome(verdict: str, interval: Interval | None, reason: str) -> LatencyOutcome:
            return LatencyOutcome(verdict=verdict, limit=limit, interval=interval, looks=tuple(history), rounds=n,
                                  seconds=elapsed, look_confidence=level, reason=reason)

        if n < 3:  # a bootstrap of 1-2 rounds means nothing
            return outcome("inconclusive", None,
                           f"only {n} round(s) fit in the {budget_s:.3g} s left for sampling: raise the time budget")
        interval = ratio_interval(level)
        verdict = judge(interval, limit)
        history.append(Look(seconds=elapsed, rounds=n, interval=interval, verdict=verdict))
        if progress is not None:
            progress(min(1.0, elapsed / budget_s), history[-1])
        ci = f"[{interval.low:.3f}, {interval.high:.3f}]"
        if verdict == "pass":
            return outcome("pass", interval, f"ratio CI {ci} lies within {limit:.3f} after {n} rounds")
        if verdict == "fail":
            return outcome("fail", interval, f"ratio CI {ci} lies above {limit:.3f} after {n} rounds")
        if final:
            return outcome("inconclusive", interval,
                           f"ratio CI {ci} still contains {limit:.3f} after {n} rounds and the {budget_s:.3g} s "
                           "left for sampling: the difference is within noise of the threshold (raise the time budget "
                           "to resolve it)")


# --------------------------------------------------------------------------- stored baselines


FINGERPRINT_KEYS = ("cpu_model", "cpu_flags_sha256", "logical_cores", "physical_cores", "machine", "onnxruntime",
                    "threads", "device")


@dataclass(frozen=True, kw_only=True)
class StoredBatch:
    batch: int
    input_shapes: Mapping[str, tuple[int, ...]]
    samples_s: Mapping[str, np.ndarray]  # clock -> latencies in seconds


@dataclass(frozen=True, kw_only=True)
class StoredBaseline:
    path: Path
    created: str
    model: str
    sha256: str
    size_bytes: int
    target: str
    threads: int
    clock: str
    graph_opt_level: str
    seq_len: int
    seed: int
    inputs_from_data: bool
    fingerprint: Mapping[str, Any]
    batches: tuple[StoredBatch, ...]

    def batch_run(self, batch: int | None) -> StoredBatch:
        if batch is None:
            return self.batches[0]
        for b in self.batches:
            if b.batch == batch:
                return b
        raise InputError(f"baseline {self.path} has no measurements at batch {batch}",
                         f"it has batch {', '.join(str(b.batch) for b in self.batches)}; pass one of those as "
                         "{batch=N}, or save a baseline measured at that batch size")


def baseline_document(result, *, index: int = 0, inputs_from_data: bool = False) -> dict[str, Any]:
    """The stored-baseline JSON for model `index` of a dlopt.bench.BenchResult
    (schema: dlopt/schemas/baseline.schema.json)."""
    model = result.models[index]
    config = result.config
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_VERSION,
        "created": result.created,
        "model": {"path": str(model.path), "sha256": model.sha256, "size_bytes": int(model.size_bytes)},
        "fingerprint": {k: result.machine.get(k) for k in FINGERPRINT_KEYS if k in result.machine},
        "measurement": {
            "target": result.target["name"],
            "runs_on": model.handle.runs_on,
            "threads": config.threads,
            "clock": result.clock,
            "graph_opt_level": config.graph_opt_level,
            "seq_len": config.seq_len,
            "seed": config.seed,
            "inputs": "data" if inputs_from_data else "generated",
        },
        "batches": [{
            "batch": b.batch,
            "input_shapes": {k: list(v) for k, v in b.input_shapes.items()},
            "rounds": b.rounds,
            "samples_ms": {c: np.round(b.models[index].samples[c] * 1e3, 6).tolist() for c in ("cpu", "wall")},
        } for b in result.batches],
    }


def save_baseline(path: str | os.PathLike, result, *, index: int = 0, inputs_from_data: bool = False) -> Path:
    """Write model `index` of a bench result as a stored baseline (atomically); `dlopt bench
    --save-baseline FILE` calls this."""
    from dlopt.fileio import write_json_atomic

    if result.target.get("fell_back"):
        raise InputError(f"not saving {path}: the measurement fell back to the CPU",
                         "save a baseline from a run on the target itself")
    document = baseline_document(result, index=index, inputs_from_data=inputs_from_data)
    return write_json_atomic(path, document)


def load_baseline(path: str | os.PathLike) -> StoredBaseline:
    """Read and check a stored baseline; every way it can be wrong is an InputError naming the file."""
    p = Path(path)
    hint = "write it with `dlopt bench MODEL.onnx --save-baseline FILE`"
    if not p.is_file():
        raise InputError(f"baseline file {p} does not exist" if not p.exists() else f"baseline {p} is not a file",
                         "check the path")
    try:
        document = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"baseline file {p} is not valid JSON ({e})", hint) from e
    except OSError as e:
        raise InputError(f"cannot read baseline file {p}: {e.strerror or e}", "check its permissions") from e

    def bad(what: str) -> InputError:
        return InputError(f"baseline file {p} is not a dlopt baseline: {what}", hint)

    if isinstance(document, dict) and document.get("schema") == "dlopt.bench":
        raise InputError(f"baseline file {p} is a `dlopt bench --json` result, not a stored baseline",
                         "save one with `dlopt bench MODEL.onnx --save-baseline FILE`")
    if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
        raise bad(f"its 'schema' is not {BASELINE_SCHEMA!r}")
    if document.get("schema_version") != BASELINE_VERSION:
        raise InputError(f"baseline file {p} has schema version {document.get('schema_version')!r}",
                         f"this dlopt reads version {BASELINE_VERSION}; save the baseline again")
    try:
        model, measurement, fingerprint = document["model"], document["measurement"], document["fingerprint"]
        batches = []
        for entry in document["batches"]:
            samples = {}
            for clock, values in entry["samples_ms"].items():
                array = np.asarray(values, dtype=np.float64) / 1e3
                if array.ndim != 1 or array.size < 3 or not np.all(np.isfinite(array)) or np.any(array <= 0):
                    raise bad(f"batch {entry['batch']}: its {clock} samples are not 3 or more positive numbers")
                samples[clock] = array
            batches.append(StoredBatch(batch=int(entry["batch"]),
                                       input_shapes={k: tuple(int(d) for d in v)
                                                     for k, v in entry["input_shapes"].items()},
                                       samples_s=samples))
        if not batches:
            raise bad("it holds no measurements")
        for b in batches:
            if b.batch < 1 or any(d < 1 for shape in b.input_shapes.values() for d in shape):
                raise bad(f"batch {b.batch}: the batch size and input shapes {b.input_shapes} must be positive")
        for field_name in ("threads", "seq_len"):
            if int(measurement[field_name]) < 1:
                raise bad(f"its measurement {field_name} {measurement[field_name]} is not positive")
        clock = str(measurement["clock"])
        if any(clock not in b.samples_s for b in batches):
            raise bad(f"it has no samples for its own clock {clock!r}")
        return StoredBaseline(
            path=p, created=str(document.get("created", "")), model=str(model["path"]), sha256=str(model["sha256"]),
            size_bytes=int(model["size_bytes"]), target=str(measurement["target"]),
            threads=int(measurement["threads"]), clock=clock,
            graph_opt_level=str(measurement.get("graph_opt_level", "all")), seq_len=int(measurement["seq_len"]),
            seed=int(measurement["seed"]), inputs_from_data=measurement.get("inputs") == "data",
            fingerprint=dict(fingerprint), batches=tuple(batches))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, InputError):
            raise
        raise bad(f"missing or malformed field ({type(e).__name__}: {e})") from e


STORED_SAMPLES_MAX = 1000


def thin(samples: np.ndarray, most: int) -> np.ndarray:
    """At most `most` samples, evenly spaced over the run (so every phase of it stays represented).

    Why: each look bootstraps the median of the stored samples too; from thousands of samples (a
    fast model's bench run) that costs seconds per look while adding nothing the candidate's far
    fewer samples could use: the median of 1000 samples is already known to about 4 % of the
    spread."""
    if samples.size <= most:
        return samples
    return samples[np.linspace(0, samples.size - 1, most).round().astype(int)]


def fingerprint_differences(stored: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """'key: stored -> here' for each fingerprint entry that differs (keys absent on either side are skipped)."""
    return [f"{k}: {stored[k]!r} -> {here[k]!r}" for k in FINGERPRINT_KEYS
            if k in stored and k in here and stored[k] != here[k]]


# --------------------------------------------------------------------------- checks and the whole gate


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str  # "latency", "size", "accuracy: <metric>"
    verdict: str  # "pass", "fail", "inconclusive"
    baseline: float | None
    candidate: float | None
    change: str  # e.g. "x1.021 [1.004, 1.039]" or "-0.004"
    limit: str  # e.g. "<= x1.050"
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class GateResult:
    config: GateConfig
    mode: str  # "interleaved" (baseline model) or "stored" (baseline file)
    baseline: str
    candidate: str
    checks: tuple[Check, ...]
    verdict: str  # overall: "pass", "fail" or "inconclusive"
    exit_code: int
    latency: LatencyOutcome | None
    clock: str | None
    threads: int
    batch: int | None
    warmup: Mapping[str, Any] | None
    machine: Mapping[str, Any]
    cross_machine: tuple[str, ...]  # fingerprint differences accepted with allow_cross_machine
    notes: tuple[str, ...]
    seconds: float  # the whole decision, loading included
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        from dlopt.report import environment
        from dlopt.stage import config_to_dict

        latency = None
        if self.latency is not None:
            o = self.latency
            latency = {
                "verdict": o.verdict, "limit": o.limit, "reason": o.reason, "rounds": o.rounds,
                "seconds": o.seconds, "look_confidence": o.look_confidence,
                "interval": o.interval.as_dict() if o.interval is not None else None,
                "looks": [{"seconds": k.seconds, "rounds": k.rounds, "verdict": k.verdict,
                           "low": k.interval.low, "estimate": k.interval.estimate, "high": k.interval.high}
                          for k in o.looks],
            }
        return {
            "schema": GATE_SCHEMA, "schema_version": GATE_VERSION, "created": self.created,
            "verdict": self.verdict, "exit_code": self.exit_code, "mode": self.mode,
            "baseline": self.baseline, "candidate": self.candidate,
            "config": config_to_dict(self.config),
            "checks": [{"name": c.name, "verdict": c.verdict, "baseline": c.baseline, "candidate": c.candidate,
                        "change": c.change, "limit": c.limit, "detail": c.detail, "seconds": c.seconds}
                       for c in self.checks],
            "latency": latency, "clock": self.clock, "threads": self.threads, "batch": self.batch,
            "warmup": dict(self.warmup) if self.warmup is not None else None,
            "machine": dict(self.machine), "cross_machine": list(self.cross_machine), "notes": list(self.notes),
            "seconds": self.seconds, "environment": environment(),
        }


def overall_verdict(checks: Sequence[Check], policy: str) -> tuple[str, int]:
    """Any failed check fails the gate (exit 1); else any inconclusive one is handled by the policy."""
    if policy not in POLICIES:
        raise InputError(f"unknown inconclusive policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    verdicts = {c.verdict for c in checks}
    if "fail" in verdicts:
        return "fail", EXIT_REGRESSION
    if "inconclusive" in verdicts:
        return "inconclusive", {"exit-3": EXIT_INCONCLUSIVE, "fail": EXIT_REGRESSION, "pass": EXIT_PASS}[policy]
    return "pass", EXIT_PASS


def is_baseline_file(path: str | os.PathLike) -> bool:
    """A stored baseline is JSON; anything else is taken as a model."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return True
    if p.suffix.lower() == ".onnx" or not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(1).strip() in (b"{",)


def run_gate(baseline: str | os.PathLike, candidate: str | os.PathLike, config: GateConfig = GateConfig(), *,
             data: Mapping[str, np.ndarray] | None = None, evaluator: EvalSpec | None = None,
             progress: ProgressFn | None = None) -> GateResult:
    """Gate CANDIDATE against BASELINE (a model, or a stored-baseline JSON) on latency, and on size and
    accuracy when their limits are set (accuracy with `evaluator`). `data`: arrays to time the models
    on instead of generated inputs. Raises InputError (exit 2) on bad input, before any long work."""
    validate_config(config)
    started = time.perf_counter()
    candidate = Path(candidate)
    stored = load_baseline(baseline) if is_baseline_file(baseline) else None
    if accuracy_gated(config):
        if evaluator is None:
            raise InputError("an accuracy limit ({max_accuracy_drop=DROP}) needs an evaluator",
                             "name a reference model's evaluator, or evaluation data (.npz) and a metric")
        if stored is not None:
            raise InputError(f"an accuracy gate needs the baseline model, and {baseline} is a stored latency baseline",
                             "gate against the baseline .onnx model instead, or set no accuracy limit")
        validate_eval_spec(evaluator)
    if stored is not None:
        result = _gate_stored(stored, candidate, config, data, evaluator, progress)
    else:
        result = _gate_interleaved(Path(baseline), candidate, config, data, evaluator, progress)
    checks, fields = result
    verdict, code = overall_verdict(checks, config.on_inconclusive)
    return GateResult(config=config, baseline=str(baseline), candidate=str(candidate), checks=tuple(checks),
                      verdict=verdict, exit_code=code, seconds=time.perf_counter() - started, **fields)


def _bench_config(config: GateConfig, *, threads: int, seq_len: int, batch: int):
    from dlopt.bench import BenchConfig

    return BenchConfig(target=config.target, threads=threads, batch_sizes=(batch,), seq_len=seq_len,
                       budget_s=config.budget_s, clock=config.clock, graph_opt_level=config.graph_opt_level,
                       allow_fallback=config.allow_fallback, device_id=config.device_id, seed=config.seed)


def _size_check(base_bytes: int, cand_bytes: int, limit: float) -> Check:
    growth = cand_bytes / base_bytes - 1 if base_bytes > 0 else math.inf
    verdict = "pass" if growth <= limit + 1e-12 else "fail"
    return Check(name="size", verdict=verdict, baseline=base_bytes / 1e6, candidate=cand_bytes / 1e6,
                 change=f"{growth:+.1%}", limit=f"<= {limit:+.1%}",
                 detail=f"bytes on disk (with external data): {base_bytes:,} -> {cand_bytes:,}")


def _latency_check(outcome: LatencyOutcome, config: GateConfig, base_median_s: float, cand_median_s: float,
                   clock: str) -> Check:
    i = outcome.interval
    change = "n/a" if i is None else f"x{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}]"
    return Check(name="latency", verdict=outcome.verdict, baseline=base_median_s * 1e3, candidate=cand_median_s * 1e3,
                 change=change, limit=f"<= x{outcome.limit:.3f}",
                 detail=f"median {clock} ms; {outcome.reason} ({outcome.look_confidence:.2%} CI per look)",
                 seconds=outcome.seconds)


def _warmup_dict(report) -> dict[str, Any]:
    return {"rounds": report.rounds, "seconds": report.seconds, "settled": report.settled}


def _progress_bridge(progress: ProgressFn | None, budget_s: float, offset_s: float):
    if progress is None:
        return None

    def on_progress(fraction: float, look: Look | None) -> None:
        spent = offset_s + fraction * (budget_s - offset_s)
        if look is None:
            progress("measuring", min(1.0, spent / budget_s))
        else:
            i = look.interval
            progress(f"look at {look.rounds} rounds: x{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}] {look.verdict}",
                     min(1.0, spent / budget_s))

    return on_progress


MIN_SAMPLE_S = 0.005  # the gate's samples: each look bootstraps all of them, so fewer, longer ones


def _gate_interleaved(baseline: Path, candidate: Path, config: GateConfig, data, evaluator, progress):
    from dlopt.bench import InterleavedSampler, bind_models, choose_clock, load_models, machine_fingerprint

    threads = config.threads or 1
    batch = config.batch or 1
    bench_config = _bench_config(config, threads=threads, seq_len=config.seq_len or DEFAULT_SEQ_LEN, batch=batch)
    target, models = load_models([baseline, candidate], bench_config,
                                 (lambda what, f: progress(what, 0.0)) if progress else None)
    clock, clock_reason = choose_clock(bench_config, target)
    notes = [f"clock: {clock} ({clock_reason})"]
    if any(m.handle.fell_back for m in models):
        notes.append(f"WARNING: target {target.name} is not available; measured on the CPU (--allow-fallback)")
    checks = []
    if config.max_size_growth is not None:
        checks.append(_size_check(models[0].size_bytes, models[1].size_bytes, config.max_size_growth))
    if evaluator is not None and accuracy_gated(config):
        if progress:
            progress("evaluating accuracy", 0.0)
        checks.extend(accuracy_checks(models[0].path, models[1].path, evaluator, config))

    # inputs generated (or taken from `data`) and bound on the device, then one cold run each
    runners = list(bind_models(target, models, batch=batch, seq_len=bench_config.seq_len, seed=config.seed,
                               data=data, device_id=config.device_id,
                               input_shapes=parse_input_shapes(config.input_shapes)).runners)
    sampler = InterleavedSampler(runners)
    if progress:
        progress("warming up", 0.0)
    warm = sampler.warm_up(max_seconds=config.budget_s * config.warmup_max_fraction, clock=clock,
                           on_round=(lambda f: progress("warming up", f * config.warmup_max_fraction))
                           if progress else None)
    repeat = runs_per_sample(sampler, clock, MIN_SAMPLE_S)
    if repeat > 1:
        sampler = InterleavedSampler([Repeated(run, repeat) for run in runners])
        notes.append(f"each sample is {repeat} back-to-back runs (runs under {MIN_SAMPLE_S * 1e3:g} ms are "
                     "timed in groups, as timeit does)")
    sampling_budget = max(config.budget_s - warm.seconds, 1e-3)
    outcome = sequential_test(
        lambda: sampler.run_rounds(1), lambda: sampler.rounds,
        lambda level: sampler.ratio(1, clock, method=config.ratio_method, confidence=level, n_boot=config.n_boot,
                                    seed=config.seed),
        limit=1 + config.max_slowdown, budget_s=sampling_budget, looks=config.looks,
        confidence=config.confidence, first_look_fraction=config.first_look_fraction,
        min_rounds=config.min_rounds, progress=_progress_bridge(progress, config.budget_s, warm.seconds))
    base_median = float(np.median(sampler.samples(0, clock))) / repeat
    cand_median = float(np.median(sampler.samples(1, clock))) / repeat
    checks.insert(0, _latency_check(outcome, config, base_median, cand_median, clock))
    fields = dict(mode="interleaved", latency=outcome, clock=clock, threads=threads, batch=batch,
                  warmup=_warmup_dict(warm), machine=machine_fingerprint(threads, target, config.device_id),
                  cross_machine=(), notes=tuple(notes))
    return checks, fields


def _gate_stored(stored: StoredBaseline, candidate: Path, config: GateConfig, data, evaluator, progress):
    from dlopt.bench import InterleavedSampler, bind_models, load_models, machine_fingerprint
    from dlopt.targets import get_target

    threads = config.threads or stored.threads
    if config.target != stored.target:
        raise InputError(f"baseline {stored.path} was measured on target {stored.target!r}, the gate runs on "
                         f"{config.target!r}", f"pass {{target={stored.target}}}, or gate against the baseline model")
    target = get_target(config.target)
    here = machine_fingerprint(threads, target, config.device_id)
    differences = fingerprint_differences(stored.fingerprint, here)
    if differences and not config.allow_cross_machine:
        raise InputError(
            f"baseline {stored.path} was measured on another machine or setup ({'; '.join(differences)}); "
            "comparing absolute latencies across machines measures the machines, not the models",
            "re-measure the baseline model here instead (gate against the baseline .onnx model: the reliable "
            "way), or pass {allow_cross_machine} to compare anyway")
    if stored.inputs_from_data and data is None:
        raise InputError(f"baseline {stored.path} was measured on inputs from a data file",
                         "time the candidate on the same data file")
    stored_batch = stored.batch_run(config.batch)
    batch = stored_batch.batch
    seq_len = config.seq_len or stored.seq_len
    clock = stored.clock if config.clock == "auto" else config.clock
    if clock not in stored_batch.samples_s:
        raise InputError(f"baseline {stored.path} has no {clock} samples", f"use {{clock={stored.clock}}}")
    bench_config = _bench_config(config, threads=threads, seq_len=seq_len, batch=batch)
    if config.seed != stored.seed or seq_len != stored.seq_len:
        raise InputError(f"baseline {stored.path} was measured with seed {stored.seed}, seq-len {stored.seq_len}",
                         f"gate with {{seed={stored.seed}}} and {{seq_len={stored.seq_len}}} (or leave them unset)")
    target, models = load_models([candidate], bench_config, (lambda what, f: progress(what, 0.0)) if progress else None)
    model = models[0]
    bound = bind_models(target, models, batch=batch, seq_len=seq_len, seed=config.seed, data=data,
                        device_id=config.device_id, input_shapes=parse_input_shapes(config.input_shapes))
    shapes = dict(bound.input_shapes)
    common = set(shapes) & set(stored_batch.input_shapes)
    mismatched = [k for k in sorted(common) if shapes[k] != tuple(stored_batch.input_shapes[k])]
    if mismatched:
        ours = ", ".join(f"{k}{list(shapes[k])}" for k in mismatched)
        theirs = ", ".join(f"{k}{list(stored_batch.input_shapes[k])}" for k in mismatched)
        raise InputError(f"the candidate's inputs {ours} differ from the baseline's {theirs}",
                         f"gate with the baseline's {{batch={batch}}} and {{seq_len={stored.seq_len}}}")
    notes = [f"clock: {clock} (the stored baseline's)",
             "stored baseline: the machine's drift since it was measured is not in the CI; gating against the "
             "baseline model, measured interleaved, is the reliable way"]
    if differences:
        notes.append("CROSS-MACHINE comparison (--allow-cross-machine): " + "; ".join(differences))
    checks = []
    if config.max_size_growth is not None:
        checks.append(_size_check(stored.size_bytes, model.size_bytes, config.max_size_growth))
    sampler = InterleavedSampler(list(bound.runners))
    warm = sampler.warm_up(max_seconds=config.budget_s * config.warmup_max_fraction, clock=clock,
                           on_round=(lambda f: progress("warming up", f * config.warmup_max_fraction))
                           if progress else None)
    base_samples = thin(stored_batch.samples_s[clock], STORED_SAMPLES_MAX)
    outcome = sequential_test(
        lambda: sampler.run_rounds(1), lambda: sampler.rounds,
        lambda level: ratio_ci(base_samples, thin(sampler.samples(0, clock), 2 * STORED_SAMPLES_MAX),
                               method="median-ratio", paired=False,
                               confidence=level,
                               n_boot=config.n_boot, seed=config.seed),
        limit=1 + config.max_slowdown, budget_s=max(config.budget_s - warm.seconds, 1e-3), looks=config.looks,
        confidence=config.confidence, first_look_fraction=config.first_look_fraction,
        min_rounds=config.min_rounds, progress=_progress_bridge(progress, config.budget_s, warm.seconds))
    checks.insert(0, _latency_check(outcome, config, float(np.median(base_samples)),
                                    float(np.median(sampler.samples(0, clock))), clock))
    fields = dict(mode="stored", latency=outcome, clock=clock, threads=threads, batch=batch,
                  warmup=_warmup_dict(warm), machine=here, cross_machine=tuple(differences), notes=tuple(notes))
    return checks, fields


# --------------------------------------------------------------------------- accuracy

# Metrics where smaller is better; every other metric (accuracy, agreement, cosine, correlation, SQNR)
# is taken as higher-is-better, and its "drop" is baseline - candidate.
LOWER_IS_BETTER = ("mse", "perplexity", "loss", "error")
# What a metric computed against the baseline's own output would be for the baseline itself.
_PERFECT_VS_BASELINE = {"top1_agreement": 1.0, "cosine": 1.0, "mse": 0.0}


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """How to score both models: a reference model's real evaluator (`dlopt.models`), or data + metrics
    (`dlopt.evaluate.evaluate_data`; the candidate is compared with the baseline on the same inputs)."""

    reference_model: str | None = None
    data: str | None = None
    metrics: tuple[str, ...] = ("top1",)
    output: str | None = None
    target: str = "cpu"

    def describe(self) -> str:
        if self.reference_model:
            return f"the {self.reference_model} reference evaluator"
        return f"{self.data} ({', '.join(self.metrics)})"


def validate_eval_spec(spec: EvalSpec) -> None:
    from dlopt.evaluate import validate_metrics

    if (spec.reference_model is None) == (spec.data is None):
        raise InputError("the accuracy gate needs one evaluator",
                         "name a reference model's evaluator, or evaluation data (.npz) and a metric")
    if spec.reference_model is not None:
        from dlopt.models import get_reference_model

        get_reference_model(spec.reference_model)  # unknown names fail here, before any measuring
        return
    metrics = validate_metrics(spec.metrics)
    if "sqnr" in metrics:
        raise InputError("sqnr has no 'drop' against the baseline (the baseline's own SQNR is infinite)",
                         "gate on cosine, mse or top1 instead (dlopt eval reports SQNR)")
    if not Path(spec.data).is_file():
        raise InputError(f"evaluation data {spec.data} does not exist", "give an existing .npz file")


def accuracy_gated(config: GateConfig) -> bool:
    return config.max_accuracy_drop is not None or bool(config.metric_drops)


def metric_drop(metric: str, baseline: float, candidate: float) -> float:
    """How much worse the candidate is, in the metric's units (positive = worse)."""
    lower_better = any(word in metric.lower() for word in LOWER_IS_BETTER)
    return candidate - baseline if lower_better else baseline - candidate


def accuracy_checks(baseline: Path, candidate: Path, spec: EvalSpec, config: GateConfig) -> list[Check]:
    """Score both models with `spec` and gate each metric's drop on its limit (config.metric_drops, else
    config.max_accuracy_drop; a metric with neither is not gated and not listed)."""
    from dlopt.evaluate import EvalConfig, evaluate_data, evaluate_reference_model

    started = time.perf_counter()
    eval_config = EvalConfig(metrics=spec.metrics, target=spec.target, output=spec.output,
                             allow_fallback=config.allow_fallback)
    if spec.reference_model is not None:
        result = evaluate_reference_model(candidate, spec.reference_model, eval_config, reference=baseline)
    else:
        result = evaluate_data(candidate, spec.data, eval_config, reference=baseline)
    seconds = time.perf_counter() - started
    per_metric = dict(config.metric_drops)
    unknown = sorted(set(per_metric) - {row.metric for row in result.rows})
    if unknown:
        raise InputError(f"{spec.describe()} reports no metric {', '.join(unknown)}",
                         f"it reports: {', '.join(row.metric for row in result.rows)}")
    checks = []
    for row in result.rows:
        limit = per_metric.get(row.metric, config.max_accuracy_drop)
        if limit is None:
            continue
        base_value = row.reference if row.reference is not None else _PERFECT_VS_BASELINE.get(row.metric)
        if base_value is None:
            continue
        drop = metric_drop(row.metric, base_value, row.value)
        if math.isnan(drop):
            verdict = "fail"
        else:
            verdict = "pass" if drop <= limit + 1e-12 else "fail"
        note = row.note or ("vs the baseline model's score" if row.reference is not None else "")
        note = "; ".join([note, *(f"warning: {w}" for w in result.warnings)]).strip("; ")
        checks.append(Check(name=f"accuracy: {row.metric}", verdict=verdict, baseline=base_value, candidate=row.value,
                            change=f"drop {drop:+.4g}", limit=f"drop <= {limit:g}",
                            detail=f"{spec.describe()}; {note}".rstrip("; "),
                            seconds=0.0 if checks else seconds))  # one evaluation: its time counted once
    if not checks:
        raise InputError(f"{spec.describe()} gave no metric that compares the two models",
                         "choose a metric with a baseline value (top1 with labels, cosine, mse)")
    return checks


# --------------------------------------------------------------------------- outputs


_MARK = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def _rows(result: GateResult) -> tuple[list[str], list[list[Any]]]:
    headers = ["check", "verdict", "baseline", "candidate", "change", "limit"]
    rows = []
    for c in result.checks:
        unit = " ms" if c.name == "latency" else " MB" if c.name == "size" else ""
        rows.append([c.name, _MARK[c.verdict],
                     "n/a" if c.baseline is None else f"{c.baseline:.4g}{unit}",
                     "n/a" if c.candidate is None else f"{c.candidate:.4g}{unit}", c.change, c.limit])
    return headers, rows


def _headline(result: GateResult) -> str:
    return (f"{_MARK[result.verdict]} (exit {result.exit_code}): {result.candidate} vs "
            f"{'stored baseline ' if result.mode == 'stored' else ''}{result.baseline}")


def _context_lines(result: GateResult) -> list[str]:
    lines = []
    o = result.latency
    if o is not None:
        warm = result.warmup or {}
        lines.append(f"sequential test: {len(o.looks)} look(s), {o.rounds} rounds in {o.seconds:.1f} s "
                     f"after {warm.get('rounds', 0)} warm-up rounds"
                     + ("" if warm.get("settled", True) else " (latency never settled: capped)"))
    m = result.machine
    lines.append(f"machine: {m.get('cpu_model')}, {m.get('logical_cores')} cores, onnxruntime {m.get('onnxruntime')}, "
                 f"{result.threads} thread(s), batch {result.batch}, target {result.config.target}")
    lines.extend(result.notes)
    lines.extend(f"{c.name}: {c.detail}" for c in result.checks)
    lines.append(f"decision in {result.seconds:.1f} s")
    return lines


def format_text(result: GateResult) -> str:
    """The terminal report: the checks table, what decided, and the machine."""
    from dlopt.report import format_table

    headers, rows = _rows(result)
    return "\n".join([_headline(result), "", format_table(headers, rows), "", *_context_lines(result)])


def format_markdown(result: GateResult) -> str:
    """A GitHub-flavoured Markdown report (for $GITHUB_STEP_SUMMARY)."""
    from dlopt.report import format_markdown_table

    headers, rows = _rows(result)
    details = [f"- {line}" for line in _context_lines(result)]
    return "\n".join([f"### dlopt gate: {_headline(result)}", "", format_markdown_table(headers, rows), "",
                      *details, ""])


def junit_xml(result: GateResult) -> str:
    """One JUnit test case per check: a failed check is a <failure>; an inconclusive one is an <error>
    when the policy exits 3, a <failure> when it fails, and <skipped> when it passes."""
    failures = sum(c.verdict == "fail" for c in result.checks)
    inconclusive = [c for c in result.checks if c.verdict == "inconclusive"]
    policy = result.config.on_inconclusive
    errors = len(inconclusive) if policy == "exit-3" else 0
    failures += len(inconclusive) if policy == "fail" else 0
    skipped = len(inconclusive) if policy == "pass" else 0
    total = f"{result.seconds:.3f}"
    suites = ET.Element("testsuites", name="dlopt gate", tests=str(len(result.checks)), failures=str(failures),
                        errors=str(errors), skipped=str(skipped), time=total)
    suite = ET.SubElement(suites, "testsuite", name="dlopt gate", tests=str(len(result.checks)),
                          failures=str(failures), errors=str(errors), skipped=str(skipped), time=total,
                          timestamp=result.created)
    properties = ET.SubElement(suite, "properties")
    for name, value in (("baseline", result.baseline), ("candidate", result.candidate), ("mode", result.mode),
                        ("verdict", result.verdict), ("exit_code", result.exit_code), ("clock", result.clock),
                        ("cpu_model", result.machine.get("cpu_model")),
                        ("onnxruntime", result.machine.get("onnxruntime"))):
        ET.SubElement(properties, "property", name=name, value=str(value))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname="dlopt.gate", name=c.name, time=f"{c.seconds:.3f}")
        message = f"{c.name}: {c.change} (limit {c.limit})"
        if c.verdict == "fail":
            ET.SubElement(case, "failure", message=message, type="regression").text = c.detail
        elif c.verdict == "inconclusive":
            tag = {"exit-3": "error", "fail": "failure", "pass": "skipped"}[policy]
            ET.SubElement(case, tag, message=f"inconclusive: {message}", type="inconclusive").text = c.detail
        ET.SubElement(case, "system-out").text = c.detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_outputs(result: GateResult, *, summary: str | os.PathLike | None = None,
                  junit: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                  github_summary: str | None = None) -> list[Path]:
    """Write the requested reports. --summary FILE and the others are written atomically; the GitHub
    step summary is appended to, as GitHub expects (several steps share that file)."""
    from dlopt.fileio import write_bytes_atomic, write_json_atomic

    written = []
    if summary is not None:
        written.append(write_bytes_atomic(summary, format_markdown(result).encode()))
    elif github_summary:
        path = Path(github_summary)
        with open(path, "a", encoding="utf-8") as f:
            f.write(format_markdown(result) + "\n")
        written.append(path)
    if junit is not None:
        written.append(write_bytes_atomic(junit, junit_xml(result).encode()))
    if json_path is not None:
        written.append(write_json_atomic(json_path, result.to_dict()))
    return written


__all__ = ["BASELINE_SCHEMA", "BASELINE_VERSION", "Check", "EXIT_INCONCLUSIVE", "EXIT_PASS", "EXIT_REGRESSION",
           "EXIT_USAGE", "GateConfig", "GateResult", "LatencyOutcome", "Look", "POLICIES", "StoredBaseline",
           "baseline_document", "fingerprint_differences", "format_markdown", "format_text", "is_baseline_file",
           "judge", "junit_xml", "load_baseline", "look_confidence", "look_schedule", "overall_verdict", "run_gate",
           "save_baseline", "sequential_test", "validate_config", "write_outputs"]
