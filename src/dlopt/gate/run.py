"""The gate run: the baseline model interleaved with the candidate, or a stored baseline against
the candidate alone; size and accuracy checks beside the latency test.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench import Repeated, runs_per_sample
from dlopt.errors import InputError
from dlopt.gate.accuracy import EvalSpec, accuracy_checks, accuracy_gated, validate_eval_spec
from dlopt.gate.baseline import STORED_SAMPLES_MAX, StoredBaseline, fingerprint_differences, load_baseline, thin
from dlopt.gate.config import DEFAULT_SEQ_LEN, GateConfig, ProgressFn, validate_config
from dlopt.gate.result import GateCheck, GateResult, overall_verdict
from dlopt.gate.sequential import LatencyOutcome, Look, sequential_test
from dlopt.inputs import parse_input_shapes
from dlopt.stats import ratio_ci


def is_baseline_file(path: str | os.PathLike) -> bool:
    """A stored baseline is JSON; anything else is taken as a model."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return True
    if p.suffix.lower() == ".onnx" or not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(1).strip() in (b"{",)


def run_gate(
    baseline: str | os.PathLike,
    candidate: str | os.PathLike,
    config: GateConfig = GateConfig(),
    *,
    data: Mapping[str, np.ndarray] | None = None,
    evaluator: EvalSpec | None = None,
    progress: ProgressFn | None = None,
) -> GateResult:
    """Gate CANDIDATE against BASELINE (a model, or a stored-baseline JSON) on latency, and on size and
    accuracy when their limits are set (accuracy with `evaluator`). Exported LM folders are gated by
    dlopt.gate.lm.run_gate_lm instead (decode tokens/s and perplexity). `data`: arrays to time the models
    on instead of generated inputs. Raises InputError (exit 2) on bad input, before any long work."""
    validate_config(config)
    started = time.perf_counter()
    candidate = Path(candidate)
    from dlopt.lm import is_lm_folder

    if is_lm_folder(baseline) or is_lm_folder(candidate):
        raise InputError(
            f"{baseline} and {candidate} are exported LM folders, which dlopt.gate.lm.run_gate_lm gates",
            "gate them with dlopt.api.gate (decode tokens/s and perplexity)",
        )
    if config.prompt_len is not None or config.new_tokens is not None:
        raise InputError(
            "{prompt_len} and {new_tokens} are for exported LM folders (genai_config.json)",
            "drop them, or gate two folders from dlopt export --task text-generation",
        )
    stored = load_baseline(baseline) if is_baseline_file(baseline) else None
    if accuracy_gated(config):
        if evaluator is None:
            raise InputError(
                "an accuracy limit ({max_accuracy_drop=DROP}) needs an evaluator",
                "name a reference model's evaluator, or evaluation data (.npz) and a metric",
            )
        if stored is not None:
            raise InputError(
                f"an accuracy gate needs the baseline model, and {baseline} is a stored latency baseline",
                "gate against the baseline .onnx model instead, or set no accuracy limit",
            )
        validate_eval_spec(evaluator)
    if stored is not None:
        result = _gate_stored(stored, candidate, config, data, evaluator, progress)
    else:
        result = _gate_interleaved(Path(baseline), candidate, config, data, evaluator, progress)
    checks, fields = result
    verdict, code = overall_verdict(checks, config.on_inconclusive)
    return GateResult(
        config=config,
        baseline=str(baseline),
        candidate=str(candidate),
        checks=tuple(checks),
        verdict=verdict,
        exit_code=code,
        seconds=time.perf_counter() - started,
        **fields,
    )


def _bench_config(config: GateConfig, *, threads: int, seq_len: int, batch: int):
    from dlopt.bench import BenchConfig

    return BenchConfig(
        target=config.target,
        threads=threads,
        batch_sizes=(batch,),
        seq_len=seq_len,
        budget_s=config.budget_s,
        clock=config.clock,
        graph_opt_level=config.graph_opt_level,
        allow_fallback=config.allow_fallback,
        device_id=config.device_id,
        seed=config.seed,
    )


def size_check(base_bytes: int, cand_bytes: int, limit: float) -> GateCheck:
    growth = cand_bytes / base_bytes - 1 if base_bytes > 0 else math.inf
    verdict = "pass" if growth <= limit + 1e-12 else "fail"
    return GateCheck(
        name="size",
        verdict=verdict,
        baseline=base_bytes / 1e6,
        candidate=cand_bytes / 1e6,
        change=f"{growth:+.1%}",
        limit=f"<= {limit:+.1%}",
        detail=f"bytes on disk (with external data): {base_bytes:,} -> {cand_bytes:,}",
    )


