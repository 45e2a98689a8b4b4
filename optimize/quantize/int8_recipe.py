"""The INT8 recipe: the scheme a `quantize` request resolves to (choose_mode) and, for a scheme, the
formats, types, calibration and weight rounding for this model, target and CPU, each with its reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dlopt.graphfacts import looks_like_transformer
from dlopt.optimize.fp16 import Fp16
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.quantize.schemes import (
    INT8_SCHEMES,
    Int8Mode,
    Int8Scheme,
    Int8Static,
    Method,
    QuantizeConfig,
    Scheme,
    validate_config,
)
from dlopt.targets.cpu import HostCpu, host_cpu


# -- the CPU and the recipe ---------------------------------------------------------------------------
# The CPU is dlopt.targets.cpu's HostCpu (host_cpu(): this one, from the one /proc/cpuinfo reader).
def cpu_record(cpu: HostCpu) -> dict[str, Any]:
    """The CPU facts the INT8 recipe reads, as its report records them: the machine, whether it has an int8
    dot product (VNNI/AMX on x86, asimddp on ARM) and its ISA flags."""
    return {"machine": cpu.machine, "vnni": cpu.int8_dot, "flags": cpu.isa_flags}


def resolve_scheme(request: QuantizeConfig, model, *, has_data: bool) -> tuple[Scheme, tuple[str, ...]]:
    """The scheme config a `quantize` request asks for on `model`, and why (int8 mode auto: see choose_mode)."""
    validate_config(request)
    cls: type
    if request.precision == "int8":
        mode, reason = choose_mode(model, request, has_data=has_data)
        cls, reasons = INT8_SCHEMES[mode], (reason,)
    else:
        cls = Int4WeightOnly if request.precision == "int4" else Fp16
        reasons = (f"{request.precision}: asked for",)
    # The request holds every scheme's fields under the same names: each scheme takes its own.
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(cls) if hasattr(request, f.name)}
    return cls(**fields), reasons


@dataclass(frozen=True, kw_only=True)
class Int8Recipe:
    mode: Int8Mode
    quant_format: Literal["QOperator", "QDQ"]
    activation_type: Literal["u8", "s8", "float"]  # float: weight-only, activations are not quantized
    weight_type: Literal["u8", "s8"]
    per_channel: bool
    reduce_range: bool
    method: Method
    fuse_transformer: bool
    smoothing: float | None = None
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    bias_correction: bool = False
    percentile: float = 99.999
    token_scales: bool = False  # dynamic: per-token activation scales on GELU outputs (optimize.quantize.token_scales)
    reasons: tuple[str, ...] = ()


def _int8_form(target: str):
    """The INT8 form target `target` declares (dlopt.targets); InputError when it takes no INT8 model."""
    from dlopt.errors import InputError
    from dlopt.targets import capabilities

    form = capabilities(target).int8
    if form is None:
        raise InputError(f"target {target!r} takes no INT8 model", "quantize for another target")
    return form


def _model_kind(model) -> tuple[bool, set[str], str]:
    from dlopt.optimize.normalize import all_graphs

    transformer = looks_like_transformer(model)
    ops = {n.op_type for g in all_graphs(model.graph) for n in g.node}
    convs = ops & {"Conv", "ConvTranspose"}
    return transformer, convs, "transformer" if transformer else ("CNN" if convs else "MLP/other")


# layers whose weights make a model's size and cost: where they sit decides what static QDQ can reach
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention"})


def compute_only_in_subgraphs(model) -> bool:
    """The model's weighted layers all lie inside If/Loop/Scan branches (e.g. Silero VAD's 8/16 kHz If):
    static QDQ calibrates and quantizes the main graph only, ORT's dynamic quantizer also the branches."""
    from dlopt.optimize.normalize import subgraph_nodes

    return not any(n.op_type in COMPUTE_OPS for n in model.graph.node) and bool(subgraph_nodes(model, COMPUTE_OPS))


