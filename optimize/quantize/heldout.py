"""How a quantized model is verified: samples held out of calibration, the fidelity floor and the verdict,
the quick speed check, and the counts of quantized nodes."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dlopt.data import CalibrationData, Feeds
from dlopt.errors import StageError
from dlopt.fidelity import compare_runs
from dlopt.fidelity import report as fidelity_report
from dlopt.graphfacts import op_counts, recurrent_pairs
from dlopt.inputs import graph_inputs
from dlopt.metrics import VERDICT_CONFIDENCE, MetricChoice, assess, choose_metric, group_sqnr, metric_request
from dlopt.optimize.preprocess import check_feeds
from dlopt.optimize.quantize.int8_recipe import cpu_record
from dlopt.optimize.quantize.schemes import FIDELITY_FLOORS_DB, QuantizeConfig
from dlopt.optimize.quantize_scheme import CALIBRATION_KEEP, HOLDOUT_MIN, QuantizeScheme
from dlopt.runtime import cpu_label, runtime_report
from dlopt.sessions import cpu_session, run_outputs
from dlopt.targets.cpu import host_cpu

# -- reporting --------------------------------------------------------------------------------------------
_QUANT_OPS = (
    "QLinear",
    "DynamicQuantize",
    "MatMulInteger",
    "ConvInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "QGemm",
    "MatMulNBits",
    "GatherBlockQuantized",
    "DequantizeLinear",
    "QuantizeLinear",
)


def quantized_nodes(model) -> dict[str, int]:
    """Quantized compute by op type, subgraphs included: QOperator ops by name; in QDQ graphs, each
    float op fed by a DequantizeLinear is counted as 'QDQ:<op>'. Quantize/DequantizeLinear themselves
    are listed too."""
    from dlopt.optimize.normalize import all_graphs

    producer = {o: n for g in all_graphs(model.graph) for n in g.node for o in n.output}
    counts: dict[str, int] = {}
    for node in (n for g in all_graphs(model.graph) for n in g.node):
        key = None
        if node.op_type.startswith(_QUANT_OPS) or node.op_type in _QUANT_OPS:
            key = node.op_type
        elif node.domain in ("", "ai.onnx", "com.microsoft") and any(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input
        ):
            key = f"QDQ:{node.op_type}"
        if key:
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- held-out fidelity and the verdict ----------------------------------------------------------------
# A stream's drift shows over its length only: 32 held-out feeds of a 32 ms VAD are 1 s of audio
STREAM_FIDELITY_SAMPLES = 1024


def fidelity_sample_count(model, config: QuantizeScheme | QuantizeConfig) -> int:
    """How many held-out feeds are read: config.fidelity_samples, raised to STREAM_FIDELITY_SAMPLES for a
    stateful model (recurrent_pairs), whose held-out feeds are judged as a stream."""
    return max(config.fidelity_samples, STREAM_FIDELITY_SAMPLES) if recurrent_pairs(model) else config.fidelity_samples


def held_out_outputs(
    session,
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Sequence[np.ndarray]],
    pairs: Sequence[tuple[str, str]],
) -> tuple[list[list[np.ndarray]], int]:
    """(outputs, how many feeds carried the candidate's own state). A stateful model's held-out feeds
    are run as the stream they are: where a feed's state input equals what FP32 returned as that state
    on the previous feed (the feeds carry FP32's state, as a streaming reader does), the candidate gets
    its own previous state output instead, so its error feeds back and accumulates as it does in use.
    Judged on FP32's state, Silero VAD's dynamic INT8 differed by 0.10 per chunk while its own stream
    drifted to 0.99. A feed whose state is not FP32's previous one (a new stream) is run as given."""
    from dlopt.sessions import feeds_for

    names = [o.name for o in session.get_outputs()]
    index = {n: i for i, n in enumerate(names)}
    pairs = [(i, o) for i, o in pairs if o in index]
    outputs: list[list[np.ndarray]] = []
    carried = 0
    for k, feed in enumerate(feeds):
        feed = dict(feed)
        if (
            k
            and pairs
            and all(
                i in feed
                and np.shape(feed[i]) == np.shape(reference[k - 1][index[o]])
                and np.allclose(feed[i], reference[k - 1][index[o]], rtol=1e-5, atol=1e-6)
                for i, o in pairs
            )
        ):
            feed.update({i: outputs[-1][index[o]] for i, o in pairs})
            carried += 1
        outputs.append(session.run(None, feeds_for(session, feed)))
    return outputs, carried


def fidelity_floor(config: QuantizeScheme | QuantizeConfig) -> float:
    """The SQNR floor in dB: the sqnr metric's, and the verdict's when the task metric cannot judge."""
    return FIDELITY_FLOORS_DB[config.precision] if config.min_sqnr_db is None else float(config.min_sqnr_db)


def task_choice(
    original,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: QuantizeScheme | QuantizeConfig,
    reference: Sequence[Sequence[np.ndarray]] | None = None,
) -> MetricChoice:
    """The task metric the verdict is on: config.metric / an --evaluator FILE.py:FUNCTION, else chosen
    from FP32's outputs on the first held-out feed (dlopt.metrics.choose_metric)."""
    metric, user = metric_request(config.metric, getattr(config, "evaluator", None))
    if reference is None:
        reference = run_outputs(cpu_session(original), list(feeds)[:1])
    names = [o.name for o in original.graph.output]
    choice = choose_metric(reference[0], names, feeds[0] if feeds else None, requested=metric, evaluator=user)
    return with_score_threshold(choice, config.score_threshold)


def with_score_threshold(choice: MetricChoice, threshold: float | None) -> MetricChoice:
    """`choice` judged at the user's score threshold (--score-threshold): the score a detector's box must
    reach to count, the value a probability map is binarized at. The verdict then judges the boxes the
    user's post-processing keeps: judged at the default 0.25, a layout detector whose package keeps boxes
    above 0.5 read Jaccard 0.865 on 48 pages where the user's boxes read 0.923."""
    key = {"detection": "confidence", "map": "threshold"}.get(choice.name)
    if threshold is None or key is None or choice.evaluator:
        return choice
    return dataclasses.replace(
        choice,
        params={**choice.params, key: float(threshold)},
        reason=f"{choice.reason}; scores judged at >= {threshold:g} (--score-threshold)"
        if key == "confidence"
        else f"{choice.reason}; binarized at {threshold:g} (--score-threshold)",
    )


def task_metric(
    choice: MetricChoice, reference, outputs, feeds, names, config, *, selected: bool = False
) -> dict[str, Any]:
    """The task metric against its floor (dlopt.metrics.assess). Which figure decides: a single model's
    estimate on the held-out samples is unbiased, so it decides, and its one-sided bound is reported beside
    it (`confirmed`). A model `selected` among candidates compared on these same samples (floor recovery)
    is the one that drew the luckiest samples, so its bound decides, as config.strict_verdict asks for every
    model. Judged by the bound, one top-1 miss in 32 samples fails a 0.95 floor however good the model
    (EfficientNet-Lite0 INT8: 31 of 32, 21.4 dB on photos held out), while 4 of 4 passes it."""
    # a floor in dB the user set is checked as well: they asked for that SQNR
    return assess(
        choice,
        reference,
        outputs,
        feeds,
        names,
        sqnr_floor=fidelity_floor(config),
        metric_floor=config.metric_floor,
        sqnr_too=config.min_sqnr_db is not None,
        precision=config.precision,
        confidence=getattr(config, "verdict_confidence", VERDICT_CONFIDENCE),
        bound_decides=selected or getattr(config, "strict_verdict", False),
    )


def holdout_count(samples: int, config: QuantizeScheme | QuantizeConfig, *, stream: bool = False) -> int:
    """How many of `samples` calibration samples are held out: at least the share config.holdout
    (HOLDOUT_FRACTION) and HOLDOUT_MIN, and every sample beyond the first CALIBRATION_KEEP; at most half
    and at most config.fidelity_samples; none below 2 samples or with config.holdout 0.
    16 samples: 8 calibrate, 8 judge (it was 12 and 4); 10: 6 and 4; 100: 68 and 32. A `stream`'s feeds
    (a stateful model's chunks, hundreds) keep the share alone: its calibration is a stream too."""
    if samples < 2 or config.holdout <= 0:
        return 0
    wanted = max(math.ceil(config.holdout * samples), HOLDOUT_MIN, 0 if stream else samples - CALIBRATION_KEEP)
    return max(1, min(wanted, samples // 2, config.fidelity_samples))


def split_holdout(
    data: CalibrationData | None,
    eval_data: CalibrationData | None,
    config: QuantizeScheme | QuantizeConfig,
    samples: int | None = None,
) -> tuple[CalibrationData | None, list[Feeds] | None, dict[str, Any]]:
    """(calibration data, held-out feeds, report entry). With eval_data its first fidelity_samples
    samples are the held-out set and all of `data` calibrates; else the last holdout_count() samples
    of `data` are held out (deterministic: the same samples every run) and the rest calibrate.
    `samples`: read that many instead of config.fidelity_samples (fidelity_sample_count).
    Measured on the samples it was calibrated on, a detector reported 34 dB and then kept fewer than
    a third of its detections on other photos: fidelity on calibration samples flatters."""
    if data is not None and not isinstance(data, CalibrationData):  # a plain list of feeds
        data = CalibrationData.from_feeds(list(data), source="data")
    stream = samples is not None and samples != config.fidelity_samples
    if samples is not None and stream:  # a stream's length (fidelity_sample_count)
        config = dataclasses.replace(config, fidelity_samples=samples)
    if eval_data is not None:
        feeds = [dict(f) for _, f in zip(range(config.fidelity_samples), eval_data)]
        return (
            data,
            feeds,
            {
                "data": "eval-data",
                "source": eval_data.source,
                "held_out_indices": list(range(len(feeds))),
                "calibration_samples": len(data) if data is not None else 0,
                "warning": None,
            },
        )
    if data is None:
        return (
            None,
            None,
            {"data": "synthetic", "source": None, "held_out_indices": [], "calibration_samples": 0, "warning": None},
        )
    total = len(data)
    held = holdout_count(total, config, stream=stream)
    if held == 0:
        return (
            data,
            None,
            {
                "data": "calibration",
                "source": data.source,
                "held_out_indices": [],
                "calibration_samples": total,
                "warning": f"{data.source} has {total} sample(s): none held out, so fidelity is measured "
                "on the calibration samples and flatters; give more samples or --eval-data",
            },
        )
    calibration = copy.copy(data)  # the same stream, read up to the held-out samples
    calibration.limit = total - held
    indices = list(range(total - held, total))
    feeds = [dict(f) for i, f in enumerate(data) if i >= total - held]
    return (
        calibration,
        feeds,
        {
            "data": "held-out",
            "source": data.source,
            "held_out_indices": indices,
            "calibration_samples": total - held,
            "warning": None,
        },
    )


def verdict(report: Mapping[str, Any], floor: float) -> dict[str, Any]:
    """Whether the result may be written as a success: the task metric at or above its floor on the
    held-out samples (report["fidelity"]["task_metric"], dlopt.metrics.assess: detection Jaccard, map
    agreement, ...; the lowest SQNR per output and channel group at or above `floor` dB when the metric
    is sqnr or the samples cannot judge it), in the QDQ graph's own arithmetic when the host's kernels
    compute it inexactly, and the accuracy budget met when one was asked for. Each failed check is a
    row: what, measured, required."""
    fid = report.get("fidelity_exact_arithmetic") or report["fidelity"]
    failures = []
    task = fid.get("task_metric")
    if task is not None and task["judged_by"] == "sqnr" and task["failures"]:
        # one row per output and channel group below the floor, as the per-output table reads
        groups = (task.get("judged_components") or {}).get("per_group_db") or {}
        required = task["failures"][0]["required"]
        for name, by_group in groups.items():
            for group, sqnr in by_group.items():
                finite = fid["outputs"].get(name, {}).get("finite", True)
                if finite and sqnr >= task["judged_floor"]:
                    continue
                failures.append(
                    {
                        "check": f"output {name} SQNR dB" + ("" if group == "all" else f" ({group})"),
                        "measured": sqnr,
                        "required": required,
                        "why": "non-finite values"
                        if not finite
                        else f"quantization noise is {10 ** (-sqnr / 10) * 100:.3g} % of the output's power"
                        + (f"; {task['note']}" if task.get("note") else ""),
                    }
                )
    elif task is not None:
        for row in task["failures"]:
            if row["check"] == "sqnr" and task["judged_by"] != "sqnr":  # the user's --min-sqnr beside the metric
                groups = (task.get("judged_components") or {}).get("per_group_db") or {}
                failures.append(
                    {
                        **row,
                        "check": "lowest SQNR dB (output, channel group)",
                        "why": ", ".join(f"{o} {g} {v:.1f} dB" for o, gs in groups.items() for g, v in gs.items()),
                    }
                )
                continue
            check = f"{task['judged_by']}: {row['check']}" if row["check"] != task["judged_by"] else task["judged_by"]
            bounds = task.get("uncertainty")
            if "estimate" in row and bounds:
                check += f" ({bounds['confidence'] * 100:g}% bound)"
            failures.append({**row, "check": check, "why": _why(task, row)})
    else:
        for name, m in fid["outputs"].items():
            sqnr = m["sqnr_db"]
            if not m["finite"] or sqnr < floor:
                failures.append(
                    {
                        "check": f"output {name} SQNR dB",
                        "measured": sqnr,
                        "required": f">= {floor:g}",
                        "why": "non-finite values"
                        if not m["finite"]
                        else f"quantization noise is {10 ** (-sqnr / 10) * 100:.3g} % of the output's power",
                    }
                )
    budget = report.get("budget")
    if budget is not None and not budget["met"]:
        chosen = budget["chosen"]
        failures.append(
            {
                "check": f"{budget['evaluator']} drop",
                "measured": chosen["drop"],
                "required": f"<= {budget['max_drop']:g}",
                "why": f"best of {len(budget['candidates'])} candidates, {chosen['excluded_count']} node(s) in float",
            }
        )
    recovery = report.get("floor_recovery")
    if recovery is not None and failures:
        for row in failures:
            row["why"] += (
                f"; still below with up to {recovery['max_float_nodes']} of {recovery['ranked_nodes']} "
                f"nodes in float ({len(recovery['candidates'])} candidates tried)"
            )
    body = {
        "passed": not failures,
        "floor_sqnr_db": floor,
        "samples": fid["samples"],
        "data": fid.get("data"),
        "recovered_nodes": recovery["chosen"]["excluded"] if recovery is not None and not failures else [],
        "failures": failures,
    }
    if task is not None:
        bounds = task.get("uncertainty")
        body |= {
            "metric": task["metric"],
            "metric_floor": task["floor"],
            "metric_value": task["value"],
            "judged_by": task["judged_by"],
            # the one-sided bound (None: the metric has none, or --verdict-confidence 0), what decided, and
            # whether the bound clears the floor too where the estimate decided (task_metric)
            "metric_bound": (bounds["checks"].get("value") or {}).get("bound") if bounds else None,
            "confidence": bounds["confidence"] if bounds else None,
            "decided_by": task.get("decided_by", "estimate"),
            "confirmed": task.get("confirmed"),
        }
    return body


def _why(task: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """A failed task-metric check in words, with the per-group SQNR beside it."""
    c = task.get("components") or {}
    if task["judged_by"] == "detection":
        text = (
            f"{c.get('matched')} of FP32's {c.get('fp32_boxes')} boxes matched (IoU >= {c.get('iou')}, same "
            f"class), {c.get('false_boxes')} false box(es)"
        )
    elif task["judged_by"] == "map":
        text = (
            f"{c.get('false_positive_pixels')} false-positive pixel(s); "
            f"{c.get('samples_with_false_positives_where_fp32_has_none')} sample(s) with positives where FP32 "
            "has none"
        )
    else:
        text = task.get("why", "")
    bounds = task.get("uncertainty")
    if "estimate" in row and bounds:
        text = (
            f"the estimate {row['estimate']:.4g} on {bounds['samples']} held-out samples, but on other samples "
            f"of the kind it may read as low as {row['measured']:.4g} (one-sided {bounds['confidence'] * 100:g}% "
            "bound, bootstrap over the samples); more held-out samples (--eval-data, --eval-samples) narrow the bound, "
            "--verdict-confidence 0 judges the estimate alone; " + text
        )
    if task.get("sqnr_by_group"):
        text += "; SQNR " + ", ".join(
            f"{o} {g} {v:.1f} dB" for o, gs in task["sqnr_by_group"].items() for g, v in gs.items()
        )
    return text


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _runs(session, feeds: Mapping[str, np.ndarray]) -> bool:
    """Whether `session` runs on `feeds` (a model may not run padded: fixed positions or length)."""
    from dlopt.sessions import feeds_for, trial_run

    try:
        trial_run(session, feeds_for(session, feeds))
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors have no common public base class
        return False
    return True


def padded_feed(
    model, feeds: Mapping[str, np.ndarray], seq_len: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """`feeds` with their token axis padded to `seq_len` (default: dlopt bench's DEFAULT_SEQ_LEN), the
    shape users run: tokenizers pad batches to a fixed length. Only integer inputs whose axis 1 is
    dynamic in the graph are padded, with 0 (masks are 0 on the padding: ids and type ids there are
    masked out). Returns (feeds, what was padded or None). Timed unpadded, a short calibration sentence
    gave MiniLM 3.43x at seq 16 in this check where dlopt bench gave 2.97x at seq 128 (on a Xeon)."""
    from dlopt.bench import DEFAULT_SEQ_LEN

    seq_len = seq_len or DEFAULT_SEQ_LEN
    specs = {s.name: s for s in graph_inputs(model)}
    token = [
        k
        for k, v in feeds.items()
        if k in specs
        and np.issubdtype(np.asarray(v).dtype, np.integer)
        and len(specs[k].shape) >= 2
        and not _fixed(specs[k].shape[1])
        and np.asarray(v).ndim >= 2
    ]
    lengths = {int(np.asarray(feeds[k]).shape[1]) for k in token}
    if not token or len(lengths) != 1 or next(iter(lengths)) >= seq_len:
        return dict(feeds), None
    length = next(iter(lengths))
    out = dict(feeds)
    for k in token:
        array = np.asarray(feeds[k])
        widths = [(0, 0)] * array.ndim
        widths[1] = (0, seq_len - length)
        out[k] = np.pad(array, widths, constant_values=0)
    return out, {"inputs": sorted(token), "tokens": length, "padded_to": seq_len}


def speed_check(
    float_session,
    quantized_session,
    feeds: Mapping[str, np.ndarray],
    *,
    budget_s: float = 3.0,
    min_rounds: int = 8,
    rounds: int | None = None,
    padding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A quick interleaved latency check of two sessions on one feed, measured the way `dlopt bench`
    measures (its sampler: warm-up until the latencies settle, runs grouped into samples of at least
    1 ms, rotated rounds, thread CPU time, the median of per-round ratios with its 95 % bootstrap CI),
    only in a shorter budget (~budget_s, at least `min_rounds` and at most `rounds` rounds). With fewer
    rounds than bench asks for (BenchConfig.min_rounds) the figure is marked rough (`rough`). Printed
    with its CI, it claims no more than it measured: an earlier 4-round version printed 1.22x where
    `dlopt bench` measured 1.13x [1.11, 1.15]."""
    import time

    from dlopt.bench import BenchConfig, InterleavedSampler, Repeated, runs_per_sample

    bench = BenchConfig()
    sessions = (float_session, quantized_session)
    inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
    runners = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, inputs)]
    started = time.perf_counter()
    warm_sampler = InterleavedSampler(runners)
    warm = warm_sampler.warm_up(
        max_seconds=budget_s * bench.warmup_max_fraction,
        clock="cpu",
        window=bench.warmup_window,
        tolerance=bench.warmup_tolerance,
    )
    repeat = runs_per_sample(warm_sampler, "cpu", bench.min_sample_s)
    sampler = InterleavedSampler([Repeated(r, repeat) if repeat > 1 else r for r in runners])
    sampler.run_for(max(0.0, budget_s - (time.perf_counter() - started)), min_rounds=min_rounds, max_rounds=rounds)
    a, b = sampler.samples(0, "cpu") / repeat, sampler.samples(1, "cpu") / repeat
    # quantized / FP32 latency, as dlopt bench computes it; the speed-up is its inverse
    ratio = sampler.ratio(
        1,
        "cpu",
        baseline=0,
        method=bench.ratio_method,
        confidence=bench.confidence,
        n_boot=bench.n_boot,
        seed=bench.seed,
    )
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    return {
        "batch": batch,
        "threads": 1,
        "rounds": int(a.size),
        "runs_per_sample": repeat,
        "warmup_settled": warm.settled,
        "clock": "thread CPU time",
        "float_ms": float(np.median(a) * 1e3),
        "quantized_ms": float(np.median(b) * 1e3),
        "speedup": float(1 / ratio.estimate),
        "speedup_ci": [float(1 / ratio.high), float(1 / ratio.low)],
        "confidence": ratio.confidence,
        "method": f"dlopt bench's sampler, {ratio.method}",
        "rough": bool(a.size < bench.min_rounds),
        "input_shapes": {k: list(np.asarray(v).shape) for k, v in inputs[0].items()},
        "padding": dict(padding) if padding else None,
    }


def feed_description(shapes: Mapping[str, Sequence[int]], padding: Mapping[str, Any] | None = None) -> str:
    """'input_ids[1, 128], attention_mask[1, 128] (12 real tokens padded to 128)': the shapes a speed
    figure was measured on, and the padding where there is any."""
    text = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
    if padding:
        text += f" ({padding['tokens']} real tokens padded to {padding['padded_to']})"
    return text


def quantize_summary(
    original,
    quantized,
    data,
    config: QuantizeScheme,
    *,
    feeds: list[Feeds] | None = None,
    holdout: Mapping[str, Any] | None = None,
    exact_arithmetic: bool = False,
    selected: bool = False,
) -> dict[str, Any]:
    """Sizes, quantized nodes, fidelity vs the float model on this host's kernels and, with
    exact_arithmetic, also of the QDQ graph's own arithmetic: graph optimizations off, so ORT runs
    DequantizeLinear -> float op -> QuantizeLinear instead of its fused int8 kernels. Fidelity is
    measured on `feeds` (the held-out samples) when given, else on samples of `data` or synthetic ones.
    `selected`: the model was chosen among candidates compared on `feeds` (task_metric)."""
    holdout = dict(holdout or {"data": "calibration" if data is not None else "synthetic"})
    if not feeds:
        feeds = check_feeds(original, data, config.fidelity_samples, config.input_shapes)
    float_session = cpu_session(original)
    reference = run_outputs(float_session, feeds)
    session = cpu_session(quantized)
    pairs = recurrent_pairs(original)
    outputs, carried = held_out_outputs(session, feeds, reference, pairs)
    names = [o.name for o in session.get_outputs()]
    if [o.name for o in original.graph.output] != names:
        raise StageError(
            f"quantization changed the graph outputs {[o.name for o in original.graph.output]} -> {names}",
            "report this model",
        )
    choice = task_choice(original, feeds, config, reference)
    summary = {
        "bytes_before": original.ByteSize(),
        "bytes_after": quantized.ByteSize(),
        "quantized_nodes": quantized_nodes(quantized),
        "ops_after": op_counts(quantized),
        "fidelity": _fidelity(choice, reference, outputs, feeds, names, config, selected)
        | {
            "data": holdout["data"],
            "input_shapes": {k: list(np.shape(v)) for k, v in feeds[0].items()},
            "stream": {"state": [list(p) for p in pairs], "feeds_carrying_own_state": carried} if pairs else None,
        },
        "holdout": {k: v for k, v in holdout.items() if k != "warning"},
        "metric": {"metric": None, "why": choice.reason},
        "cpu": cpu_record(host_cpu()),
    }
    summary["metric"]["metric"] = summary["fidelity"]["task_metric"]["metric"]
    if exact_arithmetic:
        exact = held_out_outputs(cpu_session(quantized, graph_opt_level="disable"), feeds, reference, pairs)[0]
        summary["fidelity_exact_arithmetic"] = {
            **_fidelity(choice, reference, exact, feeds, names, config, selected),
            "data": holdout["data"],
            "why": f"this x86 CPU has no VNNI: its int8 kernels overflow the full-range weights of the "
            f"{config.target} recipe, so the fidelity above is this host's; the QDQ arithmetic itself, "
            "what the target's int8 kernels compute, is below",
        }
    if config.speed_check:
        timed, padding = padded_feed(original, feeds[0])
        if padding is not None and not _runs(float_session, timed):  # e.g. a position table shorter than 128
            timed, padding = dict(feeds[0]), None
        summary["speed_check"] = speed_check(float_session, session, timed, padding=padding)
    summary["session"] = runtime_report()
    summary["cpu_label"] = cpu_label()
    return summary


def _fidelity(choice: MetricChoice, reference, outputs, feeds, names, config, selected: bool) -> dict[str, Any]:
    """The fidelity table (SQNR, cosine per output, SQNR per channel group where an output concatenates
    groups of different ranges) and the task metric against its floor."""
    table = fidelity_report(compare_runs(reference, outputs, names))
    groups = group_sqnr(reference, outputs, names)
    for name, entry in table.items():
        if len(groups.get(name, {})) > 1:
            entry["sqnr_db_by_group"] = groups[name]
    task = task_metric(choice, reference, outputs, feeds, names, config, selected=selected)
    task["sqnr_by_group"] = {n: g for n, g in groups.items() if len(g) > 1}
    return {"samples": len(feeds), "outputs": table, "task_metric": task}


def warn_if_slower(report: Mapping[str, Any], log) -> None:
    speed = report.get("speed_check")
    if speed and speed["speedup"] < 0.95:
        log(
            f"warning: the quantized model ran {speed['speedup']:.2f}x FP32 speed in a quick check "
            f"(inputs {feed_description(speed['input_shapes'], speed.get('padding'))}, one thread): slower on "
            f"this CPU; measure with dlopt bench"
        )
