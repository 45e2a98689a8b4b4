"""The INT8 recipe: the scheme a `quantize` request resolves to (choose_mode) and, for a scheme, the
formats, types, calibration and weight rounding for this model, target and CPU, each with its reason."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dlopt.optimize.preprocess import looks_like_transformer
from dlopt.optimize.quantize.schemes import Int8Scheme, Int8Static, Method, QuantizeConfig, _Int8


# -- the CPU and the recipe ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuFeatures:
    machine: str
    vnni: bool
    flags: tuple[str, ...]


def cpu_features() -> CpuFeatures:
    machine = platform.machine().lower()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    interesting = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                   "asimddp", "i8mm", "fma"})
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    return CpuFeatures(machine, vnni, tuple(interesting))


@dataclass(frozen=True, kw_only=True)
class Recipe:
    mode: Literal["dynamic", "static", "weight-only"]
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
    reasons: tuple[str, ...] = ()


def _model_kind(model) -> tuple[bool, set[str], str]:
    from dlopt.optimize.normalize import all_graphs

    transformer = looks_like_transformer(model)
    ops = {n.op_type for g in all_graphs(model.graph) for n in g.node}
    convs = ops & {"Conv", "ConvTranspose"}
    return transformer, convs, "transformer" if transformer else ("CNN" if convs else "MLP/other")


def choose_mode(model, config: QuantizeConfig, cpu: CpuFeatures | None = None, *, has_data: bool = True
                ) -> tuple[str, str]:
    """The INT8 scheme (dynamic, static, weight-only) for a `quantize` request on this model and target,
    with the reason: the request's mode unless it is auto."""
    transformer, convs, kind = _model_kind(model)
    if config.mode != "auto":
        return config.mode, f"mode {config.mode}: asked for"
    if not has_data and (config.target == "cuda" or (convs and not transformer)):
        needs = ("the CUDA/TensorRT providers run static QDQ, not dynamic quantization, and static INT8"
                 if config.target == "cuda" else f"static INT8 for this {kind} ({', '.join(sorted(convs))})")
        return "weight-only", (f"weight-only: {needs} needs calibration data to set activation ranges (pass "
                               "--calibration DATA: an .npz, a folder, or model:NAME); without it the weights are "
                               "stored int8 and dequantized to float before each op: ~4x smaller weights, float "
                               "compute, no speedup (ONNX Runtime runs each DequantizeLinear per call unless the "
                               "session sets session.disable_quant_qdq=1)")
    if not has_data and not transformer:
        return "dynamic", (f"dynamic: no calibration data, and this {kind} model's MatMul/Gemm layers need none: "
                           "activations are quantized per call (--calibration DATA allows static QDQ)")
    if config.target == "cuda":
        return "static", "static QDQ: the CUDA/TensorRT providers run QDQ graphs, not dynamic quantization"
    if transformer:
        return "dynamic", ("dynamic: transformer activations vary per token and per input; per-call ranges beat "
                           "calibrated ones (ORT static QDQ loses ~0.2 cosine on MiniLM)")
    if config.target == "mobile":
        return "static", "static QDQ: mobile providers (XNNPACK, NNAPI, CoreML) take QDQ graphs"
    return "static", f"static QDQ: {kind}; activation ranges calibrated once, no per-call quantize cost"


