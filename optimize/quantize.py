"""Quantization: one entry point (`quantize`) for INT8 (dynamic and static), INT4 and FP16.

INT8 is implemented here on top of ONNX Runtime's quantization tools. What dlopt adds to them:
- a recipe chosen for the model, the target and the CPU's instruction set, with the reasons printed
  (`--mode auto`): dynamic per-channel on the fused graph for transformers on x86, static QDQ for
  CNNs, u8/s8 with reduce_range when the CPU lacks VNNI (its u8·s8 kernel saturates in 16 bits), s8/s8
  for ARM and for CUDA (TensorRT takes only symmetric int8);
- graph normalization first (optimize/normalize.py): Constant-node weights to initializers, opset >= 13 for
  per-channel scales, each checked; a failed upgrade means per-tensor weights, said in the recipe;
- without calibration data, what works without it: dynamic for MatMul/Gemm models, weight-only int8
  (optimize/weight_only.py) for conv models; weight-only also for what ORT's quantizers leave float
  (GRU/RNN, and If/Loop/Scan bodies in static QDQ; dynamic enters them through ORT's EnableSubgraph);
- checked pre-processing (optimize/preprocess.py);
- calibration that streams: ORT's calibrators keep every activation of every sample in memory and
  stack them (which also fails on samples of different lengths). Here each sample is run and folded
  into ORT's own min/max or histogram collector before the next is read, so memory stays flat and
  every method takes samples of any length; the ranges then go to ORT's quantizer through its
  calibration-cache file;
- for static CNNs, weights rounded against the layer's real inputs (GPTQ) and the remaining mean
  rounding shift folded into the int32 bias, on ORT's own scales (optimize/rounding.py);
- an accuracy budget (optimize/sensitivity.py) and a fidelity report against the float model.
INT4 and FP16 live in optimize/int4.py and optimize/fp16.py; `quantize` dispatches to them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from dlopt.errors import InputError, StageError, VerificationError
from dlopt.optimize.calibration import CalibrationData, Feeds, progress_bar
from dlopt.inputs import graph_inputs
from dlopt.images import ImagePreprocess
from dlopt.optimize.fp16 import Fp16
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.kernel_choice import NODE_FORMS, LayerNormForm, NodeForms
from dlopt.optimize.scheme import HOLDOUT_FRACTION, HOLDOUT_MIN, TARGETS, QuantizeScheme, Target, check_common
from dlopt.optimize.normalize import NormalizeConfig, normalize
from dlopt.optimize.rounding import LayerStatistics, collect_layer_statistics, refine_weights
from dlopt.fidelity import compare_runs
from dlopt.fidelity import report as fidelity_report
from dlopt.optimize.preprocess import (PreprocessConfig, check_feeds, looks_like_transformer, op_counts, preprocess,
                                       replace_nodes)
from dlopt.sessions import cpu_session, run_outputs
from dlopt.quiet import quiet_libraries
from dlopt.runtime import cpu_label, runtime_report
from dlopt.runtime import initialize as initialize_runtime
from dlopt.stage import Check, Stage, StageContext, StageResult, config_to_dict

PRECISIONS = ("int8", "int4", "fp16")
MODES = ("auto", "dynamic", "static", "weight-only")
METHODS = ("minmax", "entropy", "percentile")
ROUNDINGS = ("auto", "nearest", "gptq")

Precision = Literal["int8", "int4", "fp16"]
Mode = Literal["auto", "dynamic", "static", "weight-only"]
Method = Literal["minmax", "entropy", "percentile"]
Rounding = Literal["auto", "nearest", "gptq"]
# The fidelity floor: the lowest output SQNR, 20·log10(‖x‖/‖x−y‖) per float output over the held-out
# samples, at which a result is written as a success. int8 15 dB: noise 3 % of the signal power (a
# cosine of about 0.985); the reference models measure 17-21 dB (MiniLM cos 0.991, EfficientNet-Lite0
# 21.2 dB) and PP-OCRv4's broken per-tensor detector 3.4 dB. int4 (weight-only) 10 dB: 4-bit
# weights cost more, and a 4-bit LM's logits lose ~10-15 dB while its perplexity moves a few per
# cent. fp16 30 dB: an 11-bit mantissa gives 50-60 dB; below 30 something overflowed.
# Override with the config's min_sqnr_db.
FIDELITY_FLOORS_DB: dict[str, float] = {"int8": 15.0, "int4": 10.0, "fp16": 30.0}
# Recovery below the floor keeps at most this share of the quantizable nodes in float: a model that
# needs more is barely quantized, and is reported as failed rather than passed off as INT8 (PP-OCRv4's
# per-tensor detector reached 15 dB only with all 67 of its Conv nodes in float).
RECOVERY_MAX_FLOAT_SHARE = 0.5
# the JSON report beside every quantized model: documented in dlopt/schemas/quantize.schema.json
REPORT_SCHEMA = "dlopt.quantize"
REPORT_SCHEMA_VERSION = 1


# -- the scheme configs -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Int8(QuantizeScheme):
    """The fields of every INT8 scheme (ORT's quantizers, the accuracy budget, recovery below the floor)."""

    precision: ClassVar[str] = "int8"
    mode: ClassVar[str]
    per_channel: bool = True
    preprocess: bool = True  # fusions, constant folding, shape inference, each checked
    max_accuracy_drop: float | None = None
    evaluator: str | None = None  # cosine | top1 | sqnr | model:NAME[:metric]; None: cosine or top1
    # below the floor: keep the nodes that add the most noise in float until it holds (the budget
    # search of optimize/sensitivity.py); False: fail at once
    recover: bool = True
    leave_one_out_limit: int = 80  # budget: rank up to this many nodes by re-quantizing without each
    # SmoothQuant alpha for transformers with calibration data; None: off. Off by default: on MiniLM
    # (dynamic INT8, 7-bit weights, this AVX2 CPU) alpha 0.75 gave embedding cosine 0.9916 vs 0.9908
    # without, but Pang-Lee 0.730 vs 0.735 and Lee50 0.644 vs 0.658, 4 % slower (its Mul nodes), and
    # alpha 0.5 or 0.9 dropped cosine to 0.984.
    smoothing: float | None = None
    smoothing_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int8(self)


@dataclass(frozen=True, kw_only=True)
class Int8Dynamic(_Int8):
    """INT8 weights, activations quantized per call (QOperator): transformers, MatMul/Gemm models."""

    VERSION: ClassVar[int] = 1
    mode: ClassVar[str] = "dynamic"


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnly(_Int8):
    """INT8 weights dequantized to float before each op: ~4x smaller, float compute, needs no data."""

    VERSION: ClassVar[int] = 1
    mode: ClassVar[str] = "weight-only"


@dataclass(frozen=True, kw_only=True)
class Int8Static(_Int8):
    """Static QDQ: activation ranges calibrated once on data, weights refined against the layers' inputs."""

    VERSION: ClassVar[int] = 1
    mode: ClassVar[str] = "static"
    method: Method | None = None  # calibration; None: percentile for transformers and CNNs, else minmax
    percentile: float | None = None  # for percentile calibration; None: 99.99 for CNNs, 99.999 otherwise
    weight_rounding: Rounding = "auto"  # Conv/Gemm weights: auto = GPTQ with calibration data; nearest = ORT's
    bias_correction: bool = True  # fold each Conv/Gemm's mean rounding shift into its bias
    rounding_samples: int = 64  # calibration samples for the layer statistics of both
    # target cpu: node classes (depthwise, pointwise, dense, small-channel conv, gemm) whose INT8 kernels
    # time slower here than float stay float, if the whole model then runs faster; int8: all
    node_forms: NodeForms = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_static(self)


Int8Scheme = Int8Dynamic | Int8Static | Int8WeightOnly
Scheme = Int8Dynamic | Int8Static | Int8WeightOnly | Int4WeightOnly | Fp16
INT8_SCHEMES: dict[str, type] = {"dynamic": Int8Dynamic, "static": Int8Static, "weight-only": Int8WeightOnly}


def check_int8(config) -> None:
    if config.smoothing is not None and not 0 < config.smoothing < 1:
        raise InputError(f"smoothing alpha {config.smoothing} is out of range", "give a value in (0, 1), e.g. 0.75")
    if config.max_accuracy_drop is not None and config.max_accuracy_drop < 0:
        raise InputError(f"the accuracy budget (max accuracy drop) {config.max_accuracy_drop} is negative",
                         "give a drop >= 0")


def check_static(config) -> None:
    if config.method is not None and config.method not in METHODS:
        raise InputError(f"unknown calibration method {config.method!r}", f"choose one of {', '.join(METHODS)}")
    if config.percentile is not None and not 0 < config.percentile <= 100:
        raise InputError(f"percentile {config.percentile} is out of range", "give a value in (0, 100], e.g. 99.999")
    if config.weight_rounding not in ROUNDINGS:
        raise InputError(f"unknown weight rounding {config.weight_rounding!r}", f"choose one of {', '.join(ROUNDINGS)}")
    if config.node_forms not in NODE_FORMS:
        raise InputError(f"unknown node forms {config.node_forms!r}", f"choose one of {', '.join(NODE_FORMS)}")
    if config.rounding_samples < 1:
        raise InputError(f"rounding samples {config.rounding_samples} must be >= 1", "e.g. 32")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """The `dlopt quantize` front door: a precision, a mode (auto: chosen for the model, the target and the
    CPU) and every option. `resolve` turns it into one scheme config at run time, with the reasons;
    the report records which one (`report["scheme"]`)."""

    VERSION: ClassVar[int] = 1
    precision: Precision = "int8"
    mode: Mode = "auto"
    method: Method | None = None  # static calibration; None: the recipe's choice
    per_channel: bool = True
    block_size: int = 32  # int4
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    target: Target = "cpu"
    preprocess: bool = True  # fusions, constant folding, shape inference (int8), each checked
    calibration_samples: int | None = None  # cap on samples read; None: all of them
    percentile: float | None = None  # for percentile calibration; None: 99.99 for CNNs, 99.999 otherwise
    max_accuracy_drop: float | None = None
    evaluator: str | None = None  # cosine | top1 | sqnr | model:NAME[:metric]; None: cosine or top1
    fidelity_samples: int = 32
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: the shapes of synthetic inputs
    image: ImagePreprocess | None = None  # how a folder of images is fed; None: its defaults
    min_sqnr_db: float | None = None  # fidelity floor per float output; None: FIDELITY_FLOORS_DB[precision]
    holdout: float = HOLDOUT_FRACTION  # share of the calibration samples held out to measure fidelity
    recover: bool = True  # int8 below the floor: keep the noisiest nodes in float until it holds
    leave_one_out_limit: int = 80
    smoothing: float | None = None  # SmoothQuant alpha (int8 transformers with data); see _Int8
    smoothing_samples: int = 64
    weight_rounding: Rounding = "auto"
    bias_correction: bool = True
    rounding_samples: int = 64
    speed_check: bool = True
    layernorm_form: LayerNormForm = "auto"
    node_forms: NodeForms = "auto"

    def resolve(self, model, *, has_data: bool, cpu: CpuFeatures | None = None) -> tuple[Scheme, tuple[str, ...]]:
        """The scheme config this request asks for on `model`, and why (int8 mode auto: see choose_mode)."""
        validate_config(self)
        if self.precision == "int8":
            mode, reason = choose_mode(model, self, cpu, has_data=has_data)
            cls, reasons = INT8_SCHEMES[mode], (reason,)
        else:
            cls = Int4WeightOnly if self.precision == "int4" else Fp16
            reasons = (f"{self.precision}: asked for",)
        # The request holds every scheme's fields under the same names: each scheme takes its own.
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if hasattr(self, f.name)}), reasons


