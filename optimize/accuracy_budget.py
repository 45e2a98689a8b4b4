"""The accuracy budget: rank quantized nodes by the noise each adds, keep the worst in float until
the evaluator's drop is within budget, and prefer the fastest candidate that meets it.

Sensitivity of a node = the noise it adds itself. Both graphs expose every candidate node's input
and output; with r = ||float - quantized||² / ||float||² measured on both, a node's own contribution
is r_out - r_in (noise powers add). Measured once on a few samples, so ranking costs two runs of the
model, not one quantization per node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.metrics import METRIC_TABLE, MetricChoice, choose_metric, group_sqnr, measure, metric_request
from dlopt.optimize.preprocess import check_feeds, with_outputs
from dlopt.sessions import cpu_session, run_outputs

# Ops whose quantization is only a range carried through (or folded: a Clip/Relu after a quantized
# Conv disappears into its output's range). Keeping one of them float alone buys nothing and can
# cost: a float Clip leaves its quantized producer with the unclipped range. Not budget candidates.
PASSTHROUGH_OPS = {
    "Clip",
    "Relu",
    "Reshape",
    "Shape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Transpose",
    "Split",
    "Concat",
    "Slice",
    "Pad",
    "MaxPool",
    "Resize",
    "Expand",
    "Tile",
}


@dataclass(frozen=True)
class Evaluator:
    """score(model) -> float, higher is better; drop = baseline - score, in the metric's units
    (dlopt.metrics.METRIC_TABLE: agreement metrics are fractions of FP32's answers, FP32 = 1.0, so a drop
    of 0.01 is one sample in a hundred; perplexity: its ratio to FP32's, negated; sqnr: noise/signal power,
    0.01 = 20 dB; a reference model's metric: its own units, e.g. accuracy 0.005 = half a point)."""

    name: str
    score: Callable[[Any], float]
    baseline: float
    reason: str = ""  # why this metric (dlopt.metrics.choose_metric's reason), for reports


def _first_float_output(outputs: list[list[np.ndarray]]) -> int:
    for i, out in enumerate(outputs[0]):
        if np.issubdtype(out.dtype, np.floating):
            return i
    raise InputError("the model has no floating-point output to compare", "use {evaluator=model:NAME}")


def build_evaluator(
    spec: str | None,
    original,
    data: Iterable[Mapping[str, np.ndarray]] | None,
    samples: int = 32,
    input_shapes: tuple[str, ...] = (),
    metric: str | None = None,
) -> Evaluator:
    """The budget's evaluator: the task metric (dlopt.metrics.choose_metric on FP32's outputs, or `metric`,
    or `spec` when it names a METRIC_TABLE metric or a FILE.py:FUNCTION) of each candidate against the
    float model on the same samples; model:NAME[:metric] runs a reference model's evaluator. Where the
    outputs name no task (the sqnr fallback) and none was asked for, the budget is on cosine."""
    if spec and spec.startswith("model:"):
        return _reference_evaluator(spec)
    spec = None if spec == "auto" else spec
    requested, user = metric_request(metric, spec)
    if spec and not user and spec not in METRIC_TABLE:
        raise InputError(
            f"unknown evaluator {spec!r}",
            f"choose a metric ({', '.join(METRIC_TABLE)}), FILE.py:FUNCTION or model:NAME[:metric]",
        )
    feeds = check_feeds(original, data, samples, input_shapes)
    reference = run_outputs(cpu_session(original), feeds)
    names = [o.name for o in original.graph.output]
    choice = choose_metric(reference[0], names, feeds[0], requested=requested, evaluator=user)
    if choice.name == "sqnr" and requested is None and not user:
        choice = MetricChoice(
            "cosine", choice.reason + "; the budget is on cosine", {"output": _first_float_output(reference)}
        )
    if choice.name == "sqnr":
        index = _first_float_output(reference)
        ref = [r[index].astype(np.float64) for r in reference]
        signal = max(sum(float(np.sum(r * r)) for r in ref), 1e-30)

        def noise_score(model) -> float:
            got = [o[index].astype(np.float64) for o in run_outputs(cpu_session(model), feeds)]
            if not all(np.all(np.isfinite(g)) for g in got):
                return float("-inf")
            return 1.0 - sum(float(np.sum((r - g) ** 2)) for r, g in zip(ref, got)) / signal

        return Evaluator("sqnr", noise_score, 1.0, choice.reason)
    sign = -1.0 if choice.name in METRIC_TABLE and not METRIC_TABLE[choice.name].higher_is_better else 1.0

    def score(model) -> float:
        outputs = run_outputs(cpu_session(model), feeds)
        if not all(np.all(np.isfinite(o)) for run in outputs for o in run if np.issubdtype(o.dtype, np.floating)):
            return float("-inf")
        return sign * measure(choice, reference, outputs, feeds, names).value

    baseline = sign * measure(choice, reference, reference, feeds, names).value
    return Evaluator(choice.name, score, baseline, choice.reason)


def floor_evaluator(
    original, feeds: list[dict[str, np.ndarray]], config, *, graph_opt_level: str = "all", selected: bool = True
) -> Evaluator:
    """score(model) = the margin of the verdict's task metric (its one-sided bound where it has one,
    as the verdict judges) over its floor on `feeds` (the held-out samples), in the metric's units
    (dlopt.metrics.assess: detection Jaccard - 0.9, the lowest SQNR per
    output and channel group - the dB floor, ...; -inf for a non-finite SQNR); baseline 0, so
    drop = -margin and a model meets the floor at max_drop 0. graph_opt_level "disable" scores the QDQ
    graph's own arithmetic. `selected` (candidates compared on `feeds`): the bound decides, else the
    estimate (dlopt.optimize.quantize.heldout.task_metric)."""
    from dlopt.graphfacts import recurrent_pairs
    from dlopt.optimize.quantize.heldout import held_out_outputs, task_choice, task_metric

    reference = run_outputs(cpu_session(original), feeds)
    names = [o.name for o in original.graph.output]
    choice = task_choice(original, feeds, config, reference)
    pairs = recurrent_pairs(original)  # a stateful model is scored as the stream the verdict runs

    def score(model) -> float:
        outputs = held_out_outputs(cpu_session(model, graph_opt_level=graph_opt_level), feeds, reference, pairs)[0]
        return float(task_metric(choice, reference, outputs, feeds, names, config, selected=selected)["margin"])

    first = task_metric(choice, reference, reference, feeds, names, config, selected=selected)
    unit = (
        "dB"
        if first["judged_by"] == "sqnr"
        else (METRIC_TABLE[first["judged_by"]].unit if first["judged_by"] in METRIC_TABLE else "")
    )
    # the verdict's rule: where the metric has per-sample counts, the margin of its pessimistic bound
    # (dlopt.metrics.metric_bounds): recovery aims where the verdict judges, not at the estimate on these samples
    judged = "bound" if first["decided_by"] == "bound" else "value"
    return Evaluator(
        f"{first['judged_by']} margin over its floor ({unit}, {judged}) on {len(feeds)} samples", score, 0.0
    )


def _reference_evaluator(spec: str) -> Evaluator:
    from dlopt.models import get_reference_model, onnx_runner

    parts = spec.split(":")
    ref = get_reference_model(parts[1])
    metric = parts[2] if len(parts) > 2 else ref.metrics[0]
    if metric not in ref.metrics:
        raise InputError(f"reference model {ref.name!r} has no metric {metric!r}", f"known: {', '.join(ref.metrics)}")

    def score(model) -> float:
        return float(ref.evaluate(onnx_runner(cpu_session(model)))[metric])

    # the baseline is filled in by the caller from the float model (one evaluation)
    return Evaluator(f"model:{ref.name}:{metric}", score, float("nan"))


# -- sensitivity -------------------------------------------------------------------------------------


def node_sensitivity(
    float_model, quantized, feeds: list[dict[str, np.ndarray]], op_types: Iterable[str], exclude: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Candidate nodes of `float_model` (op type in op_types, not excluded) with the noise each adds,
    most sensitive first. Nodes whose tensors the quantized graph does not keep are skipped."""
    op_types, exclude = set(op_types), set(exclude)
    q_tensors = {o for n in quantized.graph.node for o in n.output} | {i.name for i in quantized.graph.input}
    inits = {t.name for t in float_model.graph.initializer}
    nodes = []
    for node in float_model.graph.node:
        if node.op_type not in op_types or node.op_type in PASSTHROUGH_OPS or node.name in exclude:
            continue
        inputs = [i for i in node.input if i and i not in inits and i in q_tensors]
        nodes.append((node, inputs))
    # Nodes inside If/Loop/Scan branches are candidates too (Silero VAD has all its layers there), ranked
    # last with no local figure: a branch's tensors cannot be made graph outputs to probe; leave_one_out
    # measures what keeping each in float buys at the output.
    from dlopt.optimize.normalize import subgraph_nodes

    inner = [
        {"node": node.name, "op_type": node.op_type, "added_noise": 0.0, "output_sqnr_db": None, "in_subgraph": where}
        for where, node in subgraph_nodes(float_model, op_types)
        if node.op_type not in PASSTHROUGH_OPS and node.name and node.name not in exclude
    ]
    if not nodes:
        return inner
    # a node whose output the quantized graph renamed (fused with its activation) is still a
    # candidate; its own noise is just not measurable here (leave_one_out measures it)
    tensors = sorted({t for node, inputs in nodes for t in [node.output[0], *inputs] if t in q_tensors})
    float_probe, quant_probe = with_outputs(float_model, tensors), with_outputs(quantized, tensors)
    float_outs = run_outputs(cpu_session(float_probe, graph_opt_level="basic"), feeds)
    quant_outs = run_outputs(cpu_session(quant_probe, graph_opt_level="basic"), feeds)
    f_names = [o.name for o in float_probe.graph.output]
    q_names = [o.name for o in quant_probe.graph.output]
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for f_out, q_out in zip(float_outs, quant_outs):
        f_map, q_map = dict(zip(f_names, f_out)), dict(zip(q_names, q_out))
        for t in tensors:
            a, b = f_map[t], q_map[t]
            if not np.issubdtype(a.dtype, np.floating) or a.shape != b.shape:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            signal[t] = signal.get(t, 0.0) + float(np.sum(a64 * a64))
            noise[t] = noise.get(t, 0.0) + float(np.sum((a64 - b64) ** 2))

    def ratio(t: str) -> float:
        return noise.get(t, 0.0) / signal[t] if signal.get(t) else 0.0

    ranked = []
    for node, inputs in nodes:
        r_out = ratio(node.output[0])
        r_in = max((ratio(t) for t in inputs), default=0.0)
        added = max(r_out - r_in, 0.0)
        ranked.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "added_noise": added,
                "output_sqnr_db": float(-10 * np.log10(r_out)) if r_out > 0 else float("inf"),
            }
        )
    ranked.sort(key=lambda e: (-e["added_noise"], e["node"]))
    return ranked + inner


def leave_one_out(
    ranked: list[dict[str, Any]],
    original,
    prepared,
    config,
    recipe,
    data,
    feeds,
    ranges,
    log: Callable[[str], None],
    layer_stats=None,
) -> list[dict[str, Any]]:
    """Re-rank by what keeping each node alone in float buys at the model's output (noise power of
    the first float output relative to FP32's, in its worst channel group). One quantization per node
    (calibration reused), so used up to config.leave_one_out_limit nodes. Needed because a node's own
    added noise (above) misses how much later layers amplify it: on EfficientNet-Lite0 the early
    convolutions matter most although their local noise is small."""
    from dlopt.optimize.quantize.int8 import quantize_int8

    reference = run_outputs(cpu_session(original), feeds)
    index = _first_float_output(reference)
    names = [o.name for o in original.graph.output]

    def output_noise(model) -> float:
        # the worst channel group's noise/signal (dlopt.metrics.channel_groups): on a detector's [1, 4+C, N]
        # the pixel boxes' energy would otherwise rank every node by the boxes alone, not by the scores
        outs = run_outputs(cpu_session(model), feeds)
        by_group = group_sqnr([[r[index]] for r in reference], [[o[index]] for o in outs], [names[index]])
        return max(
            10 ** (-db / 10) if np.isfinite(db) else (0.0 if db > 0 else float("inf"))
            for db in by_group[names[index]].values()
        )

    for i, entry in enumerate(ranked, 1):
        model, _ = quantize_int8(
            prepared, config, recipe, data, exclude_nodes=[entry["node"]], ranges=ranges, layer_stats=layer_stats
        )
        entry["output_noise_if_float"] = output_noise(model)
        log(
            f"budget: ranking {i}/{len(ranked)}: {entry['node']} in float -> output noise "
            f"{entry['output_noise_if_float']:.3g}"
        )
    log(f"budget: ranked {len(ranked)} nodes by leave-one-out output noise")
    return sorted(ranked, key=lambda e: (e["output_noise_if_float"], e["node"]))


# -- the search --------------------------------------------------------------------------------------
def cpu_latency_ms(model, feeds: dict[str, np.ndarray], repeats: int = 5) -> float:
    """Median one-thread CPU time of one run: a quick ranking figure, not a benchmark."""
    from dlopt.bench import median_cpu_ms

    session = cpu_session(model, threads=1)
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    return median_cpu_ms(lambda: session.run(None, feeds), repeats)


def meet_budget(
    original,
    prepared,
    quantized,
    config,
    recipe,
    data,
    *,
    ranges=None,
    layer_stats=None,
    evaluator: Evaluator | None = None,
    max_drop: float | None = None,
    eval_feeds: list[dict[str, np.ndarray]] | None = None,
    max_float_share: float = 1.0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Search for the INT8 model with the fewest float nodes whose evaluator drop is <= max_drop (default
    config.max_accuracy_drop). The evaluator (default: config.evaluator's) scores on `eval_feeds`, the
    samples held out from calibration, when given; nodes are ranked on the calibration data. At most
    max_float_share of the ranked nodes are tried in float.

    Returns the report entry with the chosen model under 'model' (popped by the caller)."""
    from dlopt.optimize.quantize.int8 import default_op_types, quantize_int8

    if evaluator is None:
        evaluator = build_evaluator(
            config.evaluator,
            original,
            eval_feeds or data,
            config.fidelity_samples,
            input_shapes=config.input_shapes,
            metric=config.metric,
        )
    max_drop = config.max_accuracy_drop if max_drop is None else max_drop
    baseline = evaluator.baseline
    if baseline != baseline:  # a reference model's metric: measure the float model once
        baseline = evaluator.score(original)
    feeds = check_feeds(original, data, min(config.fidelity_samples, 8), config.input_shapes)
    log(f"budget: {evaluator.name} drop <= {max_drop} (baseline {baseline:.4f})")
    candidates: list[dict[str, Any]] = []
    models: dict[int, Any] = {}
    ranked: list[dict[str, Any]] = []

    def trial(k: int) -> dict[str, Any]:
        excluded = [e["node"] for e in ranked[:k]]
        model = (
            quantized
            if k == 0
            else quantize_int8(
                prepared, config, recipe, data, exclude_nodes=excluded, ranges=ranges, layer_stats=layer_stats
            )[0]
        )
        score = evaluator.score(model)
        entry = {
            "excluded_count": k,
            "excluded": sorted(set(excluded) | set(config.exclude_nodes)),
            "score": score,
            "drop": baseline - score,
            "within_budget": baseline - score <= max_drop,
            "latency_ms": cpu_latency_ms(model, feeds[0]),
            "bytes": model.ByteSize(),
        }
        log(
            f"budget: {k} node(s) in float -> {evaluator.name} {score:.4f} (drop {entry['drop']:.4f}), "
            f"{entry['latency_ms']:.1f} ms"
        )
        candidates.append(entry)
        models[k] = model
        return entry

    first = trial(0)
    if not first["within_budget"]:
        # ranked only when the fully quantized model misses: leave-one-out costs one quantization
        # per node (minutes on a transformer)
        op_types = default_op_types(recipe) - set(config.exclude_ops)
        ranked = node_sensitivity(prepared, quantized, feeds, op_types, config.exclude_nodes)
        if 0 < len(ranked) <= config.leave_one_out_limit:
            ranked = leave_one_out(ranked, original, prepared, config, recipe, data, feeds, ranges, log, layer_stats)
        log(f"budget: {len(ranked)} nodes ranked")
    most = min(len(ranked), int(len(ranked) * max_float_share))
    if not first["within_budget"] and most > 0:
        low, k, high = 0, 1, None
        while True:  # 1, 2, 4 ... nodes in float until the budget holds
            k = min(k, most)
            if trial(k)["within_budget"]:
                high = k
                break
            if k == most:
                break
            low, k = k, k * 2
        # two bisection steps between the last miss and the first hit: fewer float nodes is faster
        for _ in range(2):
            if high is None or high - low <= 1:
                break
            mid = (low + high) // 2
            if trial(mid)["within_budget"]:
                high = mid
            else:
                low = mid
    within = [c for c in candidates if c["within_budget"]]
    # Within the budget, the fewest float nodes: a choice by these 5-run latencies changed with the machine's
    # load (the same quantize wrote different models); fewer float nodes is faster in INT8's favour anyway
    chosen = (
        min(within, key=lambda c: c["excluded_count"])
        if within
        else max(candidates, key=lambda c: (c["score"], -c["excluded_count"]))
    )
    chosen["chosen"] = True
    return {
        "evaluator": evaluator.name,
        "baseline": baseline,
        "max_drop": max_drop,
        "met": bool(within),
        "ranked_nodes": len(ranked),
        "max_float_nodes": most,
        "ranking": ranked[:20],
        "candidates": candidates,
        "chosen": chosen,
        "model": models[chosen["excluded_count"]],
    }


__all__ = ["Evaluator", "build_evaluator", "cpu_latency_ms", "floor_evaluator", "meet_budget", "node_sensitivity"]
