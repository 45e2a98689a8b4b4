"""The latency recorded in a bundle: the session a bundle recommends and a short measurement of it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.package.checks import bundle_session
from dlopt.package.config import Log, PackageConfig


def bundle_threads(config: PackageConfig) -> int:
    """Intra-op threads the bundle is measured with and recommends: --threads, else the target's own
    (phone-like for mobile, 1 otherwise)."""
    if config.threads:
        return config.threads
    from dlopt.targets import get_target

    return get_target(config.target).session_threads()


def recommended_session(built: Mapping[str, Any], config: PackageConfig) -> dict[str, Any]:
    """The session configuration a bundle recommends to its users: the entries its model must be loaded
    with plus dlopt's own (denormals flushed: see dlopt.runtime), and the threads it was measured with."""
    from dlopt.sessions import SESSION_CONFIG

    return {
        "session_config": {**SESSION_CONFIG, **built["session_config"]},
        "intra_op_num_threads": bundle_threads(config),
        "inter_op_num_threads": 1,
        "first_session_rule": "ONNX Runtime applies session.set_denormal_as_zero to a session's intra-op pool "
        "threads, but to the thread that creates sessions only from the process's FIRST "
        "session: create a session with it before any other, and call run() from that "
        "thread (or set FTZ/DAZ on your own threads)",
    }


def bundle_latency(
    model_file: Path,
    built: Mapping[str, Any],
    config: PackageConfig,
    feeds: Mapping[str, np.ndarray],
    pte_programs,
    log: Log,
) -> dict[str, Any]:
    """Latency of the packaged model on its target (phone-like threads for mobile), and, with .pte
    programs, ORT and ExecuTorch on one thread measured interleaved (their ratio is the fair number)."""
    from dlopt.bench import InterleavedSampler, machine_fingerprint
    from dlopt.targets import get_target

    target = get_target(config.target)
    metrics: dict[str, Any] = {}
    available, reason = target.is_available()
    if not available:
        log(f"no latency for target {config.target}: {reason}")
        return metrics
    threads = bundle_threads(config)
    handle = target.create_session(model_file, threads=threads) if not built["session_config"] else None
    if handle is None:  # Runtime-style ORT models need their session config: the CPU EP, as the mobile target
        session = bundle_session(model_file, built["session_config"], threads)
        run = lambda: session.run(None, dict(feeds))  # noqa: E731
    else:
        run = target.bind(handle, feeds)
    clock = target.default_clock(threads)
    log(f"measuring {model_file.name} on {config.target} ({threads} thread(s), {config.measure_s:g} s)")
    sampler = InterleavedSampler([run])
    sampler.warm_up(max_seconds=config.measure_s / 2, clock=clock)
    sampler.run_for(config.measure_s / 2, min_rounds=10)
    metrics[config.target] = {
        "artifact": model_file.name,
        "threads": threads,
        "clock": clock,
        "latency_ms": sampler.summary(0, clock).as_dict(1e3),
        "note": target.description,
        "machine": machine_fingerprint(threads, target),
    }
    if pte_programs:  # loaded with a one-thread ExecuTorch pool (build_pte)
        one = bundle_session(model_file, built["session_config"], 1)
        runners = [lambda: one.run(None, dict(feeds))] + [(lambda p=p: p.run(feeds)) for _, p in pte_programs]
        log(f"measuring ORT vs ExecuTorch/XNNPACK, one thread, interleaved ({config.measure_s:g} s)")
        sampler = InterleavedSampler(runners)
        sampler.warm_up(max_seconds=config.measure_s / 2, clock="cpu")
        sampler.run_for(config.measure_s, min_rounds=10)
        machine = machine_fingerprint(1)
        metrics["ort-cpu-1thread"] = {
            "artifact": model_file.name,
            "threads": 1,
            "clock": "cpu",
            "latency_ms": sampler.summary(0, "cpu").as_dict(1e3),
            "note": "ONNX Runtime CPU EP, one thread, baseline of the ratios below",
            "machine": machine,
        }
        for k, (label, _) in enumerate(pte_programs, start=1):
            ratio = sampler.ratio(k, "cpu")
            metrics[label] = {
                "artifact": f"model.{label}.pte",
                "threads": 1,
                "clock": "cpu",
                "latency_ms": sampler.summary(k, "cpu").as_dict(1e3),
                "ratio_to_ort": {
                    "estimate": ratio.estimate,
                    "low": ratio.low,
                    "high": ratio.high,
                    "confidence": ratio.confidence,
                },
                "note": "ExecuTorch XNNPACK backend on this host's CPU (the kernels Android/iOS run)",
                "machine": machine,
            }
    return metrics


SORT_BATCH = 8  # the batch a card's length-sorting figure is measured at: a server's small batch


def length_sorting_latency(
    model_file: Path,
    built: Mapping[str, Any],
    config: PackageConfig,
    model,
    data: Mapping[str, np.ndarray] | None,
    source_path: Path,
    log: Log,
) -> dict[str, Any] | None:
    """Where the bundle's real inputs mix lengths in a batch of SORT_BATCH: the packaged model timed on
    those batches as given and with the samples sorted by length (dlopt bench's measurement, one thread,
    thread CPU time, interleaved), with the shapes. None, with a log line, when it does not apply."""
    if not any("mask" in i.name.lower() for i in model.graph.input):
        return None
    if built["session_config"] or config.target != "cpu":  # a runtime-style mobile model: its own session
        return None
    from dlopt.bench import BenchConfig, benchmark, length_sorting
    from dlopt.data import as_spec, data_arrays
    from dlopt.errors import InputError

    source = "the given data"
    if data is None and config.calibration is not None:
        spec = as_spec(config.calibration)
        source = str(spec)
        try:
            data = data_arrays(spec, source_path, samples=8 * SORT_BATCH)
        except InputError as e:
            log(f"no length-sorting figure: {source} cannot be batched ({e.message})")
            return None
    if data is None or length_sorting(data, SORT_BATCH) is None:
        return None
    log(f"measuring batches of {SORT_BATCH} of {source} as given vs sorted by length ({config.measure_s:g} s)")
    try:
        result = benchmark(
            [model_file],
            BenchConfig(
                target="cpu",
                threads=1,
                clock="cpu",
                batch_sizes=(SORT_BATCH,),
                budget_s=max(config.measure_s, 1.0),
                min_rounds=5,
            ),
            data=data,
            data_source=source,
        )
    except InputError as e:
        log(f"no length-sorting figure: {e.message}")
        return None
    batch = result.batches[0]
    if not batch.length_sorting or not batch.length_sorting.get("latency"):
        return None
    return {
        **dict(batch.length_sorting),
        "batch": batch.batch,
        "data": source,
        "threads": 1,
        "rounds": batch.rounds,
        "machine": dict(result.machine),
    }