def validate_config(config: QuantizeConfig) -> None:
    choices = {"precision": PRECISIONS, "mode": MODES}
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise InputError(f"unknown {name} {value!r}", f"choose one of {', '.join(allowed)}")
    check_common(config)
    check_int8(config)
    check_static(config)
    if config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise InputError(f"block size {config.block_size} is not a power of two >= 16", "use 32, 64 or 128")


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


# -- SmoothQuant ----------------------------------------------------------------------------------------
SMOOTHABLE_OPS = ("MatMul", "Attention")


def smooth_activations(model, data: Iterable[Mapping[str, np.ndarray]], *, alpha: float, samples: int = 64,
                       exclude: Iterable[str] = ()):
    """SmoothQuant (Xiao et al., 2023) for the MatMul/Attention nodes with constant 2-D weights.

    For each activation tensor X feeding such nodes, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j: row j of every weight X feeds), then X·W =
    (X/s)·(s·W): a Mul by 1/s is inserted on X (one per tensor, a cheap elementwise op) and the
    weights' rows are scaled by s. Lossless in float; the outlier channels of transformer hidden
    states no longer set the per-tensor activation scale. Returns (model, report)."""
    import onnx
    from onnx import helper, numpy_helper

    from dlopt.optimize.preprocess import with_outputs as _with_outputs

    exclude = set(exclude)
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if (node.op_type in SMOOTHABLE_OPS and node.name not in exclude and len(node.input) > 1
                and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] not in inits):
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        return model, {"smoothed_tensors": 0}
    tensors = sorted(groups)
    session = cpu_session(_with_outputs(model, tensors), graph_opt_level="basic")
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for index, feeds in enumerate(data):
        if index >= samples:
            break
        outs = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))
        for t in tensors:
            a = np.abs(outs[t]).reshape(-1, outs[t].shape[-1]).max(axis=0)
            amax[t] = np.maximum(amax[t], a) if t in amax else a
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    weights = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    muls, factors = {}, []
    for t in tensors:
        if t not in amax:
            continue
        wmax = np.max([np.abs(weights[n.input[1]]).max(axis=1) for n in groups[t]], axis=0)
        s = np.maximum(amax[t], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        s = np.clip(s / np.exp(np.mean(np.log(s))), 1e-2, 1e2).astype(np.float32)  # centred: weights keep scale
        factors.append(float(s.max() / s.min()))
        scaled = f"{t}/smoothed"
        inv = f"{t}/smooth_inv_scale"
        smoothed.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        muls[t] = helper.make_node("Mul", [t, inv], [scaled], name=f"{t}/smooth")
        for node in {n.input[1]: n for n in groups[t]}.values():  # a weight shared by two nodes: once
            name = f"{node.input[1]}/smoothed"
            smoothed.graph.initializer.append(
                numpy_helper.from_array((weights[node.input[1]] * s[:, None]).astype(np.float32), name))
    targets = {n.name for t in muls for n in groups[t]}
    nodes, placed = [], set()
    for node in smoothed.graph.node:
        if node.name in targets and node.input[0] in muls:
            t = node.input[0]
            if t not in placed:
                nodes.append(muls[t])
                placed.add(t)
            node.input[0] = muls[t].output[0]
            node.input[1] = f"{node.input[1]}/smoothed"
        nodes.append(node)
    replace_nodes(smoothed.graph, nodes)
    used = {i for n in smoothed.graph.node for i in n.input}
    for t in [t for t in smoothed.graph.initializer if t.name not in used]:
        smoothed.graph.initializer.remove(t)
    return smoothed, {"alpha": alpha, "smoothed_tensors": len(muls), "smoothed_nodes": len(targets),
                      "max_channel_factor_ratio": max(factors) if factors else 1.0}


# -- calibration (streamed) ---------------------------------------------------------------------------
def _ort_quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[name]


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


class _OneSample:
    """An ORT CalibrationDataReader over exactly one sample."""

    def __init__(self, feeds: Feeds):
        self._feeds: Feeds | None = feeds

    def get_next(self):
        feeds, self._feeds = self._feeds, None
        return feeds


def calibrate(model, data: Iterable[Mapping[str, np.ndarray]], *, method: Method = "minmax",
              op_types: Iterable[str] | None = None, symmetric: bool = False, percentile: float = 99.999,
              progress: bool = False):
    """Activation ranges of `model` over `data`, as ORT's TensorsData, one sample in memory at a time."""
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator

    extra = {"symmetric": symmetric}
    if method == "percentile":
        extra.update(percentile=percentile, num_bins=2048)
    elif method == "entropy":
        # ORT's KL search is pure-Python loops, O(bins^2): 512 bins cost ~4.5 s per tensor, 256 ~0.7 s
        extra.update(num_bins=256, num_quantized_bins=128)
    total = len(data) if hasattr(data, "__len__") else None
    with tempfile.TemporaryDirectory(prefix="dlopt-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 1)
        # ORT's histogram collectors print to stdout on every call; dlopt keeps stdout for results
        with quiet_libraries():
            calibrator = create_calibrator(path, list(op_types) if op_types else None,
                                           augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=_ort_method(method), extra_options=extra)
            count = 0
            with progress_bar(total, f"calibrating ({method})", progress) as advance:
                for feeds in data:
                    calibrator.collect_data(_OneSample(dict(feeds)))
                    count += 1
                    advance()
            if count == 0:
                raise InputError("calibration data holds no samples", "give at least one sample")
            ranges = calibrator.compute_data()
    for name in ranges:
        bounds = getattr(ranges[name], "range_value", None)
        if bounds is not None and not np.isfinite(np.asarray(bounds, dtype=np.float64)).all():
            source = getattr(data, "source", "the calibration data")
            raise InputError(f"the model's tensor {name!r} is NaN or infinite on the calibration data {source}",
                             "check the model and the data; keep the node that makes it in float "
                             "({exclude_nodes=NAMES}) or use {mode=dynamic}")
    return ranges, count


# -- INT8 -------------------------------------------------------------------------------------------------
def _default_op_types(recipe: Recipe) -> set[str]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    from dlopt.optimize.weight_only import WEIGHT_INPUTS

    if recipe.mode == "weight-only":
        return set(WEIGHT_INPUTS)
    return set(IntegerOpsRegistry if recipe.mode == "dynamic" else QDQRegistry)


def _depthwise_weights(model, skip: set[str] = frozenset()) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return sorted(n.input[1] for n in model.graph.node
                  if n.op_type == "Conv" and n.input[1] in inits and n.name not in skip
                  and any(a.name == "group" and a.i > 1 for a in n.attribute))


def _check_exclusions(model, config: QuantizeScheme) -> None:
    from dlopt.optimize.normalize import all_graphs

    names = {n.name for g in all_graphs(model.graph) for n in g.node}  # ORT's quantizers exclude in subgraphs too
    unknown = [n for n in config.exclude_nodes if n not in names]
    if unknown:
        sample = ", ".join(sorted(n.name for n in model.graph.node if n.name)[:5])
        raise InputError(f"{{exclude_nodes=NAMES}}: nodes not in the model: {', '.join(unknown)}",
                         f"use node names from the graph (e.g. {sample})")


def quantize_int8(model, config: Int8Scheme, recipe: Recipe, data: CalibrationData | None = None, *,
                  exclude_nodes: Iterable[str] = (), progress: bool = False, ranges=None,
                  layer_stats: LayerStatistics | None = None):
    """INT8 with ORT's quantizers following `recipe`; returns (model, details). `ranges` and
    `layer_stats` reuse a calibration (TensorsData) and the weight-rounding statistics across the
    candidates of a budget search (both are returned in details)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from dlopt.optimize.normalize import topological_sort
    from dlopt.optimize.weight_only import WEIGHT_INPUTS, WeightOnlyConfig, quantize_weights_int8

    op_types = sorted(_default_op_types(recipe) - set(config.exclude_ops))
    excluded = sorted(set(config.exclude_nodes) | set(exclude_nodes))
    details: dict[str, Any] = {"op_types_to_quantize": op_types, "nodes_excluded": excluded}
    weight_only = WeightOnlyConfig(per_channel=recipe.per_channel, exclude_nodes=tuple(excluded),
                                   op_types=tuple(sorted(set(WEIGHT_INPUTS) - set(config.exclude_ops))))
    if recipe.mode == "weight-only":
        result = quantize_weights_int8(model, weight_only)
        details.update(weight_only=result.report, ranges=ranges, layer_stats=layer_stats)
        return result.model, details
    with tempfile.TemporaryDirectory(prefix="dlopt-quant-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        common = dict(per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                      weight_type=_ort_quant_type(recipe.weight_type), nodes_to_exclude=excluded,
                      op_types_to_quantize=op_types)
        with quiet_libraries():  # its "run pre-processing" advice: preprocess() did
            if recipe.mode == "dynamic":
                # EnableSubgraph: If/Loop/Scan bodies are quantized too (ORT's QOperator quantizer only)
                quantize_dynamic(model, str(out), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                                                 "MatMulConstBOnly": True, "EnableSubgraph": True},
                                 **common)
            else:
                if ranges is None:
                    if data is None:
                        raise InputError("static quantization needs calibration data",
                                         "pass {calibration=DATA} (an .npz, a folder, or model:NAME) or use {mode=dynamic}")
                    ranges, _ = calibrate(model, data, method=recipe.method, op_types=op_types,
                                          symmetric=recipe.activation_type == "s8", percentile=recipe.percentile,
                                          progress=progress)
                cache = Path(tmp) / "ranges.json"
                save_tensors_data(ranges, cache)
                overrides = {}
                if recipe.reduce_range:
                    # Depthwise convolutions run on MLAS's direct kernel, which accumulates in 32 bits:
                    # the 16-bit pair saturation that reduce_range guards against cannot happen there,
                    # so their weights keep all 8 bits (EfficientNet-Lite0: logit SQNR 12.5 -> 13.9 dB).
                    overrides = {w: [{"quant_type": _ort_quant_type(recipe.weight_type), "symmetric": True,
                                      "reduce_range": False, "axis": 0}]
                                 for w in _depthwise_weights(model, skip=set(excluded))}
                    details["full_range_depthwise_weights"] = len(overrides)
                quantize_static(model, str(out), calibration_data_reader=None, calibration_cache_path=str(cache),
                                quant_format=QuantFormat.QDQ, activation_type=_ort_quant_type(recipe.activation_type),
                                calibrate_method=_ort_method(recipe.method),
                                extra_options={"ActivationSymmetric": recipe.activation_type == "s8",
                                               "WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT,
                                               **({"TensorQuantOverrides": overrides} if overrides else {})},
                                **common)
        quantized = onnx.load_model(str(out))
    topological_sort(quantized.graph)  # ORT appends outer quantize nodes after the If/Loop reading them
    # What ORT's quantizers leave float: GRU/RNN (no integer kernel), LSTM where DynamicQuantizeLSTM did not
    # apply, and, in static QDQ (whose quantizer does not enter subgraphs), every weight inside If/Loop/Scan
    # bodies: their weights become int8 with a DequantizeLinear in front (weight-only).
    leftovers = quantize_weights_int8(quantized, dataclasses.replace(weight_only, scope="leftovers"))
    if leftovers.report["weights"]:
        quantized = leftovers.model
        details["weight_only"] = leftovers.report
    if recipe.mode == "static":
        details["float_nodes_shielded"] = shield_float_nodes(quantized, excluded + _excluded_by_op(quantized, config))
    if recipe.mode == "static" and (recipe.weight_rounding == "gptq" or recipe.bias_correction):
        if layer_stats is None:
            if data is None:
                raise InputError("GPTQ weight rounding and bias correction need calibration data",
                                 "pass {calibration=DATA}, or use {weight_rounding=nearest} without bias correction")
            layer_stats = collect_layer_statistics(model, data, samples=config.rounding_samples, progress=progress)
        full = set(_depthwise_weights(model)) if recipe.reduce_range else set()
        details["weight_refinement"] = refine_weights(
            quantized, model, layer_stats, rounding=recipe.weight_rounding, bias_correction=recipe.bias_correction,
            full_range=full, reduce_range=recipe.reduce_range)
    details["ranges"] = ranges
    details["layer_stats"] = layer_stats
    return quantized, details


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
        model.graph.initializer.append(numpy_helper.from_array(
            np.full(channels, scale.reshape(-1)[0], dtype=scale.dtype), inputs[1]))
        if len(dq.input) > 2 and dq.input[2] in inits:
            zero = numpy_helper.to_array(inits[dq.input[2]])
            inputs.append(f"{prefix}_zero_point")
            model.graph.initializer.append(numpy_helper.from_array(
                np.full(channels, zero.reshape(-1)[0], dtype=zero.dtype), inputs[2]))
        new_nodes.append((node, helper.make_node("DequantizeLinear", inputs, [f"{prefix}_dequantized"],
                                                 name=f"{prefix}_DequantizeLinear", axis=axis)))
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


# -- reporting --------------------------------------------------------------------------------------------
_QUANT_OPS = ("QLinear", "DynamicQuantize", "MatMulInteger", "ConvInteger", "QAttention", "QEmbedLayerNormalization",
              "QGemm", "MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear")


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
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input):
            key = f"QDQ:{node.op_type}"
        if key:
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- the entry point --------------------------------------------------------------------------------------
def quantize(model, config: Scheme | QuantizeConfig = QuantizeConfig(), data: CalibrationData | None = None, *,
             eval_data: CalibrationData | None = None, progress: bool = False, log=lambda message: None
             ) -> StageResult:
    """Quantize an onnx.ModelProto (never modified) with a scheme config (Int8Dynamic, Int8Static,
    Int8WeightOnly, Int4WeightOnly, Fp16), or a `quantize` request (QuantizeConfig) that resolves to
    one here, for this model and the data at hand. The report holds the scheme (`report["scheme"]`:
    which one, and why), the recipe, sizes, quantized nodes by op type, fidelity against the float model
    on samples held out from calibration (`eval_data` when given, else the last samples of `data`) and
    the verdict: whether every float output is at or above the fidelity floor (and a budget, if any,
    was met), with the nodes kept in float to get there (int8). A failed verdict is reported, not
    raised: `report['verdict']['passed']`; quantize_file and the CLI act on it."""
    if isinstance(config, QuantizeConfig):
        validate_config(config)
    else:
        stage_of(config)  # a scheme config, or an InputError naming them
    started = time.perf_counter()
    # before ORT's own sessions (its calibrator, its transformer optimizer), which would otherwise be the
    # process's first and leave denormals unflushed on this thread for the checks and timings below
    initialize_runtime()
    if isinstance(data, CalibrationData):
        data.bind(model)
        if config.calibration_samples is not None:
            data.limit = min(data.limit or config.calibration_samples, config.calibration_samples)
    if isinstance(eval_data, CalibrationData):
        eval_data.bind(model)
    data, held_out, holdout = split_holdout(data, eval_data, config)
    if holdout["warning"]:
        log(f"warning: {holdout['warning']}")
    request = config if isinstance(config, QuantizeConfig) else None
    reasons: tuple[str, ...] = ()
    if request is not None:
        config, reasons = request.resolve(model, has_data=data is not None)
    scheme = {"kind": SCHEME_KINDS[type(config)], "config": config_to_dict(config),
              "resolved_from": "quantize" if request is not None else None, "reasons": list(reasons)}
    if request is not None and config.precision != "int8":
        log(f"scheme: {scheme['kind']} ({reasons[0]})")
    floor = fidelity_floor(config)
    _check_exclusions(model, config)
    if not isinstance(config, _Int8):
        source = model
        if isinstance(config, Int4WeightOnly):  # MatMulNBits too quantizes initializers only: no opset 13 needed
            from dlopt.optimize.int4 import quantize_int4

            source = normalize(model, NormalizeConfig(min_opset=0, input_shapes=config.input_shapes), data).model
            result = quantize_int4(source, config, data)
        else:
            from dlopt.optimize.fp16 import convert_fp16

            result = convert_fp16(source, config, data)
        report = {**{k: v for k, v in result.report.items() if k != "config"}, "precision": config.precision,
                  "config": config_to_dict(request or config), "scheme": scheme}
        result_model, report["kernel_choice"] = _choose_kernels(result.model, config, log)
        report.update(_summary(model, result_model, data, config, feeds=held_out, holdout=holdout))
        report["verdict"] = verdict(report, floor)
        _warn_if_slower(report, log)
        return StageResult(result_model, report)

    _check_exclusions(model, config)
    # Constant-node weights to initializers, opset >= 13: what ORT's quantizers assume, each step checked
    normalized = normalize(model, NormalizeConfig(input_shapes=config.input_shapes), data)
    if normalized.report["steps"]:
        log("graph normalization: " + ", ".join(s["step"] + ("" if s["applied"] else " (not applied)")
                                                for s in normalized.report["steps"]))
    recipe = choose_recipe(normalized.model, config, has_data=data is not None, normalization=normalized.report,
                           mode_reason=reasons[0] if reasons else None)
    for reason in recipe.reasons:
        log(f"recipe: {reason}")
    prepared, pre_report = normalized.model, None
    if config.preprocess:
        log("pre-processing: " + ("transformer fusions, " if recipe.fuse_transformer else "")
            + "constant folding, shape inference (each checked against its input)")
        pre = preprocess(prepared, PreprocessConfig(transformer_fusion="auto" if recipe.fuse_transformer else "off",
                                                    gemm_to_matmul=recipe.mode == "dynamic",
                                                    input_shapes=config.input_shapes), data)
        prepared, pre_report = pre.model, pre.report
        _check_exclusions(prepared, config)  # a fusion may have absorbed an excluded node
    smooth_report = None
    if recipe.smoothing is not None and data is not None:
        log(f"SmoothQuant: measuring activation ranges on {config.smoothing_samples} samples")
        prepared, smooth_report = smooth_activations(prepared, data, alpha=recipe.smoothing,
                                                     samples=config.smoothing_samples, exclude=config.exclude_nodes)
    quantized, details = quantize_int8(prepared, config, recipe, data, progress=progress)
    ranges = details.pop("ranges")
    layer_stats = details.pop("layer_stats")
    from dlopt.optimize.sensitivity import floor_evaluator, meet_budget

    budget = None
    if config.max_accuracy_drop is not None:
        budget = meet_budget(model, prepared, quantized, config, recipe, data, ranges=ranges,
                             layer_stats=layer_stats, eval_feeds=held_out, log=log)
        quantized = budget.pop("model")
        details["nodes_excluded"] = budget["chosen"]["excluded"]
    exact = host_kernels_inexact(recipe)
    recovery = None
    if config.recover:
        # the floor, on the held-out samples, in the arithmetic the target runs (see _summary)
        feeds = held_out or check_feeds(model, data, config.fidelity_samples, config.input_shapes)
        evaluator = floor_evaluator(model, feeds, floor, graph_opt_level="disable" if exact else "all")
        score = evaluator.score(quantized)
        if score < floor:
            log(f"fidelity: lowest output SQNR {score:.1f} dB on {len(feeds)} {holdout['data']} samples is below "
                f"the {floor:g} dB floor: keeping the nodes that add the most noise in float until it holds")
            base = dataclasses.replace(config, exclude_nodes=tuple(details["nodes_excluded"]))
            recovery = meet_budget(model, prepared, quantized, base, recipe, data, ranges=ranges,
                                   layer_stats=layer_stats, evaluator=evaluator, max_drop=0.0,
                                   max_float_share=RECOVERY_MAX_FLOAT_SHARE, log=log)
            quantized = recovery.pop("model")
            details["nodes_excluded"] = recovery["chosen"]["excluded"]
    node_forms = None
    if recipe.mode == "static" and config.target == "cpu":
        quantized, node_forms = _choose_node_forms(prepared, quantized, config, recipe, data, ranges, layer_stats,
                                                   details, log)
    report = {"precision": "int8", "config": config_to_dict(request or config), "scheme": scheme,
              "recipe": dataclasses.asdict(recipe) | {"reasons": list(recipe.reasons)},
              "normalization": normalized.report, "preprocess": pre_report, "smoothing": smooth_report, **details}
    if budget is not None:
        report["budget"] = budget
    if recovery is not None:
        report["floor_recovery"] = recovery
    if node_forms is not None:
        report["node_forms"] = node_forms
    quantized, report["kernel_choice"] = _choose_kernels(quantized, config, log)
    report.update(_summary(model, quantized, data, config, feeds=held_out, holdout=holdout, exact_arithmetic=exact))
    if "fidelity_exact_arithmetic" in report:
        log(f"note: {report['fidelity_exact_arithmetic']['why']}")
    report["verdict"] = verdict(report, floor)
    _warn_if_slower(report, log)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return StageResult(quantized, report)


def _choose_node_forms(prepared, quantized, config: Int8Static, recipe: Recipe, data, ranges, layer_stats,
                       details: dict[str, Any], log) -> tuple[Any, dict[str, Any]]:
    """INT8 or float per node class, timed here (dlopt.optimize.kernel_choice.choose_node_forms). Speed
    decides only where accuracy allows: nodes the accuracy budget kept float stay float, and speed can
    only add float nodes (a float node computes what the source computes)."""
    from dlopt.optimize.kernel_choice import NodeFormConfig, choose_node_forms

    excluded = list(details.get("nodes_excluded") or [])
    requantized: dict[str, Any] = {}

    def requantize(names: list[str]):
        model, more = quantize_int8(prepared, config, recipe, data, exclude_nodes=excluded + names, ranges=ranges,
                                    layer_stats=layer_stats)
        requantized.update({k: v for k, v in more.items() if k not in ("ranges", "layer_stats")})
        return model

    feeds = check_feeds(prepared, data, 1)[0]
    result = choose_node_forms(prepared, quantized, feeds, requantize, NodeFormConfig(forms=config.node_forms))
    if result.report["classes"] or config.node_forms == "int8":
        log(f"node forms: {result.report['decision']}")
    if result.report["kept"]:
        details.update(requantized)  # shielded nodes, weight refinement: those of the model kept
        details["nodes_excluded"] = sorted(set(excluded) | set(result.report["float_nodes"]))
    return result.model, result.report


# -- held-out fidelity and the verdict ----------------------------------------------------------------
def fidelity_floor(config: QuantizeScheme | QuantizeConfig) -> float:
    return FIDELITY_FLOORS_DB[config.precision] if config.min_sqnr_db is None else float(config.min_sqnr_db)


def holdout_count(samples: int, config: QuantizeScheme | QuantizeConfig) -> int:
    """How many of `samples` calibration samples are held out: HOLDOUT_FRACTION (config.holdout), at
    least HOLDOUT_MIN, at most half and at most config.fidelity_samples; none below 2 samples."""
    if samples < 2 or config.holdout <= 0:
        return 0
    return max(1, min(max(math.ceil(config.holdout * samples), HOLDOUT_MIN), samples // 2, config.fidelity_samples))


def split_holdout(data: CalibrationData | None, eval_data: CalibrationData | None,
                  config: QuantizeScheme | QuantizeConfig
                  ) -> tuple[CalibrationData | None, list[Feeds] | None, dict[str, Any]]:
    """(calibration data, held-out feeds, report entry). With eval_data its first fidelity_samples
    samples are the held-out set and all of `data` calibrates; else the last holdout_count() samples
    of `data` are held out (deterministic: the same samples every run) and the rest calibrate.
    Measured on the samples it was calibrated on, a detector reported 34 dB and then kept fewer than
    a third of its detections on other photos: fidelity on calibration samples flatters."""
    if data is not None and not isinstance(data, CalibrationData):  # a plain list of feeds
        data = CalibrationData.from_feeds(list(data), source="data")
    if eval_data is not None:
        feeds = [dict(f) for _, f in zip(range(config.fidelity_samples), eval_data)]
        return data, feeds, {"data": "eval-data", "source": eval_data.source,
                             "held_out_indices": list(range(len(feeds))),
                             "calibration_samples": len(data) if data is not None else 0, "warning": None}
    if data is None:
        return None, None, {"data": "synthetic", "source": None, "held_out_indices": [], "calibration_samples": 0,
                            "warning": None}
    total = len(data)
    held = holdout_count(total, config)
    if held == 0:
        return data, None, {"data": "calibration", "source": data.source, "held_out_indices": [],
                            "calibration_samples": total,
                            "warning": f"{data.source} has {total} sample(s): none held out, so fidelity is measured "
                                       "on the calibration samples and flatters; give more samples or --eval-data"}
    calibration = copy.copy(data)  # the same stream, read up to the held-out samples
    calibration.limit = total - held
    indices = list(range(total - held, total))
    feeds = [dict(f) for i, f in enumerate(data) if i >= total - held]
    return calibration, feeds, {"data": "held-out", "source": data.source, "held_out_indices": indices,
                                "calibration_samples": total - held, "warning": None}


def verdict(report: Mapping[str, Any], floor: float) -> dict[str, Any]:
    """Whether the result may be written as a success: every float output's SQNR at or above `floor`
    (in the QDQ graph's own arithmetic when the host's kernels compute it inexactly), and the
    accuracy budget met when one was asked for. Each failed check is a row: what, measured, required."""
    fid = report.get("fidelity_exact_arithmetic") or report["fidelity"]
    failures = []
    for name, m in fid["outputs"].items():
        sqnr = m["sqnr_db"]
        if not m["finite"] or sqnr < floor:
            failures.append({"check": f"output {name} SQNR dB", "measured": sqnr, "required": f">= {floor:g}",
                             "why": "non-finite values" if not m["finite"] else
                             f"quantization noise is {10 ** (-sqnr / 10) * 100:.3g} % of the output's power"})
    budget = report.get("budget")
    if budget is not None and not budget["met"]:
        chosen = budget["chosen"]
        failures.append({"check": f"{budget['evaluator']} drop", "measured": chosen["drop"],
                         "required": f"<= {budget['max_drop']:g}",
                         "why": f"best of {len(budget['candidates'])} candidates, "
                                f"{chosen['excluded_count']} node(s) in float"})
    recovery = report.get("floor_recovery")
    if recovery is not None and failures:
        for row in failures:
            row["why"] += (f"; still below with up to {recovery['max_float_nodes']} of {recovery['ranked_nodes']} "
                           f"nodes in float ({len(recovery['candidates'])} candidates tried)")
    return {"passed": not failures, "floor_sqnr_db": floor, "samples": fid["samples"], "data": fid.get("data"),
            "recovered_nodes": recovery["chosen"]["excluded"] if recovery is not None and not failures else [],
            "failures": failures}


def _choose_kernels(model, config: QuantizeScheme, log) -> tuple[Any, dict[str, Any] | None]:
    """Equivalent graph forms timed on this host (only for target cpu: a phone or a GPU runs other
    kernels than the ones measurable here)."""
    if config.target != "cpu":
        return model, None
    from dlopt.optimize.kernel_choice import KernelChoiceConfig, choose_layernorm_form

    result = choose_layernorm_form(model, KernelChoiceConfig(layernorm=config.layernorm_form))
    if result.report["sites"]:
        log(f"kernel choice: {result.report['decision']}")
    return result.model, result.report


def host_kernels_inexact(recipe: Recipe, cpu: CpuFeatures | None = None) -> bool:
    """Whether this CPU's int8 kernels compute a static QDQ model of `recipe` inexactly: x86 without
    VNNI adds u8*s8 products pairwise in 16 bits, which full-range (non-reduce_range) weights overflow.
    That is the arm64/mobile/cuda recipe measured here: fashion-cnn's arm64 INT8 model measured 8.4 dB
    in this host's kernels and 37.4 dB in its own QDQ arithmetic (what an ARM sdot kernel computes)."""
    cpu = cpu or cpu_features()
    x86 = cpu.machine in ("x86_64", "amd64", "i686", "x86")
    return recipe.mode == "static" and not recipe.reduce_range and x86 and not cpu.vnni


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def padded_feed(model, feeds: Mapping[str, np.ndarray], seq_len: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """`feeds` with their token axis padded to `seq_len` (default: dlopt bench's DEFAULT_SEQ_LEN), the
    shape users run: tokenizers pad batches to a fixed length. Only integer inputs whose axis 1 is
    dynamic in the graph are padded, with 0 (masks are 0 on the padding: ids and type ids there are
    masked out). Returns (feeds, what was padded or None). Timed unpadded, a short calibration sentence
    gave MiniLM 3.43x at seq 16 in this check where dlopt bench gave 2.97x at seq 128 (on a Xeon)."""
    from dlopt.bench import DEFAULT_SEQ_LEN

    seq_len = seq_len or DEFAULT_SEQ_LEN
    specs = {s.name: s for s in graph_inputs(model)}
    token = [k for k, v in feeds.items() if k in specs and np.issubdtype(np.asarray(v).dtype, np.integer)
             and len(specs[k].shape) >= 2 and not _fixed(specs[k].shape[1]) and np.asarray(v).ndim >= 2]
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


def speed_check(float_session, quantized_session, feeds: Mapping[str, np.ndarray], *, rounds: int = 21,
                budget_s: float = 2.0, padding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A quick interleaved latency check of two sessions on one feed (thread CPU time, alternating
    order, at least 3 and at most `rounds` rounds within ~budget_s): medians and the median of the
    per-round FP32/quantized ratios. A warning sign for a recipe that made the model slower on this
    CPU, not a benchmark: `dlopt bench` measures with confidence intervals."""
    from dlopt.bench import InterleavedSampler

    sessions = (float_session, quantized_session)
    inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
    for s, f in zip(sessions, inputs):
        s.run(None, f)  # first run: allocations, prepacking
    sampler = InterleavedSampler([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, inputs)])
    sampler.run_for(budget_s, min_rounds=3, max_rounds=rounds)
    a, b = sampler.samples(0, "cpu"), sampler.samples(1, "cpu")
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    return {"batch": batch, "threads": 1, "rounds": int(a.size), "float_ms": float(np.median(a) * 1e3),
            "quantized_ms": float(np.median(b) * 1e3), "speedup": float(np.median(a / np.maximum(b, 1e-9))),
            "input_shapes": {k: list(np.asarray(v).shape) for k, v in inputs[0].items()},
            "padding": dict(padding) if padding else None}


def feed_description(shapes: Mapping[str, Sequence[int]], padding: Mapping[str, Any] | None = None) -> str:
    """'input_ids[1, 128], attention_mask[1, 128] (12 real tokens padded to 128)': the shapes a speed
    figure was measured on, and the padding where there is any."""
    text = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
    if padding:
        text += f" ({padding['tokens']} real tokens padded to {padding['padded_to']})"
    return text


def _summary(original, quantized, data, config: QuantizeScheme, *, feeds: list[Feeds] | None = None,
             holdout: Mapping[str, Any] | None = None, exact_arithmetic: bool = False) -> dict[str, Any]:
    """Sizes, quantized nodes, fidelity vs the float model on this host's kernels and, with
    exact_arithmetic, also of the QDQ graph's own arithmetic: graph optimizations off, so ORT runs
    DequantizeLinear -> float op -> QuantizeLinear instead of its fused int8 kernels. Fidelity is
    measured on `feeds` (the held-out samples) when given, else on samples of `data` or synthetic ones."""
    holdout = dict(holdout or {"data": "calibration" if data is not None else "synthetic"})
    if not feeds:
        feeds = check_feeds(original, data, config.fidelity_samples, config.input_shapes)
    float_session = cpu_session(original)
    reference = run_outputs(float_session, feeds)
    session = cpu_session(quantized)
    outputs = run_outputs(session, feeds)
    names = [o.name for o in session.get_outputs()]
    if [o.name for o in original.graph.output] != names:
        raise StageError(f"quantization changed the graph outputs {[o.name for o in original.graph.output]} -> "
                         f"{names}", "report this model")
    summary = {"bytes_before": original.ByteSize(), "bytes_after": quantized.ByteSize(),
               "quantized_nodes": quantized_nodes(quantized), "ops_after": op_counts(quantized),
               "fidelity": {"samples": len(feeds), "data": holdout["data"],
                            "input_shapes": {k: list(np.shape(v)) for k, v in feeds[0].items()},
                            "outputs": fidelity_report(compare_runs(reference, outputs, names))},
               "holdout": {k: v for k, v in holdout.items() if k != "warning"},
               "cpu": dataclasses.asdict(cpu_features())}
    if exact_arithmetic:
        exact = run_outputs(cpu_session(quantized, graph_opt_level="disable"), feeds)
        summary["fidelity_exact_arithmetic"] = {
            "samples": len(feeds), "data": holdout["data"],
            "outputs": fidelity_report(compare_runs(reference, exact, names)),
            "why": f"this x86 CPU has no VNNI: its int8 kernels overflow the full-range weights of the "
                   f"{config.target} recipe, so the fidelity above is this host's; the QDQ arithmetic itself, "
                   "what the target's int8 kernels compute, is below"}
    if config.speed_check:
        timed, padding = padded_feed(original, feeds[0])
        summary["speed_check"] = speed_check(float_session, session, timed, padding=padding)
    summary["session"] = runtime_report()
    summary["cpu_label"] = cpu_label()
    return summary


def _warn_if_slower(report: Mapping[str, Any], log) -> None:
    speed = report.get("speed_check")
    if speed and speed["speedup"] < 0.95:
        log(f"warning: the quantized model ran {speed['speedup']:.2f}x FP32 speed in a quick check "
            f"(inputs {feed_description(speed['input_shapes'], speed.get('padding'))}, one thread): slower on "
            f"this CPU; measure with dlopt bench")


# -- files ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeOutcome:
    model_path: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_met(self) -> bool:
        budget = self.report.get("budget")
        return budget is None or bool(budget["met"])

    @property
    def passed(self) -> bool:
        """The fidelity floor held on the held-out samples and the budget, if any, was met."""
        return bool(self.report["verdict"]["passed"])


def failed_path(output: Path) -> Path:
    """Where a result below its floor is kept: OUT.failed.onnx beside OUT, never OUT itself."""
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.failed.onnx")


def quantize_file(model_path: str | os.PathLike, output: str | os.PathLike,
                  config: Scheme | QuantizeConfig = QuantizeConfig(),
                  calibration: str | os.PathLike | CalibrationData | None = None, *,
                  eval_data: str | os.PathLike | CalibrationData | None = None, progress: bool = False,
                  after: tuple[str, ...] = (), log=lambda message: None) -> QuantizeOutcome:
    """Quantize MODEL.onnx to OUTPUT (atomically) and write the JSON report beside it,
    `OUTPUT-stem.quantize.json`. `eval_data` (same formats as `calibration`) is where fidelity is
    measured; without it, the last samples of `calibration` are held out for that.

    A result that fails its verdict (an output below the fidelity floor, a budget not met) is not
    written to OUTPUT: it is kept as OUTPUT-stem.failed.onnx with OUTPUT-stem.failed.quantize.json,
    and the outcome says so (`passed` False); the CLI then exits 1. `after`: the kinds of the stages
    that made MODEL (a recipe's), named in errors."""
    from dlopt.api import report_path_for
    from dlopt.fileio import check_output_path, guard_outputs, json_text, load_onnx, stage_onnx, staged_outputs
    from dlopt.optimize.calibration import load_calibration
    from dlopt.report import environment

    stage = stage_of(config)
    stage.check_config(config)
    src, out = Path(model_path), check_output_path(output)
    report_path = check_output_path(report_path_for(out, "quantize"))
    failed = failed_path(out)
    failed_report = report_path_for(failed, "quantize")

    def named_path(spec):
        return spec if isinstance(spec, (str, os.PathLike)) and not str(spec).startswith("model:") else None

    guard_outputs([src, named_path(calibration), named_path(eval_data)], [out, report_path, failed, failed_report])
    model = load_onnx(src)
    data = load_calibration(calibration, model, limit=config.calibration_samples, image=config.image)
    held = (load_calibration(eval_data, model, limit=config.fidelity_samples, image=config.image)
            if eval_data is not None else None)
    result = stage.apply(model, config, StageContext(data=data, eval_data=held, after=after, progress=progress, log=log))
    if not result.report["verdict"]["passed"]:  # kept under a marked name, never at OUTPUT
        out, report_path = failed, failed_report
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = {"schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION, "input": str(src),
                  "output": str(out), "calibration": data.describe() if data else None,
                  **result.report, "bytes_written": model_tmp.stat().st_size, "environment": environment()}
        outputs.stage(report_path).write_text(json_text(report))
    return QuantizeOutcome(out, report_path, report)


def failure_error(outcome: QuantizeOutcome) -> VerificationError:
    """The error the CLI raises for an outcome that did not pass (exit 1)."""
    v = outcome.report["verdict"]
    checks = "; ".join(f"{f['check']} {_fmt(f['measured'])} (needs {f['required']})" for f in v["failures"])
    # On generated inputs a model can fail a floor it meets on real data (PP-OCRv4 det, weight-only INT8:
    # -4.8 dB on noise images, 24.8 dB on held-out photos), so then the first thing to do is give real samples.
    hint = ("measured on generated inputs, not real data: give real samples with {eval_data=DATA} (or {calibration=DATA}), "
            "then " if v["data"] == "synthetic" else "")
    return VerificationError(
        f"the quantized model failed verification on {v['samples']} {v['data']} samples: {checks}; "
        f"the best effort was kept as {outcome.model_path}, nothing was written to the output path",
        hint + "keep nodes in float ({exclude_nodes=NAMES} / {exclude_ops=TYPES}), use per-channel weights, give more or "
        "more representative {calibration=DATA}, or lower the fidelity floor (min SQNR) knowingly")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_text(report: Mapping[str, Any]) -> str:
    """The human summary every run prints."""
    from dlopt.report import format_table

    lines = [f"size: {report['bytes_before'] / 1e6:.2f} MB -> {report['bytes_after'] / 1e6:.2f} MB "
             f"({report['bytes_before'] / max(report['bytes_after'], 1):.2f}x smaller)"]
    recipe = report.get("recipe")
    if recipe:
        lines.append(f"recipe: int8 {recipe['mode']} ({recipe['quant_format']}), activations {recipe['activation_type']},"
                     f" weights {recipe['weight_type']} {'per-channel' if recipe['per_channel'] else 'per-tensor'}"
                     f"{', reduce_range' if recipe['reduce_range'] else ''}"
                     f"{', calibration ' + recipe['method'] if recipe['mode'] == 'static' else ''}"
                     f"{', GPTQ rounding' if recipe.get('weight_rounding') == 'gptq' else ''}"
                     f"{', bias correction' if recipe.get('bias_correction') else ''}")
        lines += [f"  - {r}" for r in recipe["reasons"]]
    else:
        lines.append(f"recipe: {report.get('precision')}")
    for step in (report.get("normalization") or {}).get("steps", []):
        state = "applied" if step["applied"] else f"not applied ({step.get('reason', '')})"
        lines.append(f"graph normalization {step['step']}: {state}"
                     + (f" ({step['moved']} tensors)" if step["applied"] and "moved" in step else "")
                     + (f" (opset {step['from']} -> {step['to']})" if step["applied"] and "to" in step else ""))
    pre = report.get("preprocess")
    if pre:
        for step in pre["steps"]:
            state = "applied" if step["applied"] else f"skipped ({step.get('reason', '')})"
            extra = f" {step['fused']}" if step.get("fused") else ""
            lines.append(f"pre-processing {step['step']}: {state}{extra}")
    wo = report.get("weight_only")
    if wo:
        lines.append(f"weight-only int8 ({'per-channel' if wo['per_channel'] else 'per-tensor'}): {wo['weights']} "
                     f"weights of {', '.join(f'{k} {v}' for k, v in wo['nodes'].items())}, "
                     f"{wo['float_bytes'] / 1e6:.2f} MB -> {wo['int8_bytes'] / 1e6:.2f} MB; compute stays float")
    q = report.get("quantized_nodes", {})
    lines.append("quantized nodes: " + (", ".join(f"{k} {v}" for k, v in q.items()) or "none"))
    if report.get("nodes_excluded"):
        lines.append(f"kept in float: {', '.join(report['nodes_excluded'])}")
    forms = report.get("node_forms")
    if forms:
        lines.append(f"node forms: {forms['decision']}")
        rows = [[k, len(t["nodes"]), f"{t['float_us']:.0f}", f"{t['int8_us']:.0f}", f"{t['ratio']:.2f}",
                 "float" if forms["kept"] and k in forms["float_classes"] else "int8"]
                for k, t in forms["classes"].items()]
        if rows:
            lines.append(format_table(["node class", "nodes", "float us", "int8 us", "int8/float", "runs as"], rows))
    kernels = report.get("kernel_choice")
    if kernels and kernels["sites"]:
        lines.append(f"kernel choice: {kernels['decision']}")

    def fidelity_table(outputs: Mapping[str, Mapping[str, Any]]) -> str:
        rows = [[name, m["sqnr_db"], m["cosine_mean"], m["cosine_min"], m.get("top1_agreement", "-")]
                for name, m in outputs.items()]
        return format_table(["output", "SQNR dB", "cos mean", "cos min", "top-1 agree"], rows)

    fid = report.get("fidelity")
    if fid:
        lines.append(f"fidelity vs FP32 on {fid['samples']} {fid['data']} samples{_holdout_text(report)}:")
        lines.append(fidelity_table(fid["outputs"]))
    exact = report.get("fidelity_exact_arithmetic")
    if exact:
        lines.append(f"note: {exact['why']}:")
        lines.append(fidelity_table(exact["outputs"]))
    speed = report.get("speed_check")
    if speed:
        lines.append(f"speed (quick check, inputs {feed_description(speed['input_shapes'], speed.get('padding'))}, "
                     f"one thread, {speed['rounds']} rounds, {report.get('cpu_label', 'this CPU')}): "
                     f"{speed['float_ms']:.3g} ms FP32 -> {speed['quantized_ms']:.3g} ms, {speed['speedup']:.2f}x"
                     f"{' (slower than FP32 on this CPU)' if speed['speedup'] < 0.95 else ''}; "
                     "dlopt bench measures with confidence intervals")
    session = report.get("session")
    if session:
        entries = ", ".join(f"{k}={v}" for k, v in session["session_config"].items())
        lines.append(f"sessions: {entries}; denormals {session['denormals']}")
    budget = report.get("budget")
    if budget:
        lines.append(f"accuracy budget ({budget['evaluator']}): FP32 {budget['baseline']:.4f}, allowed drop "
                     f"{budget['max_drop']}: {'met' if budget['met'] else 'NOT met'}")
        rows = [[c["excluded_count"], c["score"], c["drop"], c["latency_ms"], c["bytes"] / 1e6,
                 "yes" if c["within_budget"] else "no", "<-" if c.get("chosen") else ""]
                for c in budget["candidates"]]
        lines.append(format_table(["float nodes", "score", "drop", "ms (1 thread)", "MB", "in budget", "chosen"],
                                  rows))
    recovery = report.get("floor_recovery")
    if recovery:
        lines.append(f"below the fidelity floor: nodes kept in float until the {recovery['evaluator']} reached "
                     f"{recovery['baseline']:g}: {'met' if recovery['met'] else 'NOT met'}")
        rows = [[c["excluded_count"], c["score"], c["latency_ms"], "yes" if c["within_budget"] else "no",
                 "<-" if c.get("chosen") else ""] for c in recovery["candidates"]]
        lines.append(format_table(["float nodes", "lowest SQNR dB", "ms (1 thread)", "meets floor", "chosen"], rows))
    v = report.get("verdict")
    if v:
        floor = f"fidelity floor: every float output >= {v['floor_sqnr_db']:g} dB SQNR on the {v['data']} samples"
        if v["passed"]:
            lines.append(f"{floor}: met" + (f" (kept in float to get there: {', '.join(v['recovered_nodes'])})"
                                             if v["recovered_nodes"] else ""))
        else:
            lines.append(f"{floor}: FAILED")
            lines.append(format_table(["check", "measured", "required", "why"],
                                      [[f["check"], f["measured"], f["required"], f["why"]] for f in v["failures"]]))
    return "\n".join(lines)


def _holdout_text(report: Mapping[str, Any]) -> str:
    held = report.get("holdout") or {}
    indices = held.get("held_out_indices") or []
    if held.get("data") == "held-out" and indices:
        return (f" (samples {indices[0]}-{indices[-1]} of {held['source']}, held out: calibrated on the first "
                f"{held['calibration_samples']})")
    if held.get("data") == "eval-data":
        return f" ({held['source']}; not used to calibrate)"
    return ""


# -- the stages -------------------------------------------------------------------------------------------
SCHEME_KINDS: dict[type, str] = {Int8Dynamic: "int8-dynamic", Int8Static: "int8-static",
                                 Int8WeightOnly: "int8-weight-only", Int4WeightOnly: "int4-weight-only", Fp16: "fp16"}


def _onnx_problem(model, config, before) -> str | None:
    import onnx

    return None if isinstance(model, onnx.ModelProto) else f"got a {type(model).__name__}"


def _float_problem(model, config, before) -> str | None:
    import onnx

    if not isinstance(model, onnx.ModelProto):
        return None  # the ONNX check says so
    found = {k: v for k, v in quantized_nodes(model).items() if not k.startswith("QDQ:")}
    if found:
        return (f"it already holds quantized ops ({', '.join(f'{k} {v}' for k, v in found.items())}): "
                "quantize its float source")
    return None


def _outputs_problem(model, config, before) -> str | None:
    names, wanted = [o.name for o in model.graph.output], [o.name for o in before.graph.output]
    return None if names == wanted else f"its outputs {names} are not its input's {wanted}"


ONNX_MODEL = Check("an ONNX model", _onnx_problem)
FLOAT_ONNX = Check("a float ONNX model", _float_problem)
SAME_OUTPUTS = Check("the graph outputs of its input", _outputs_problem)


def _run(model, config, context: StageContext) -> StageResult:
    return quantize(model, config, context.data, eval_data=context.eval_data, progress=context.progress,
                    log=context.log)


def _quantize_stage(kind: str, config: type, summary: str, validate=None) -> Stage:
    return Stage(kind=kind, config=config, run=_run, takes="onnx", makes="onnx", requires=(ONNX_MODEL, FLOAT_ONNX),
                 ensures=(SAME_OUTPUTS,), summary=summary, validate=validate)


QUANTIZE = _quantize_stage("quantize", QuantizeConfig, "int8/int4/fp16, the scheme chosen for the model, target "
                           "and CPU (mode auto), recorded in the report", validate_config)
INT8_DYNAMIC = _quantize_stage("int8-dynamic", Int8Dynamic, "INT8 weights, activations quantized per call")
INT8_STATIC = _quantize_stage("int8-static", Int8Static, "static INT8 QDQ, calibrated on data")
INT8_WEIGHT_ONLY = _quantize_stage("int8-weight-only", Int8WeightOnly, "INT8 weights, float compute")
INT4_WEIGHT_ONLY = _quantize_stage("int4-weight-only", Int4WeightOnly, "4-bit block-quantized weights (MatMulNBits)")
FP16 = _quantize_stage("fp16", Fp16, "FP16 weights and compute, overflowing nodes kept FP32")
_STAGES_BY_CONFIG = {stage.config: stage for stage in (QUANTIZE, INT8_DYNAMIC, INT8_STATIC, INT8_WEIGHT_ONLY,
                                                       INT4_WEIGHT_ONLY, FP16)}


def stage_of(config: Scheme | QuantizeConfig) -> Stage:
    stage = _STAGES_BY_CONFIG.get(type(config))
    if stage is None:
        raise InputError(f"quantize takes a scheme config or a QuantizeConfig, not {type(config).__name__}",
                         f"use one of {', '.join(c.__name__ for c in _STAGES_BY_CONFIG)}")
    return stage


__all__ = [
    "METHODS",
    "MODES",
    "PRECISIONS",
    "ROUNDINGS",
    "TARGETS",
    "CpuFeatures",
    "FP16",
    "Fp16",
    "INT4_WEIGHT_ONLY",
    "INT8_DYNAMIC",
    "INT8_STATIC",
    "INT8_WEIGHT_ONLY",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8Static",
    "Int8WeightOnly",
    "QUANTIZE",
    "SCHEME_KINDS",
    "choose_mode",
    "stage_of",
    "FIDELITY_FLOORS_DB",
    "QuantizeConfig",
    "QuantizeOutcome",
    "Recipe",
    "calibrate",
    "choose_recipe",
    "cpu_features",
    "failed_path",
    "failure_error",
    "fidelity_floor",
    "host_kernels_inexact",
    "quantize",
    "quantize_file",
    "quantize_int8",
    "quantized_nodes",
    "speed_check",
    "split_holdout",
    "summary_text",
    "validate_config",
]