def choose_mode(model, config: QuantizeConfig, *, has_data: bool = True) -> tuple[str, str]:
    """The INT8 scheme (dynamic, static, weight-only) for a `quantize` request on this model and target,
    with the reason: the request's mode unless it is auto."""
    transformer, convs, kind = _model_kind(model)
    if config.mode != "auto":
        return config.mode, f"mode {config.mode}: asked for"
    form = _int8_form(config.target)
    from dlopt.graphfacts import recurrent_pairs

    state = recurrent_pairs(model)
    if state:
        return "weight-only", (
            f"weight-only: the model is stateful ({', '.join(f'{o} -> {i}' for i, o in state)} is fed back each "
            "call): activation quantization noise re-enters through the state on every call and accumulates, "
            "weight rounding does not (Silero VAD over 3 s streamed: max |dp| 0.99 dynamic, 0.95 static QDQ, "
            "0.03-0.05 weight-only); weights int8, compute float, no speedup (--mode static|dynamic to try)"
        )
    static_only = f"the {config.target} target runs static QDQ, not dynamic quantization ({form.note})"
    if not has_data and (not form.dynamic or (convs and not transformer)):
        needs = (
            f"{static_only}, and static INT8"
            if not form.dynamic
            else f"static INT8 for this {kind} ({', '.join(sorted(convs))})"
        )
        return "weight-only", (
            f"weight-only: {needs} needs calibration data to set activation ranges (pass "
            "--calibration DATA: an .npz, a folder, or model:NAME); without it the weights are "
            "stored int8 and dequantized to float before each op: ~4x smaller weights, float "
            "compute, no speedup (ONNX Runtime runs each DequantizeLinear per call unless the "
            "session sets session.disable_quant_qdq=1)"
        )
    if not has_data and not transformer:
        return "dynamic", (
            f"dynamic: no calibration data, and this {kind} model's MatMul/Gemm layers need none: "
            "activations are quantized per call (--calibration DATA allows static QDQ)"
        )
    if not form.dynamic:
        return "static", f"static QDQ: {static_only}"
    if transformer:
        return "dynamic", (
            "dynamic: transformer activations vary per token and per input; per-call ranges beat "
            "calibrated ones (ORT static QDQ loses ~0.2 cosine on MiniLM)"
        )
    if compute_only_in_subgraphs(model):
        return "dynamic", (
            "dynamic: the model's Conv/MatMul/Gemm/LSTM layers lie only inside If/Loop/Scan "
            "branches, which static QDQ does not reach; dynamic INT8 quantizes them there"
        )
    return "static", f"static QDQ: {kind}; activation ranges calibrated once, no per-call quantize cost"


