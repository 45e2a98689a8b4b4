"""Channel ranges equalized through hard-swish before static INT8: Conv -> hard-swish -> depthwise Conv.

Why: static INT8 quantizes each activation with one scale for all its channels (ORT's QLinearConv takes a
scalar input scale). In BatchNorm-folded mobile backbones the channels of one tensor differ by orders of
magnitude: the input of PP-PicoDet layout's third depthwise conv spans 0.14 to 109 by channel (median 3.7),
so at a per-tensor u8 scale of ~0.3 its small channels round to nothing; that node alone took the detector's
output SQNR to 3 dB. Cross-layer equalization (Nagel et al. 2019) rescales channels between two convs, but
only through a positively homogeneous activation (ReLU); hard-swish is not one. It becomes exact again with
one float Mul: for per-channel s > 0,

    x = hswish(y) = y * hardsigmoid(y)   with y' = y / s:   x / s = y' * hardsigmoid(y' * s)

so the producer Conv's output channels are divided by s (its weights and bias rows), hard-swish reads
y' * s, and the depthwise Conv's filters are multiplied by s (one input channel each, so exact). Both
quantized tensors, y' and x / s, then have every channel at the range of the widest, and per-channel weight
quantization absorbs the scaled filters of both convs at no cost. The extra Mul runs in float inside the
hard-swish that static INT8 leaves in float anyway (ORT has no int8 HardSigmoid / HardSwish kernel).

s_c = absmax(y_c) / max_c absmax(y_c) over the data (|x| <= |y|, so no channel of x / s exceeds the widest
either), at least 1 / MAX_GAIN; channels that never leave 0 keep s = 1. Applied only where the channel
ranges spread more than MIN_SPREAD, and checked: the rewritten float graph must give the unchanged graph's
outputs on the data (dlopt.optimize.preprocess.run_checked_steps), else it is not used and the report says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dlopt.stage import StageResult, config_to_dict

MAX_GAIN = 64.0  # a channel is scaled up at most this much (s >= 1/64)
MIN_SPREAD = 2.0  # widest / median channel range below which a site is left alone


@dataclass(frozen=True, kw_only=True)
class EqualizeHardSwish:
    VERSION: ClassVar[int] = 1
    samples: int = 8  # data samples the channel ranges are measured on
    check_samples: int = 4
    atol: float = 1e-3  # rescaled float arithmetic rounds differently
    rtol: float = 1e-3
    input_shapes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Site:
    producer: str  # Conv whose output y feeds only the hard-swish
    activation: str  # y
    hardswish: tuple[str, ...]  # HardSigmoid + Mul node names, or the HardSwish node
    consumer: str  # the depthwise Conv reading hard-swish's output only
    channels: int


def _attr(node, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == 1 else a.i
    return default


def find_sites(model) -> list[Site]:
    """Conv (constant 4-D weights, optional constant bias) -> hard-swish (HardSwish, or HardSigmoid(1/6, 0.5)
    with the Mul of y by it) -> depthwise Conv (group = channels, [C, 1, k, k] constant weights), each tensor
    used by nothing else and no graph output."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    dims = {t.name: list(t.dims) for t in graph.initializer}

    def only(name: str, op_type: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type and name not in outputs else None

    sites = []
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        if len(dims[conv.input[1]]) != 4 or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        y = conv.output[0]
        users = consumers.get(y, [])
        if y in outputs or not users:
            continue
        x: str | None = None
        names: tuple[str, ...] = ()
        if len(users) == 1 and users[0].op_type == "HardSwish":
            x, names = users[0].output[0], (users[0].name,)
        elif len(users) == 2 and {u.op_type for u in users} == {"HardSigmoid", "Mul"}:
            hs = next(u for u in users if u.op_type == "HardSigmoid")
            mul = next(u for u in users if u.op_type == "Mul")
            if (
                abs(_attr(hs, "alpha", 0.2) - 1 / 6) < 1e-5
                and abs(_attr(hs, "beta", 0.5) - 0.5) < 1e-6
                and sorted(mul.input) == sorted([y, hs.output[0]])
                and hs.output[0] not in outputs
                and len(consumers.get(hs.output[0], [])) == 1
            ):
                x, names = mul.output[0], (hs.name, mul.name)
        if x is None:
            continue
        depthwise = only(x, "Conv")
        channels = dims[conv.input[1]][0]
        if depthwise is None or depthwise.input[0] != x or depthwise.input[1] not in inits:
            continue
        if _attr(depthwise, "group", 1) != channels or dims[depthwise.input[1]][:2] != [channels, 1]:
            continue
        sites.append(Site(conv.name, y, names, depthwise.name, channels))
    return sites


def channel_ranges(model, sites: list[Site], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """absmax per channel of each site's activation y over `feeds` (the float model, basic optimizations)."""
    import onnx

    from dlopt.sessions import cpu_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for s in sites:
        if s.activation not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(s.activation, onnx.TensorProto.FLOAT, None))
    session = cpu_session(probe, graph_opt_level="basic")
    names = [s.activation for s in sites]
    ranges = {n: np.zeros(s.channels) for n, s in zip(names, sites)}
    for f in feeds:
        for name, value in zip(names, session.run(names, dict(f))):
            ranges[name] = np.maximum(
                ranges[name], np.abs(value).reshape(value.shape[0], value.shape[1], -1).max(axis=(0, 2))
            )
    return ranges


def scales(absmax: np.ndarray) -> np.ndarray | None:
    """Per-channel s (see the module doc), or None where the channel ranges spread less than MIN_SPREAD."""
    live = absmax > absmax.max() * 1e-6
    if not live.any() or absmax.max() / max(float(np.median(absmax[live])), 1e-12) < MIN_SPREAD:
        return None
    s = np.where(live, np.maximum(absmax / absmax.max(), 1 / MAX_GAIN), 1.0)
    return s.astype(np.float32)


def _rewrite(model, sites: list[Site], site_scales: Mapping[str, np.ndarray]):
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    for site in sites:
        s = site_scales.get(site.activation)
        if s is None:
            continue
        producer, consumer = nodes[site.producer], nodes[site.consumer]

        def scaled(name: str, factor: np.ndarray, shape: tuple[int, ...], owner: str = site.producer) -> str:
            # a weight shared with another node gets its own rescaled copy
            value = numpy_helper.to_array(inits[name]) * factor.reshape(shape)
            new = name if users.get(name, 0) == 1 else f"{name}_equalized_{owner}"
            tensor = numpy_helper.from_array(value.astype(np.float32), new)
            if new == name:
                inits[name].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            return new

        producer.input[1] = scaled(producer.input[1], 1 / s, (-1, 1, 1, 1))
        if len(producer.input) > 2 and producer.input[2]:
            producer.input[2] = scaled(producer.input[2], 1 / s, (-1,))
        consumer.input[1] = scaled(consumer.input[1], s, (-1, 1, 1, 1))
        scale_name, restored = f"{site.activation}_channel_scale", f"{site.activation}_restored"
        graph.initializer.append(numpy_helper.from_array(s.reshape(1, -1, 1, 1), scale_name))
        first = nodes[site.hardswish[0]]
        first.input[0] = restored  # HardSwish / HardSigmoid read y' * s = y; the Mul keeps y'
        graph.node.insert(
            list(graph.node).index(first),
            helper.make_node("Mul", [site.activation, scale_name], [restored], name=f"{site.producer}_channel_scale"),
        )
        if len(site.hardswish) == 1:  # HardSwish(y) = x: x / s follows it
            hswish = nodes[site.hardswish[0]]
            x, divided = hswish.output[0], f"{hswish.output[0]}_equalized"
            hswish.output[0] = f"{x}_unscaled"
            inverse = f"{site.activation}_channel_inverse"
            graph.initializer.append(numpy_helper.from_array((1 / s).reshape(1, -1, 1, 1), inverse))
            graph.node.insert(
                list(graph.node).index(hswish) + 1,
                helper.make_node(
                    "Mul", [hswish.output[0], inverse], [divided], name=f"{site.consumer}_channel_inverse"
                ),
            )
            consumer.input[0] = divided
    return out


def equalize_hardswish(
    model, config: EqualizeHardSwish = EqualizeHardSwish(), data: Iterable[Mapping[str, np.ndarray]] | None = None
) -> StageResult:
    """`model` with the channel ranges of each Conv -> hard-swish -> depthwise Conv site equalized (module
    doc), checked against `model` on the data. The report: sites found, rescaled, their spread, the check."""
    from dlopt.optimize.preprocess import check_feeds, run_checked_steps
    from dlopt.sessions import cpu_session, run_outputs

    report: dict[str, Any] = {"config": config_to_dict(config), "sites": 0, "rescaled": 0, "steps": []}
    sites = find_sites(model)
    report["sites"] = len(sites)
    if not sites:
        return StageResult(model, report)
    feeds = check_feeds(model, data, max(config.samples, config.check_samples), config.input_shapes)
    ranges = channel_ranges(model, sites, feeds[: config.samples])
    site_scales = {}
    spreads = []
    for site in sites:
        absmax = ranges[site.activation]
        s = scales(absmax)
        live = absmax[absmax > absmax.max() * 1e-6]
        spreads.append(float(absmax.max() / max(float(np.median(live)), 1e-12)) if live.size else 0.0)
        if s is not None:
            site_scales[site.activation] = s
    report["rescaled"] = len(site_scales)
    report["spread_max_over_median"] = {"max": round(max(spreads), 2), "median": round(float(np.median(spreads)), 2)}
    if not site_scales:
        return StageResult(model, report)
    check = feeds[: config.check_samples]
    reference = run_outputs(cpu_session(model, graph_opt_level="basic"), check)

    def step(current, _config):
        return _rewrite(current, sites, site_scales), {"sites": len(site_scales)}

    result, report["steps"] = run_checked_steps(
        model, [("equalize_hardswish", step)], config, check, reference, config.atol, config.rtol
    )
    if result is model:
        report["rescaled"] = 0
    return StageResult(result, report)


def summary_line(report: Mapping[str, Any] | None) -> str | None:
    if not report or not report.get("sites"):
        return None
    step = next(iter(report.get("steps") or []), None)
    if report["rescaled"]:
        spread = report["spread_max_over_median"]
        return (
            f"channel equalization through hard-swish: {report['rescaled']} of {report['sites']} Conv -> hard-swish "
            f"-> depthwise site(s) rescaled (widest/median channel range up to {spread['max']:g}x; "
            f"max abs diff {(step or {}).get('max_abs_diff', 0):.2g})"
        )
    why = step.get("reason") if step else f"channel ranges within {MIN_SPREAD:g}x"
    return f"channel equalization through hard-swish: {report['sites']} site(s), none rescaled ({why})"


__all__ = ["EqualizeHardSwish", "MAX_GAIN", "MIN_SPREAD", "Site", "equalize_hardswish", "find_sites", "summary_line"]
