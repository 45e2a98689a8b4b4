"""Pick, by timing on this host, between equivalent graph forms that ONNX Runtime runs at different speeds.

Why this exists: ORT fuses `Add -> LayerNormalization` into its contrib `SkipLayerNormalization` when a
session is created, and assumes the fused kernel is faster. On this 2-core AMD EPYC (AVX2, ORT 1.32)
it is not: a 1x128x384 float tensor takes 325 us per call through SkipLayerNormalization against 71 us
for the same sum and `LayerNormalization` as two nodes (one thread, CPU time, ~28 us of session-call
overhead in both), 2,615 vs 436 us for 1,024 rows; its 12 nodes were 3.6 ms of MiniLM-L6's 31 ms INT8
run at seq 128. A model cannot switch one of ORT's fusions off for the sessions its users create, but the
fusion only matches an `Add` node: the same sum written as `Sum` is left alone. So, when the timing
says so, every residual sum that feeds a LayerNormalization becomes a `Sum`, and every
`SkipLayerNormalization` already in the graph (ORT's transformer optimizer writes them) becomes
`Sum -> LayerNormalization`. The arithmetic is the same float32 sum and normalization.

The choice is measured, not assumed: a later ORT, or another CPU, may run the fused kernel faster,
and then the graph is left as it is. Only for the CPU execution provider (CUDA's fused kernel is the
fast one) and float32 LayerNorms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dlopt.stage import StageResult, config_to_dict

LayerNormForm = Literal["auto", "fused", "unfused"]
LAYERNORM_FORMS = ("auto", "fused", "unfused")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True, kw_only=True)
class KernelChoiceConfig:
    layernorm: LayerNormForm = "auto"  # auto: unfused when it measures min_gain faster here
    min_gain: float = 1.15  # the unfused form must be this much faster to be written
    rows: int = 128  # tokens in the timed tensor (batch 1, seq 128: the shape benchmarks quote)
    rounds: int = 7  # interleaved timing rounds; the median of their ratios decides
    runs_per_round: int = 40


def _float_initializer(model, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            array = numpy_helper.to_array(init)
            return array if array.dtype == np.float32 else None
    return None


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def find_layernorm_sites(model) -> dict[str, list]:
    """The nodes the rewrite would touch: `SkipLayerNormalization` nodes with float32 gamma whose only
    extra output (if any) is the sum, and `Add` nodes whose single consumer is a float32
    LayerNormalization's input 0 (the pattern ORT's session-time SkipLayerNormFusion matches)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    producer = {out: node for node in model.graph.node for out in node.output}
    skips, adds = [], []
    for node in model.graph.node:
        if node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN:
            extra = list(node.output[1:3])  # mean, inv_std_var: a LayerNormalization has them too, but
            # at other output positions; such graphs are rare enough to be left as they are
            if any(extra) or len(node.input) < 3 or _float_initializer(model, node.input[2]) is None:
                continue
            skips.append(node)
        elif node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            add = producer.get(node.input[0])
            # an Add between DequantizeLinear nodes is a QDQ-quantized Add, for ORT's QLinearAdd: not ours
            dequantized = add is not None and any(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in add.input)
            if (add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and not dequantized
                    and len(consumers.get(add.output[0], [])) == 1 and add.output[0] not in graph_outputs
                    and len(node.input) > 1 and _float_initializer(model, node.input[1]) is not None):
                adds.append(add)
    return {"skip_layernorm": skips, "add": adds}


def _timing_models(hidden: int, rows: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(1, 0.1, hidden).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, hidden).astype(np.float32), "beta")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, hidden]) for n in ("x", "skip")]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, hidden])]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    fused = helper.make_graph([helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                                domain=MS_DOMAIN, epsilon=1e-12)], "fused", inputs, output, inits)
    unfused = helper.make_graph([helper.make_node("Sum", ["x", "skip"], ["s"]),
                                 helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1,
                                                  epsilon=1e-12)], "unfused", inputs, output, inits)
    return [onnx.helper.make_model(g, opset_imports=opsets) for g in (fused, unfused)]