def choose_recipe(model, config: Int8Scheme | QuantizeConfig, cpu: CpuFeatures | None = None, *,
                  has_data: bool = True, normalization: Mapping[str, Any] | None = None,
                  mode_reason: str | None = None) -> Recipe:
    """The INT8 recipe for this model, scheme, target and CPU, with a reason for every choice. A
    `quantize` request is resolved to its scheme first. `normalization`: the report of
    dlopt.optimize.normalize on this model (its opset upgrade); `mode_reason`: why this scheme."""
    from dlopt.optimize.normalize import PER_CHANNEL_OPSET, default_opset, upgrade_failure

    cpu = cpu or cpu_features()
    if isinstance(config, QuantizeConfig):
        config, (mode_reason,) = config.resolve(model, has_data=has_data, cpu=cpu)
    if not isinstance(config, _Int8):
        raise TypeError(f"choose_recipe takes an INT8 scheme, not {type(config).__name__}")
    transformer, convs, kind = _model_kind(model)
    arm = config.target in ("arm64", "mobile") or cpu.machine in ("aarch64", "arm64")
    mode = config.mode
    reasons = [mode_reason or f"{mode}: the int8-{mode} scheme"]
    static = config if isinstance(config, Int8Static) else Int8Static()  # calibration fields: static only
    fmt = "QOperator" if mode == "dynamic" else "QDQ"
    if mode == "weight-only":
        act, wt, reduce = "float", "s8", False
        reasons.append("s8 weights, full 8-bit range: they are dequantized to float, so no int8 kernel's "
                       "accumulation limits apply")
    elif config.target == "cuda" or arm:
        act, wt, reduce = "s8", "s8", False
        reasons.append("s8/s8: " + ("TensorRT takes symmetric int8 only" if config.target == "cuda"
                                    else "ARM int8 dot-product kernels are s8·s8"))
    elif cpu.vnni:
        act, wt, reduce = "u8", "s8", False
        reasons.append(f"u8/s8, full range: the CPU has VNNI ({', '.join(cpu.flags)})")
    else:
        act, wt, reduce = "u8", "s8", True
        reasons.append("u8/s8 with reduce_range (7-bit weights): no VNNI on this CPU "
                       f"({', '.join(cpu.flags) or 'no flags read'}), its u8·s8 kernel sums pairs in 16 bits "
                       "and would saturate")
    if mode == "dynamic":
        act = "u8"  # DynamicQuantizeLinear produces u8 only
    per_channel = config.per_channel
    opset = default_opset(model)
    before = (normalization or {}).get("opset", {}).get("before", opset)
    if before < opset:
        reasons.append(f"opset {before} upgraded to {opset} with onnx's version converter (checked: outputs "
                       "equal to the original's)")
    if per_channel and mode != "dynamic" and opset < PER_CHANNEL_OPSET:
        per_channel = False
        why = upgrade_failure(normalization)
        reasons.append(f"per-tensor weights: opset {opset} has no per-channel DequantizeLinear (axis came in opset "
                       f"{PER_CHANNEL_OPSET})" + (f", and the upgrade to opset {PER_CHANNEL_OPSET} was rejected: {why}"
                                                  if why else ""))
    else:
        reasons.append("per-channel weights" if per_channel else "per-tensor weights: asked for")
    method = static.method or ("percentile" if transformer or kind == "CNN" else "minmax")
    # EfficientNet-Lite0 (GPTQ + bias correction): 99.99 -> 19.75 dB, 99.999 -> 19.43, 99.9 -> 17.46
    percentile = static.percentile or (99.99 if kind == "CNN" and not transformer else 99.999)
    if mode == "static":
        reasons.append(f"calibration: {method}" + (f" {percentile}" if method == "percentile" else "")
                       + ("" if static.method else
                       (" (transformer activations have outliers)" if transformer
                        else " (a few outliers set the range of the residual and projection outputs: "
                             "EfficientNet-Lite0 19.7 vs 18.7 dB with minmax)" if kind == "CNN"
                        else " (bounded activations)")))
    rounding, bias_correction = "nearest", False
    if mode == "static" and not transformer:
        rounding = ("gptq" if has_data else "nearest") if static.weight_rounding == "auto" else static.weight_rounding
        bias_correction = static.bias_correction and has_data
        if rounding == "gptq":
            reasons.append("GPTQ weight rounding on the calibration data: folded BatchNorm leaves high-gain filters "
                           "whose nearest-rounding error is amplified downstream (EfficientNet-Lite0 logit SQNR "
                           "10.6 -> 21.2 dB with bias correction and percentile calibration)")
        if bias_correction:
            reasons.append("bias correction: each Conv/Gemm's mean output shift from weight rounding folded into "
                           "its int32 bias")
    fuse = transformer and config.preprocess
    if fuse:
        reasons.append("ORT transformer fusions first: fused Attention/EmbedLayerNorm quantize as whole ops")
    smoothing = None
    if transformer and config.smoothing is not None:
        if has_data:
            smoothing = config.smoothing
            reasons.append(f"SmoothQuant (alpha {smoothing}) from the calibration data: transformer hidden states "
                           "have outlier channels that waste a per-tensor activation scale; they are divided out "
                           "and folded into the weights (exact in float)")
        else:
            reasons.append("no SmoothQuant: it needs calibration data (--calibration) to measure activation ranges")
    return Recipe(mode=mode, quant_format=fmt, activation_type=act, weight_type=wt, per_channel=per_channel,
                  reduce_range=reduce, method=method, fuse_transformer=fuse, smoothing=smoothing,
                  weight_rounding=rounding, bias_correction=bias_correction, percentile=percentile,
                  reasons=tuple(reasons))


def host_kernels_inexact(recipe: Recipe, cpu: CpuFeatures | None = None) -> bool:
    """Whether this CPU's int8 kernels compute a static QDQ model of `recipe` inexactly: x86 without
    VNNI adds u8*s8 products pairwise in 16 bits, which full-range (non-reduce_range) weights overflow.
    That is the arm64/mobile/cuda recipe measured here: fashion-cnn's arm64 INT8 model measured 8.4 dB
    in this host's kernels and 37.4 dB in its own QDQ arithmetic (what an ARM sdot kernel computes)."""
    cpu = cpu or cpu_features()
    x86 = cpu.machine in ("x86_64", "amd64", "i686", "x86")
    return recipe.mode == "static" and not recipe.reduce_range and x86 and not cpu.vnni
