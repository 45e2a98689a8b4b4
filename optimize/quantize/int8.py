"""INT8 with ORT's quantizers, following a recipe; float nodes shielded from ORT's session-time quantization."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.data import CalibrationData
from dlopt.errors import InputError
from dlopt.optimize.preprocess import replace_nodes
from dlopt.optimize.quantize.calibrate import calibrate, ort_calibration_method, ort_quant_type
from dlopt.optimize.quantize.int8_recipe import Int8Recipe
from dlopt.optimize.quantize.schemes import Int8Scheme, Int8Static
from dlopt.optimize.quantize_scheme import QuantizeScheme, check_excluded_nodes
from dlopt.optimize.rounding import LayerStatistics, collect_layer_statistics, refine_weights
from dlopt.quiet import quiet_libraries


# -- INT8 -------------------------------------------------------------------------------------------------
def default_op_types(recipe: Int8Recipe) -> set[str]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    from dlopt.graphfacts import WEIGHT_INPUTS

    if recipe.mode == "weight-only":
        return set(WEIGHT_INPUTS)
    return set(IntegerOpsRegistry if recipe.mode == "dynamic" else QDQRegistry)


def _depthwise_weights(model, skip: Collection[str] = frozenset()) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return sorted(
        n.input[1]
        for n in model.graph.node
        if n.op_type == "Conv"
        and n.input[1] in inits
        and n.name not in skip
        and any(a.name == "group" and a.i > 1 for a in n.attribute)
    )


def check_exclusions(model, config: QuantizeScheme) -> None:
    from dlopt.optimize.normalize import all_graphs

    names = {n.name for g in all_graphs(model.graph) for n in g.node}  # ORT's quantizers exclude in subgraphs too
    check_excluded_nodes(config.exclude_nodes, names)


def quantize_int8(
    model,
    config: Int8Scheme,
    recipe: Int8Recipe,
    data: CalibrationData | None = None,
    *,
    exclude_nodes: Iterable[str] = (),
    progress: bool = False,
    ranges=None,
    layer_stats: LayerStatistics | None = None,
):
    """INT8 with ORT's quantizers following `recipe`; returns (model, details). `ranges` and
    `layer_stats` reuse a calibration (TensorsData) and the weight-rounding statistics across the
    candidates of a budget search (both are returned in details)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from dlopt.graphfacts import WEIGHT_INPUTS
    from dlopt.optimize.normalize import topological_sort
    from dlopt.optimize.weight_only import WeightOnlyConfig, quantize_weights_int8

    op_types = sorted(default_op_types(recipe) - set(config.exclude_ops))
    excluded = sorted(set(config.exclude_nodes) | set(exclude_nodes))
    details: dict[str, Any] = {"op_types_to_quantize": op_types, "nodes_excluded": excluded}
    weight_only = WeightOnlyConfig(
        per_channel=recipe.per_channel,
        exclude_nodes=tuple(excluded),
        op_types=tuple(sorted(set(WEIGHT_INPUTS) - set(config.exclude_ops))),
    )
    if recipe.mode == "weight-only":
        result = quantize_weights_int8(model, weight_only)
        details.update(weight_only=result.report, ranges=ranges, layer_stats=layer_stats)
        return result.model, details
    with tempfile.TemporaryDirectory(prefix="dlopt-quant-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        common = dict(
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=ort_quant_type(recipe.weight_type),
            nodes_to_exclude=excluded,
            op_types_to_quantize=op_types,
        )
        with quiet_libraries():  # its "run pre-processing" advice: preprocess() did
            if recipe.mode == "dynamic":
                # EnableSubgraph: If/Loop/Scan bodies are quantized too (ORT's QOperator quantizer only)
                quantize_dynamic(
                    model,
                    str(out),
                    extra_options={
                        "DefaultTensorType": onnx.TensorProto.FLOAT,
                        "MatMulConstBOnly": True,
                        "EnableSubgraph": True,
                    },
                    **common,
                )
            else:
                if ranges is None:
                    from dlopt.optimize.quantize.int8_recipe import compute_only_in_subgraphs

                    if compute_only_in_subgraphs(model):  # ORT's calibrator would find no tensor and crash
                        raise InputError(
                            "static INT8 reaches none of this model's layers: they all lie inside "
                            "If/Loop/Scan branches, which static QDQ does not quantize",
                            "use {mode=dynamic}: dynamic INT8 quantizes the layers inside branches",
                        )
                    if data is None:
                        raise InputError(
                            "static quantization needs calibration data",
                            "pass {calibration=DATA} (an .npz, a folder, or model:NAME) or use {mode=dynamic}",
                        )
                    # Concat too: its inputs' ranges find outputs that join tensors of very different ranges
                    ranges, _ = calibrate(
                        model,
                        data,
                        method=recipe.method,
                        op_types=sorted({*op_types, "Concat"}),
                        symmetric=recipe.activation_type == "s8",
                        percentile=recipe.percentile,
                        progress=progress,
                    )
                mixed = mixed_range_outputs(model, ranges, skip=set(excluded))
                if mixed:
                    details["mixed_range_outputs"] = mixed
                    excluded = sorted(set(excluded) | {n for m in mixed for n in m["kept_float"]})
                    common["nodes_to_exclude"] = excluded
                cache = Path(tmp) / "ranges.json"
                save_tensors_data(ranges, cache)
                overrides = {}
                if recipe.reduce_range:
                    # Depthwise convolutions run on MLAS's direct kernel, which accumulates in 32 bits:
                    # the 16-bit pair saturation that reduce_range guards against cannot happen there,
                    # so their weights keep all 8 bits (EfficientNet-Lite0: logit SQNR 12.5 -> 13.9 dB).
                    overrides = {
                        w: [
                            {
                                "quant_type": ort_quant_type(recipe.weight_type),
                                "symmetric": True,
                                "reduce_range": False,
                                "axis": 0,
                            }
                        ]
                        for w in _depthwise_weights(model, skip=set(excluded))
                    }
                    details["full_range_depthwise_weights"] = len(overrides)
                quantize_static(
                    model,
                    str(out),
                    calibration_data_reader=None,
                    calibration_cache_path=str(cache),
                    quant_format=QuantFormat.QDQ,
                    activation_type=ort_quant_type(recipe.activation_type),
                    calibrate_method=ort_calibration_method(recipe.method),
                    extra_options={
                        "ActivationSymmetric": recipe.activation_type == "s8",
                        "WeightSymmetric": True,
                        "DefaultTensorType": onnx.TensorProto.FLOAT,
                        **({"TensorQuantOverrides": overrides} if overrides else {}),
                    },
                    **common,
                )
        quantized = onnx.load_model(str(out))
    topological_sort(quantized.graph)  # ORT appends outer quantize nodes after the If/Loop reading them
    # What ORT's quantizers leave float: GRU/RNN (no integer kernel), LSTM where DynamicQuantizeLSTM did not
    # apply, and, in static QDQ (whose quantizer does not enter subgraphs), every weight inside If/Loop/Scan
    # bodies: their weights become int8 with a DequantizeLinear in front (weight-only).
    leftovers = quantize_weights_int8(quantized, dataclasses.replace(weight_only, scope="leftovers"))
    if leftovers.report["weights"]:
        quantized = leftovers.model
        details["weight_only"] = leftovers.report
    if recipe.mode == "dynamic" and recipe.token_scales:
        from dlopt.optimize.quantize.token_scales import per_token_scales

        quantized, details["token_scales"] = per_token_scales(quantized)
    if recipe.mode == "static":
        details["float_nodes_shielded"] = shield_float_nodes(quantized, excluded + _excluded_by_op(quantized, config))
    if recipe.mode == "static" and (recipe.weight_rounding == "gptq" or recipe.bias_correction):
        if layer_stats is None:
            if data is None:
                raise InputError(
                    "GPTQ weight rounding and bias correction need calibration data",
                    "pass {calibration=DATA}, or use {weight_rounding=nearest} without bias correction",
                )
            static = config if isinstance(config, Int8Static) else Int8Static()  # its rounding fields: static only
            layer_stats = collect_layer_statistics(model, data, samples=static.rounding_samples, progress=progress)
        full = set(_depthwise_weights(model)) if recipe.reduce_range else set()
        details["weight_refinement"] = refine_weights(
            quantized,
            model,
            layer_stats,
            rounding=recipe.weight_rounding,
            bias_correction=recipe.bias_correction,
            full_range=full,
            reduce_range=recipe.reduce_range,
        )
    details["ranges"] = ranges
    details["layer_stats"] = layer_stats
    return quantized, details