def choose_recipe(
    model,
    config: Int8Scheme | QuantizeConfig,
    cpu: HostCpu | None = None,
    *,
    has_data: bool = True,
    normalization: Mapping[str, Any] | None = None,
    mode_reason: str | None = None,
) -> Int8Recipe:
    """The INT8 recipe for this model, scheme, target and CPU, with a reason for every choice. A
    `quantize` request is resolved to its scheme first. `normalization`: the report of
    dlopt.optimize.normalize on this model (its opset upgrade); `mode_reason`: why this scheme."""
    from dlopt.optimize.normalize import PER_CHANNEL_OPSET, default_opset, upgrade_failure

    cpu = cpu or host_cpu()
    scheme: Scheme | QuantizeConfig = config
    if isinstance(config, QuantizeConfig):
        scheme, (mode_reason,) = resolve_scheme(config, model, has_data=has_data)
    if not isinstance(scheme, Int8Scheme):
        raise TypeError(f"choose_recipe takes an INT8 scheme, not {type(scheme).__name__}")
    config = scheme
    transformer, convs, kind = _model_kind(model)
    mode = config.mode
    reasons = [mode_reason or f"{mode}: the int8-{mode} scheme"]
    static = config if isinstance(config, Int8Static) else Int8Static()  # calibration fields: static only
    fmt: Literal["QOperator", "QDQ"] = "QOperator" if mode == "dynamic" else "QDQ"
    act: Literal["u8", "s8", "float"]
    wt: Literal["u8", "s8"]
    if mode == "weight-only":
        act, wt, reduce = "float", "s8", False
        reasons.append(
            "s8 weights, full 8-bit range: they are dequantized to float, so no int8 kernel's accumulation limits apply"
        )
    else:  # the target's kernels decide (dlopt.targets: its INT8 form, and this CPU for target cpu)
        from dlopt.targets import get_target

        _int8_form(config.target)
        types = get_target(config.target).int8_types(cpu)
        act, wt, reduce = types.activation, types.weight, types.reduce_range
        reasons.append(types.reason)
    if mode == "dynamic":
        act = "u8"  # DynamicQuantizeLinear produces u8 only
    per_channel = config.per_channel
    opset = default_opset(model)
    before = (normalization or {}).get("opset", {}).get("before", opset)
    if before < opset:
        reasons.append(
            f"opset {before} upgraded to {opset} with onnx's version converter (checked: outputs "
            "equal to the original's)"
        )
    if per_channel and mode != "dynamic" and opset < PER_CHANNEL_OPSET:
        per_channel = False
        why = upgrade_failure(normalization)
        reasons.append(
            f"per-tensor weights: opset {opset} has no per-channel DequantizeLinear (axis came in opset "
            f"{PER_CHANNEL_OPSET})"
            + (f", and the upgrade to opset {PER_CHANNEL_OPSET} was rejected: {why}" if why else "")
        )
    else:
        reasons.append("per-channel weights" if per_channel else "per-tensor weights: asked for")
    method = static.method or ("percentile" if transformer or kind == "CNN" else "minmax")
    # EfficientNet-Lite0 (GPTQ + bias correction): 99.99 -> 19.75 dB, 99.999 -> 19.43, 99.9 -> 17.46
    percentile = static.percentile or (99.99 if kind == "CNN" and not transformer else 99.999)
    if mode == "static":
        reasons.append(
            f"calibration: {method}"
            + (f" {percentile}" if method == "percentile" else "")
            + (
                ""
                if static.method
                else (
                    " (transformer activations have outliers)"
                    if transformer
                    else " (a few outliers set the range of the residual and projection outputs: "
                    "EfficientNet-Lite0 19.7 vs 18.7 dB with minmax)"
                    if kind == "CNN"
                    else " (bounded activations)"
                )
            )
        )
    rounding: Literal["nearest", "gptq"] = "nearest"
    bias_correction = False
    if mode == "static" and not transformer:
        rounding = ("gptq" if has_data else "nearest") if static.weight_rounding == "auto" else static.weight_rounding
        bias_correction = static.bias_correction and has_data
        if rounding == "gptq":
            reasons.append(
                "GPTQ weight rounding on the calibration data: folded BatchNorm leaves high-gain filters "
                "whose nearest-rounding error is amplified downstream (EfficientNet-Lite0 logit SQNR "
                "10.6 -> 21.2 dB with bias correction and percentile calibration)"
            )
        if bias_correction:
            reasons.append(
                "bias correction: each Conv/Gemm's mean output shift from weight rounding folded into its int32 bias"
            )
    fuse = transformer and config.preprocess
    if fuse:
        reasons.append("ORT transformer fusions first: fused Attention/EmbedLayerNorm quantize as whole ops")
    smoothing = None
    if transformer and config.smoothing is not None:
        if has_data:
            smoothing = config.smoothing
            reasons.append(
                f"SmoothQuant (alpha {smoothing}) from the calibration data: transformer hidden states "
                "have outlier channels that waste a per-tensor activation scale; they are divided out "
                "and folded into the weights (exact in float)"
            )
        else:
            reasons.append("no SmoothQuant: it needs calibration data (--calibration) to measure activation ranges")
    token_scales = mode == "dynamic" and transformer
    if token_scales:
        reasons.append(
            "per-token activation scales for the projections that read a GELU's output: a few "
            "outlier tokens set one per-batch scale too coarse for the rest (MiniLM embedding cosine "
            "0.9918 -> 0.9945, about 4 % more time on Zen 4)"
        )
    return Int8Recipe(
        mode=mode,
        quant_format=fmt,
        activation_type=act,
        weight_type=wt,
        per_channel=per_channel,
        reduce_range=reduce,
        method=method,
        fuse_transformer=fuse,
        smoothing=smoothing,
        weight_rounding=rounding,
        bias_correction=bias_correction,
        percentile=percentile,
        token_scales=token_scales,
        reasons=tuple(reasons),
    )


def host_kernels_inexact(recipe: Int8Recipe, cpu: HostCpu | None = None) -> bool:
    """Whether this CPU's int8 kernels compute a static QDQ model of `recipe` inexactly: x86 without
    VNNI adds u8*s8 products pairwise in 16 bits, which full-range (non-reduce_range) weights overflow.
    That is the arm64/mobile/cuda recipe measured here: fashion-cnn's arm64 INT8 model measured 8.4 dB
    in this host's kernels and 37.4 dB in its own QDQ arithmetic (what an ARM sdot kernel computes)."""
    cpu = cpu or host_cpu()
    return recipe.mode == "static" and not recipe.reduce_range and cpu.is_x86 and not cpu.vnni