def time_layernorm_forms(hidden: int, config: KernelChoiceConfig = KernelChoiceConfig()) -> dict[str, float]:
    """Median microseconds of the fused and the unfused form on this host (one thread, CPU time of the
    calling thread, the two interleaved round by round), and the median per-round ratio fused/unfused."""
    from dlopt.bench import InterleavedSampler
    from dlopt.sessions import cpu_session

    sessions = [cpu_session(m, threads=1) for m in _timing_models(hidden, config.rows)]
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((1, config.rows, hidden)).astype(np.float32) for n in ("x", "skip")}
    for session in sessions:
        for _ in range(5):
            session.run(None, feeds)
    runs = config.runs_per_round
    sampler = InterleavedSampler([lambda s=s: [s.run(None, feeds) for _ in range(runs)] for s in sessions])
    sampler.run_rounds(config.rounds)
    times = [sampler.samples(i, "cpu") / runs * 1e6 for i in range(2)]
    ratios = times[0] / np.maximum(times[1], 1e-9)
    return {"fused_us": float(np.median(times[0])), "unfused_us": float(np.median(times[1])),
            "ratio": float(np.median(ratios))}


def _rewrite(model, skips: list, adds: list) -> int:
    from onnx import helper

    from dlopt.optimize.preprocess import replace_nodes

    add_names = {id(n) for n in adds}
    skip_names = {id(n) for n in skips}
    nodes = []
    for node in model.graph.node:
        if id(node) in add_names:
            nodes.append(helper.make_node("Sum", list(node.input), list(node.output), name=node.name))
        elif id(node) in skip_names:
            # inputs: input, skip, gamma, beta?, bias?; output 3 (optional) is input + skip + bias
            x, skip, gamma = node.input[0], node.input[1], node.input[2]
            beta = node.input[3] if len(node.input) > 3 and node.input[3] else ""
            bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
            summed = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.output[0]}_skip_sum"
            epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
            nodes.append(helper.make_node("Sum", [x, skip] + ([bias] if bias else []), [summed],
                                          name=f"{node.name}_sum"))
            nodes.append(helper.make_node("LayerNormalization", [summed, gamma] + ([beta] if beta else []),
                                          [node.output[0]], name=node.name, axis=-1, epsilon=epsilon))
        else:
            nodes.append(node)
    replace_nodes(model.graph, nodes)
    return len(adds) + len(skips)


def choose_layernorm_form(model, config: KernelChoiceConfig = KernelChoiceConfig(), *,
                          timing: dict[str, float] | None = None) -> StageResult:
    """A copy of `model` with its residual sums written in the form that runs faster here (see the module
    docstring); `model` is not modified. `timing` (from time_layernorm_forms) skips the measurement."""
    import onnx

    sites = find_layernorm_sites(model)
    if _default_opset(model) < 17:  # a SkipLayerNormalization cannot become an ONNX LayerNormalization
        sites["skip_layernorm"] = []
    count = len(sites["skip_layernorm"]) + len(sites["add"])
    report: dict[str, Any] = {"config": config_to_dict(config), "sites": count, "rewritten": 0}
    if count == 0:
        report["decision"] = "nothing to choose: no residual sum feeds a float32 LayerNormalization"
        return StageResult(model, report)
    if config.layernorm == "fused":
        report["decision"] = "kept fused (asked)"
        return StageResult(model, report)
    if config.layernorm == "auto":
        gammas = [_float_initializer(model, n.input[2]) for n in sites["skip_layernorm"]]
        consumer_of = {n.input[0]: n for n in model.graph.node if n.op_type == "LayerNormalization"}
        gammas += [_float_initializer(model, consumer_of[a.output[0]].input[1]) for a in sites["add"]]
        hidden = int(np.bincount([g.size for g in gammas]).argmax())
        timing = timing or time_layernorm_forms(hidden, config)
        report["timing"] = {"hidden": hidden, "rows": config.rows, **{k: round(v, 3) for k, v in timing.items()}}
        if timing["ratio"] < config.min_gain:
            report["decision"] = (f"kept fused: SkipLayerNormalization {timing['fused_us']:.0f} us vs Sum + "
                                  f"LayerNormalization {timing['unfused_us']:.0f} us here "
                                  f"({timing['ratio']:.2f}x, below {config.min_gain}x)")
            return StageResult(model, report)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copied = find_layernorm_sites(copy)
    if _default_opset(copy) < 17:
        copied["skip_layernorm"] = []
    report["rewritten"] = _rewrite(copy, copied["skip_layernorm"], copied["add"])
    why = "asked" if config.layernorm == "unfused" else (
        f"ORT's SkipLayerNormalization measured {report['timing']['fused_us']:.0f} us here vs "
        f"{report['timing']['unfused_us']:.0f} us for Sum + LayerNormalization ({report['timing']['ratio']:.1f}x)")
    report["decision"] = (f"unfused: {report['rewritten']} residual sums written as Sum (+ LayerNormalization), "
                          f"which ORT does not fuse; {why}")
    return StageResult(copy, report)


__all__ = ["LAYERNORM_FORMS", "KernelChoiceConfig", "choose_layernorm_form", "find_layernorm_sites", "time_layernorm_forms"]