# -- outputs that concatenate tensors of very different ranges -------------------------------------------
# A YOLO-family head ends in Concat(boxes in pixels, 0..1024; class scores from a Sigmoid, 0..1) -> [1, 4+C, N].
# A quantizer that quantizes that Concat, or a layout op after it (Reshape, Transpose, Split...), gives the
# joined tensor ONE per-tensor scale sized for the boxes: a step of 1024/255 = 4 flattens every score. The
# Concat and the layout ops between it and the graph output stay float, so each input keeps its own scale
# (QDQ has no per-channel activation scale that ORT's CPU kernels run, and splitting the output would
# change the user's interface). They are data movement: float costs nothing measurable.
# A float tail for the score branch (its last 1x1 convs, reshapes, Sigmoid) was measured and left out:
# YOLOv8n-DocLayNet's score rows went 18.7 -> 18.9 dB (their noise comes from earlier layers), detection
# agreement stayed 0.98, and the model ran 0.543x FP32 instead of 0.512x (AMD EPYC Zen 4, one thread).
MIXED_RANGE_RATIO = 50.0
# between the joining Concat and the graph output: layout only (YOLOX joins its levels in a second Concat)
_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split", "Concat")


def _width(ranges, name: str) -> float | None:
    """The calibrated range's width, zero included (as ORT's quantizer widens it): the step is width/255."""
    try:
        low, high = ranges[name].range_value
    except (KeyError, AttributeError, TypeError, ValueError):
        return None
    return float(max(np.max(high), 0.0) - min(np.min(low), 0.0))