def _latency_check(
    outcome: LatencyOutcome, config: GateConfig, base_median_s: float, cand_median_s: float, clock: str
) -> GateCheck:
    i = outcome.interval
    change = "n/a" if i is None else f"x{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}]"
    return GateCheck(
        name="latency",
        verdict=outcome.verdict,
        baseline=base_median_s * 1e3,
        candidate=cand_median_s * 1e3,
        change=change,
        limit=f"<= x{outcome.limit:.3f}",
        detail=f"median {clock} ms; {outcome.reason} ({outcome.look_confidence:.2%} CI per look)",
        seconds=outcome.seconds,
    )


def warmup_dict(report) -> dict[str, Any]:
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
            progress(
                f"look at {look.rounds} rounds: x{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}] {look.verdict}",
                min(1.0, spent / budget_s),
            )

    return on_progress


def gated_latency_test(
    config: GateConfig,
    warm,
    progress: ProgressFn | None,
    run_round: Callable[[], Any],
    rounds: Callable[[], int],
    interval: Callable[[float], Any],
):
    """The gate's sequential latency test with the limits, looks and budget of `config` (after the warm-up's
    share of the budget): `run_round` times one more round, `rounds` counts them, `interval(level)` is the
    candidate/baseline time ratio's CI. One place for the ONNX gate (live or stored baseline) and the LM gate."""
    return sequential_test(
        run_round,
        rounds,
        interval,
        limit=1 + config.max_slowdown,
        budget_s=max(config.budget_s - warm.seconds, 1e-3),
        looks=config.looks,
        confidence=config.confidence,
        first_look_fraction=config.first_look_fraction,
        min_rounds=config.min_rounds,
        progress=_progress_bridge(progress, config.budget_s, warm.seconds),
    )


MIN_SAMPLE_S = 0.005  # the gate's samples: each look bootstraps all of them, so fewer, longer ones


def _gate_interleaved(baseline: Path, candidate: Path, config: GateConfig, data, evaluator, progress):
    from dlopt.bench import InterleavedSampler, bind_models, choose_clock, load_models, machine_fingerprint

    threads = config.threads or 1
    batch = config.batch or 1
    bench_config = _bench_config(config, threads=threads, seq_len=config.seq_len or DEFAULT_SEQ_LEN, batch=batch)
    target, models = load_models(
        [baseline, candidate], bench_config, (lambda what, f: progress(what, 0.0)) if progress else None
    )
    clock, clock_reason = choose_clock(bench_config, target)
    notes = [f"clock: {clock} ({clock_reason})"]
    if any(m.handle.fell_back for m in models):
        notes.append(f"WARNING: target {target.name} is not available; measured on the CPU (--allow-fallback)")
    checks = []
    if config.max_size_growth is not None:
        checks.append(size_check(models[0].size_bytes, models[1].size_bytes, config.max_size_growth))
    if evaluator is not None and accuracy_gated(config):
        if progress:
            progress("evaluating accuracy", 0.0)
        checks.extend(accuracy_checks(models[0].path, models[1].path, evaluator, config))

    # inputs generated (or taken from `data`) and bound on the device, then one cold run each
    runners = list(
        bind_models(
            target,
            models,
            batch=batch,
            seq_len=bench_config.seq_len,
            seed=config.seed,
            data=data,
            device_id=config.device_id,
            input_shapes=parse_input_shapes(config.input_shapes),
        ).runners
    )
    sampler = InterleavedSampler(runners)
    if progress:
        progress("warming up", 0.0)
    warm = sampler.warm_up(
        max_seconds=config.budget_s * config.warmup_max_fraction,
        clock=clock,
        on_round=(lambda f: progress("warming up", f * config.warmup_max_fraction)) if progress else None,
    )
    repeat = runs_per_sample(sampler, clock, MIN_SAMPLE_S)
    if repeat > 1:
        sampler = InterleavedSampler([Repeated(run, repeat) for run in runners])
        notes.append(
            f"each sample is {repeat} back-to-back runs (runs under {MIN_SAMPLE_S * 1e3:g} ms are "
            "timed in groups, as timeit does)"
        )
    outcome = gated_latency_test(
        config,
        warm,
        progress,
        lambda: sampler.run_rounds(1),
        lambda: sampler.rounds,
        lambda level: sampler.ratio(
            1, clock, method=config.ratio_method, confidence=level, n_boot=config.n_boot, seed=config.seed
        ),
    )
    base_median = float(np.median(sampler.samples(0, clock))) / repeat
    cand_median = float(np.median(sampler.samples(1, clock))) / repeat
    checks.insert(0, _latency_check(outcome, config, base_median, cand_median, clock))
    fields = dict(
        mode="interleaved",
        latency=outcome,
        clock=clock,
        threads=threads,
        batch=batch,
        warmup=warmup_dict(warm),
        machine=machine_fingerprint(threads, target, config.device_id),
        cross_machine=(),
        notes=tuple(notes),
    )
    return checks, fields


