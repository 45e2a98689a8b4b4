"""A static INT8 stem Conv's input channels padded with zeros to a multiple of 4, where that times faster here.

Why: ONNX Runtime runs a QDQ Conv with symmetric int8 weights through MLAS's symmetric convolution kernels
(the indirect-GEMM "ConvSym" path, with VNNI on AVX-512 VNNI / AVX-VNNI) only when its input channels are a
multiple of 4 (MlasConvSymPackWSize's KernelInputChannelAlignment). An RGB stem has 3, so it falls back to
im2col + QGEMM: EfficientNet-Lite0's stem [1, 3, 224, 224] -> [1, 32, 112, 112] took 0.45 ms of the INT8
model's 4.7 ms against 0.34 ms in FP32 (AMD EPYC Zen 4, one thread). Padded to 4 channels it takes 0.22 ms,
plus 0.02 ms for the Pad. The arithmetic is unchanged: the extra input channel is the input's zero point
(what a float 0.0 quantizes to exactly), and its weights are 0.

Only the Conv whose input is a graph input through QuantizeLinear -> DequantizeLinear used by nothing else,
and whose weights are int8 with zero points 0. The Pad goes between the QuantizeLinear and the
DequantizeLinear, on the 8-bit tensor, with the zero point as its constant: a float Pad before the
QuantizeLinear moved four times the bytes and quantized the extra channel too (Pad and QuantizeLinear
0.118 ms together there, 0.062 ms so, for [1, 3, 224, 224]). Whether the kernel path exists depends on the
CPU (MLAS has it for x86 AVX2 and up; on Arm it keeps such shallow convs on QGEMM), so the choice is timed,
whole model against whole model, through the decision store: cached per CPU model, recorded in the report
and replayable, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlopt.optimize.kernel_decisions import DecisionRule, DecisionStore
from dlopt.stage import StageResult

CHANNEL_ALIGNMENT = 4  # MLAS's symmetric conv kernels take input channels in groups of 4
MIN_OUTPUT_CHANNELS = 16  # ... and need at least one 16-channel output block

# (models, feeds) -> per model its microseconds per round, the models timed interleaved
Timer = Callable[[Sequence[Any], Sequence[Mapping[str, np.ndarray]]], list[Any]]


@dataclass(frozen=True, kw_only=True)
class ChannelPadConfig:
    min_gain: float = (
        1.03  # the padded model must be this much faster, its CI above 1x (as node forms' whole-model rule)
    )
    rounds: int = 15
    runs_per_round: int = 3
    atol: float = 1e-5  # padded vs unpadded outputs: the same integer arithmetic

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(margin=self.min_gain, rounds=self.rounds, runs_per_round=self.runs_per_round)


@dataclass(frozen=True)
class PadSite:
    conv: str  # the Conv node's name
    graph_input: str  # the float graph input it reads through QuantizeLinear -> DequantizeLinear
    channels: int  # input channels now
    weight: str  # the int8 weight initializer (DequantizeLinear's input 0)


def find_pad_sites(qdq_model) -> list[PadSite]:
    """Conv nodes (group 1, rank-4 weights) reading a rank-4 float graph input through Q -> DQ used by nothing
    else, with int8 weights whose zero points are all 0, input channels not a multiple of 4, output channels
    a multiple of 4 and >= 16 (what MLAS's symmetric kernels accept once padded)."""
    from onnx import TensorProto, numpy_helper

    graph = qdq_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    sites = []
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
            continue
        if any(a.name == "group" and a.i != 1 for a in conv.attribute):
            continue
        dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = producer.get(dq_x.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or q_x.input[0] not in inputs:
            continue
        if (
            len(consumers.get(q_x.input[0], [])) != 1
            or len(consumers.get(q_x.output[0], [])) != 1
            or len(consumers.get(dq_x.output[0], [])) != 1
        ):
            continue
        q_zero = inits.get(q_x.input[2]) if len(q_x.input) > 2 and q_x.input[2] else None
        if q_zero is None or int(np.prod(q_zero.dims)) != 1:  # the Pad's constant: one zero point for the tensor
            continue
        tensor_type = inputs[q_x.input[0]].type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
            continue
        weight = inits.get(dq_w.input[0])
        zero_point = inits.get(dq_w.input[2]) if len(dq_w.input) > 2 and dq_w.input[2] else None
        if weight is None or weight.data_type != TensorProto.INT8 or len(weight.dims) != 4:
            continue
        if zero_point is None or np.any(numpy_helper.to_array(zero_point) != 0):
            continue
        out_channels, channels = int(weight.dims[0]), int(weight.dims[1])
        if (
            channels % CHANNEL_ALIGNMENT == 0
            or out_channels < MIN_OUTPUT_CHANNELS
            or out_channels % CHANNEL_ALIGNMENT != 0
        ):
            continue
        sites.append(PadSite(conv.name, q_x.input[0], channels, weight.name))
    return sites


def pad_input_channels(qdq_model, sites: Sequence[PadSite]):
    """A copy of `qdq_model` with each site's quantized input padded with zero-point channels (a Pad between
    its QuantizeLinear and DequantizeLinear) and its int8 weights with zero input channels, to the next
    multiple of 4."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for site in sites:
        extra = -site.channels % CHANNEL_ALIGNMENT
        weight = numpy_helper.to_array(inits[site.weight])
        padded = np.concatenate([weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), np.int8)], axis=1)
        inits[site.weight].CopyFrom(numpy_helper.from_array(padded, site.weight))
        pads_name, value_name = f"{site.graph_input}_channel_pads", f"{site.graph_input}_channel_pad_value"
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), pads_name))
        quantize = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == site.graph_input)
        # find_pad_sites took only QuantizeLinears with an initializer zero point: a scalar of the 8-bit type
        zero_point = numpy_helper.to_array(inits[quantize.input[2]])
        graph.initializer.append(numpy_helper.from_array(zero_point.reshape(()), value_name))
        quantized = quantize.output[0]
        quantize.output[0] = f"{quantized}_unpadded"
        index = list(graph.node).index(quantize)
        graph.node.insert(
            index + 1,
            helper.make_node(
                "Pad",
                [quantize.output[0], pads_name, value_name],
                [quantized],
                name=f"{site.conv}_input_channel_pad",
                mode="constant",
            ),
        )
    return model


# What "padded" builds (pad_input_channels), in the decision's signature: a cached or replayed decision timed
# on another form of the padding is not reused for this one. Revision 2 pads the 8-bit tensor between
# QuantizeLinear and DequantizeLinear with the zero point (1 padded the float input: 0.118 ms against 0.062 ms
# on EfficientNet-Lite0's prologue, so its decisions understate the padded form).
PADDED_FORM = "Pad of the 8-bit tensor, zero point as its constant (revision 2)"


def _signature(qdq_model, sites: Sequence[PadSite]) -> dict[str, Any]:
    """What the decision is about, without names or bytes: each site's conv shape and attributes, and the
    padded form (PADDED_FORM)."""
    inits = {t.name: t for t in qdq_model.graph.initializer}
    nodes = {n.name: n for n in qdq_model.graph.node}
    described = []
    for site in sites:
        attributes = {a.name: list(a.ints) if a.ints else a.i for a in nodes[site.conv].attribute}
        input_shape = next(
            [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in qdq_model.graph.input
            if i.name == site.graph_input
        )
        described.append({"weight": list(inits[site.weight].dims), "input": input_shape, "attributes": attributes})
    return {
        "sites": sorted(described, key=repr),
        "ops": sorted({n.op_type for n in qdq_model.graph.node}),
        "padded_form": PADDED_FORM,
    }


def choose_channel_padding(
    qdq_model,
    feeds: Mapping[str, np.ndarray],
    config: ChannelPadConfig = ChannelPadConfig(),
    *,
    timer: Timer | None = None,
    store: DecisionStore | None = None,
) -> StageResult:
    """`qdq_model`, or its stem Convs padded to 4 input channels where that times faster here (whole model
    against whole model, `config.rule`, through `store`: timed, cached or replayed). The padded model must
    give the same outputs on `feeds` (within config.atol), else it is not used. The report says what was
    found, the decision with its figures, and why."""
    from dlopt.optimize.kernel_choice import time_models
    from dlopt.sessions import cpu_session, run_outputs

    sites = find_pad_sites(qdq_model)
    report: dict[str, Any] = {"sites": [vars(s) for s in sites], "applied": False, "decisions": []}
    if not sites:
        report["decision"] = "nothing to pad: no INT8 stem Conv with input channels off a multiple of 4"
        return StageResult(qdq_model, report)
    padded = pad_input_channels(qdq_model, sites)
    before = run_outputs(cpu_session(qdq_model), [dict(feeds)])[0]
    after = run_outputs(cpu_session(padded), [dict(feeds)])[0]
    diff = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(before, after)
    )
    report["max_abs_diff"] = diff
    if not diff <= config.atol:
        report["decision"] = f"not padded: outputs differ by {diff:.3g} (> {config.atol:g})"
        return StageResult(qdq_model, report)
    timer = timer or (lambda m, f: time_models(m, f, rounds=config.rounds, runs_per_round=config.runs_per_round))

    def measure():
        as_is_us, padded_us = timer([qdq_model, padded], [feeds, feeds])
        return as_is_us, padded_us

    store = store or DecisionStore()
    record = store.decide(
        f"stem conv input channels: as they are or padded to {CHANNEL_ALIGNMENT}",
        _signature(qdq_model, sites),
        config.rule,
        default="as is",
        alternative="padded",
        measure=measure,
    )
    report["decisions"].append(record)
    figures = record.get("figures") or {}
    gain = figures.get("speedup")
    what = ", ".join(
        f"{s.conv} ({s.channels} -> {s.channels + -s.channels % CHANNEL_ALIGNMENT} channels)" for s in sites
    )
    timing = (
        f"whole model {gain:.2f}x (CI {figures['ci'][0]:.2f}-{figures['ci'][1]:.2f}), decision {record['source']}"
        if figures and gain is not None
        else record.get("why", record["source"])
    )
    if record["choice"] != "padded":
        report["decision"] = f"not padded: {what}; {timing}; needs {config.min_gain}x with the CI above 1x"
        return StageResult(qdq_model, report)
    report["applied"] = True
    report["decision"] = f"padded {what} for ORT's symmetric int8 conv kernel: {timing}"
    return StageResult(padded, report)


def summary_line(report: Mapping[str, Any] | None) -> str | None:
    if not report or not report.get("sites"):
        return None
    return f"stem channel padding: {report['decision']}"


__all__ = [
    "CHANNEL_ALIGNMENT",
    "ChannelPadConfig",
    "PadSite",
    "choose_channel_padding",
    "find_pad_sites",
    "pad_input_channels",
    "summary_line",
]