def mixed_range_outputs(
    model, ranges, *, ratio: float = MIXED_RANGE_RATIO, skip: Collection[str] = frozenset()
) -> list[dict[str, Any]]:
    """Concat nodes that feed graph outputs (directly or through Reshape/Transpose/Squeeze/Unsqueeze/
    Flatten/Identity/Split/Concat only) and whose inputs' calibrated range widths differ by more than
    `ratio`. Each comes with the nodes to keep float (the Concat and the layout ops after it) and why."""
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "Concat" or node.name in skip or not node.name:
            continue
        widths = {name: _width(ranges, name) for name in node.input if name}
        known = {k: v for k, v in widths.items() if v is not None and v > 0}
        if len(known) < 2 or max(known.values()) < ratio * min(known.values()):
            continue
        after, reached, frontier, clean = [], [], list(node.output), True
        while frontier and clean:
            tensor = frontier.pop()
            if tensor in outputs:
                reached.append(tensor)
            for user in consumers.get(tensor, []):
                if user.op_type not in _LAYOUT_OPS or not user.name:
                    clean = False
                    break
                after.append(user.name)
                frontier.extend(user.output)
        if not clean or not reached:
            continue
        big, small = max(known, key=lambda k: known[k]), min(known, key=lambda k: known[k])
        apart = known[big] / known[small]
        kept = list(dict.fromkeys([node.name, *after]))
        found.append(
            {
                "node": node.name,
                "outputs": sorted(reached),
                "kept_float": kept,
                "narrow_inputs": [name for name, width in known.items() if width * ratio <= known[big]],
                "input_range_widths": {k: round(v, 6) for k, v in known.items()},
                "ratio": round(apart, 1),
                "why": (
                    f"{node.name} joins {big} (range width {known[big]:.4g}) and {small} (width "
                    f"{known[small]:.4g}), {apart:.0f}x apart, into graph output {', '.join(sorted(reached))}: "
                    f"one scale for both would leave {small} {apart / 255:.2g} of its range per step, so "
                    + (f"the Concat and the {len(after)} layout node(s) after it stay" if after else "the Concat stays")
                    + " float and each input keeps its own scale"
                ),
            }
        )
    return found