def _gate_stored(stored: StoredBaseline, candidate: Path, config: GateConfig, data, evaluator, progress):
    from dlopt.bench import InterleavedSampler, bind_models, load_models, machine_fingerprint
    from dlopt.targets import get_target

    threads = config.threads or stored.threads
    if config.target != stored.target:
        raise InputError(
            f"baseline {stored.path} was measured on target {stored.target!r}, the gate runs on {config.target!r}",
            f"pass {{target={stored.target}}}, or gate against the baseline model",
        )
    target = get_target(config.target)
    here = machine_fingerprint(threads, target, config.device_id)
    differences = fingerprint_differences(stored.fingerprint, here)
    if differences and not config.allow_cross_machine:
        raise InputError(
            f"baseline {stored.path} was measured on another machine or setup ({'; '.join(differences)}); "
            "comparing absolute latencies across machines measures the machines, not the models",
            "re-measure the baseline model here instead (gate against the baseline .onnx model: the reliable "
            "way), or pass {allow_cross_machine} to compare anyway",
        )
    if stored.inputs_from_data and data is None:
        raise InputError(
            f"baseline {stored.path} was measured on inputs from a data file",
            "time the candidate on the same data file",
        )
    stored_batch = stored.batch_run(config.batch)
    batch = stored_batch.batch
    seq_len = config.seq_len or stored.seq_len
    clock = stored.clock if config.clock == "auto" else config.clock
    if clock not in stored_batch.samples_s:
        raise InputError(f"baseline {stored.path} has no {clock} samples", f"use {{clock={stored.clock}}}")
    bench_config = _bench_config(config, threads=threads, seq_len=seq_len, batch=batch)
    if config.seed != stored.seed or seq_len != stored.seq_len:
        raise InputError(
            f"baseline {stored.path} was measured with seed {stored.seed}, seq-len {stored.seq_len}",
            f"gate with {{seed={stored.seed}}} and {{seq_len={stored.seq_len}}} (or leave them unset)",
        )
    target, models = load_models([candidate], bench_config, (lambda what, f: progress(what, 0.0)) if progress else None)
    model = models[0]
    bound = bind_models(
        target,
        models,
        batch=batch,
        seq_len=seq_len,
        seed=config.seed,
        data=data,
        device_id=config.device_id,
        input_shapes=parse_input_shapes(config.input_shapes),
    )
    shapes = dict(bound.input_shapes)
    common = set(shapes) & set(stored_batch.input_shapes)
    mismatched = [k for k in sorted(common) if shapes[k] != tuple(stored_batch.input_shapes[k])]
    if mismatched:
        ours = ", ".join(f"{k}{list(shapes[k])}" for k in mismatched)
        theirs = ", ".join(f"{k}{list(stored_batch.input_shapes[k])}" for k in mismatched)
        raise InputError(
            f"the candidate's inputs {ours} differ from the baseline's {theirs}",
            f"gate with the baseline's {{batch={batch}}} and {{seq_len={stored.seq_len}}}",
        )
    notes = [
        f"clock: {clock} (the stored baseline's)",
        "stored baseline: the machine's drift since it was measured is not in the CI; gating against the "
        "baseline model, measured interleaved, is the reliable way",
    ]
    if differences:
        notes.append("CROSS-MACHINE comparison (--allow-cross-machine): " + "; ".join(differences))
    checks = []
    if config.max_size_growth is not None:
        checks.append(size_check(stored.size_bytes, model.size_bytes, config.max_size_growth))
    sampler = InterleavedSampler(list(bound.runners))
    warm = sampler.warm_up(
        max_seconds=config.budget_s * config.warmup_max_fraction,
        clock=clock,
        on_round=(lambda f: progress("warming up", f * config.warmup_max_fraction)) if progress else None,
    )
    base_samples = thin(stored_batch.samples_s[clock], STORED_SAMPLES_MAX)
    outcome = gated_latency_test(
        config,
        warm,
        progress,
        lambda: sampler.run_rounds(1),
        lambda: sampler.rounds,
        lambda level: ratio_ci(
            base_samples,
            thin(sampler.samples(0, clock), 2 * STORED_SAMPLES_MAX),
            method="median-ratio",
            paired=False,
            confidence=level,
            n_boot=config.n_boot,
            seed=config.seed,
        ),
    )
    checks.insert(
        0,
        _latency_check(
            outcome, config, float(np.median(base_samples)), float(np.median(sampler.samples(0, clock))), clock
        ),
    )
    fields = dict(
        mode="stored",
        latency=outcome,
        clock=clock,
        threads=threads,
        batch=batch,
        warmup=warmup_dict(warm),
        machine=here,
        cross_machine=tuple(differences),
        notes=tuple(notes),
    )
    return checks, fields