# ORT's session-time WeightBiasQuantization (every optimization level, even basic; ORT 1.32 here) quantizes a float
# Conv / ConvTranspose / Gemm whose input 0 comes from a per-tensor DequantizeLinear and whose output reaches
# a QuantizeLinear (through Relu/Clip at most): exactly what a node excluded from a QDQ graph looks like.
# It does so with per-tensor weights, so an excluded node ran in int8 anyway, and worse than the per-channel
# int8 it was excluded from (EfficientNet-Lite0 with its depthwise convs "kept float": 5.3 dB logit SQNR,
# against 10.7 dB all int8 and 35.5 dB at the excluded layer in the graph's own arithmetic). Its pattern
# needs a per-tensor input scale: a dedicated DequantizeLinear with the same scale repeated per channel
# computes the same numbers and keeps the node float.
_SHIELDED_OPS = ("Conv", "ConvTranspose", "Gemm")


def _excluded_by_op(model, config: QuantizeScheme) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in config.exclude_ops]


def shield_float_nodes(model, names: Iterable[str]) -> list[str]:
    """Give each named float Conv/ConvTranspose/Gemm fed by a per-tensor DequantizeLinear its own
    per-channel DequantizeLinear (same scale and zero point on every channel), in place; returns the
    names of the nodes shielded. See the comment above for why."""
    from onnx import helper, numpy_helper

    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    shielded, new_nodes = [], []
    for node in model.graph.node:
        if node.name not in wanted or node.op_type not in _SHIELDED_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        weight = inits.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None or dq.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = list(weight.dims)
        if node.op_type == "Conv":
            axis, channels = 1, dims[1] * int(attrs.get("group", 1))
        elif node.op_type == "ConvTranspose":
            axis, channels = 1, dims[0]
        else:  # Gemm: A is [M, K], or [K, M] with transA
            axis = 0 if attrs.get("transA", 0) else 1
            channels = dims[1] if attrs.get("transB", 0) else dims[0]
        if channels < 2:  # a one-element scale vector is a scalar to ORT's pattern
            continue
        prefix = f"{node.name}_float_input"
        inputs = [dq.input[0], f"{prefix}_scale"]
        model.graph.initializer.append(
            numpy_helper.from_array(np.full(channels, scale.reshape(-1)[0], dtype=scale.dtype), inputs[1])
        )
        if len(dq.input) > 2 and dq.input[2] in inits:
            zero = numpy_helper.to_array(inits[dq.input[2]])
            inputs.append(f"{prefix}_zero_point")
            model.graph.initializer.append(
                numpy_helper.from_array(np.full(channels, zero.reshape(-1)[0], dtype=zero.dtype), inputs[2])
            )
        new_nodes.append(
            (
                node,
                helper.make_node(
                    "DequantizeLinear", inputs, [f"{prefix}_dequantized"], name=f"{prefix}_DequantizeLinear", axis=axis
                ),
            )
        )
        node.input[0] = f"{prefix}_dequantized"
        shielded.append(node.name)
    if new_nodes:  # each new DequantizeLinear just before its node keeps the graph in topological order
        before = {id(consumer): dq_node for consumer, dq_node in new_nodes}
        ordered = []
        for node in model.graph.node:
            if id(node) in before:
                ordered.append(before[id(node)])
            ordered.append(node)
        replace_nodes(model.graph, ordered)
    return shielded
