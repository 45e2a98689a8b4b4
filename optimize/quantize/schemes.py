"""The quantization scheme configs (Int8Dynamic, Int8Static, Int8WeightOnly; Int4WeightOnly and Fp16 live
beside their code) and QuantizeConfig, the `quantize` front door that resolves to one of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dlopt.errors import InputError
from dlopt.images import ImagePreprocess
from dlopt.metrics import VERDICT_CONFIDENCE
from dlopt.optimize.fp16 import Fp16
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.kernel_choice import NODE_FORMS, LayerNormForm, NodeForms
from dlopt.optimize.kernel_decisions import is_replay
from dlopt.optimize.quantize_scheme import HOLDOUT_FRACTION, QuantizeScheme, check_common
from dlopt.optimize.trim_padding import TrimMode

PRECISIONS = ("int8", "int4", "fp16")
MODES = ("auto", "dynamic", "static", "weight-only")
METHODS = ("minmax", "entropy", "percentile")
ROUNDINGS = ("auto", "nearest", "gptq")

Precision = Literal["int8", "int4", "fp16"]
Mode = Literal["auto", "dynamic", "static", "weight-only"]
Method = Literal["minmax", "entropy", "percentile"]
Rounding = Literal["auto", "nearest", "gptq"]
Int8Mode = Literal["dynamic", "static", "weight-only"]  # an INT8 scheme's mode (the class decides it)
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
# Recovery compares up to this many candidates on the same held-out samples (0, 1, 2, 4, ... float nodes up
# to half the nodes, and two bisection steps) and keeps the first that clears the floor there: the one that
# drew the luckiest samples. So it aims at, and the verdict on its result judges, the bound at the confidence
# the comparisons leave (Bonferroni: 1 - (1 - c) / 10, 0.995 for 0.95). Aimed at the 95 % bound, a layout
# detector's recovery kept 17 nodes in float to read 0.943 (bound 0.912) on its 8 pages; 48 other pages
# read 0.865, what no recovery at all reads (0.856).
RECOVERY_COMPARISONS = 10


def selection_confidence(confidence: float, comparisons: int = RECOVERY_COMPARISONS) -> float:
    """The one-sided confidence each of `comparisons` candidates is judged at so that the one chosen among
    them holds at `confidence` (Bonferroni); 0 stays 0 (the estimate is judged)."""
    return 1.0 - (1.0 - confidence) / comparisons if confidence > 0 else 0.0


# the JSON report beside every quantized model: documented in dlopt/schemas/quantize.schema.json
REPORT_SCHEMA = "dlopt.quantize"
REPORT_SCHEMA_VERSION = 1


# -- the scheme configs -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Int8(QuantizeScheme):
    """The fields of every INT8 scheme (ORT's quantizers, the accuracy budget, recovery below the floor)."""

    precision: ClassVar[str] = "int8"
    mode: ClassVar[Int8Mode]
    per_channel: bool = True
    preprocess: bool = True  # fusions, constant folding, shape inference, each checked
    # decomposed hard-swish / SiLU / GELU as single ops before calibration (dlopt.optimize.fuse_activations)
    fuse_activations: bool = True
    max_accuracy_drop: float | None = None
    evaluator: str | None = None  # a METRIC_TABLE name | FILE.py:FUNCTION | model:NAME[:metric]; None: the task metric
    # below the floor: keep the nodes that add the most noise in float until it holds (the budget
    # search of optimize/accuracy_budget.py); False: fail at once
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
    mode: ClassVar[Int8Mode] = "dynamic"


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnly(_Int8):
    """INT8 weights dequantized to float before each op: ~4x smaller, float compute, needs no data."""

    VERSION: ClassVar[int] = 1
    mode: ClassVar[Int8Mode] = "weight-only"


@dataclass(frozen=True, kw_only=True)
class Int8Static(_Int8):
    """Static QDQ: activation ranges calibrated once on data, weights refined against the layers' inputs."""

    VERSION: ClassVar[int] = 1
    mode: ClassVar[Int8Mode] = "static"
    method: Method | None = None  # calibration; None: percentile for transformers and CNNs, else minmax
    percentile: float | None = None  # for percentile calibration; None: 99.99 for CNNs, 99.999 otherwise
    weight_rounding: Rounding = "auto"  # Conv/Gemm weights: auto = GPTQ with calibration data; nearest = ORT's
    bias_correction: bool = True  # fold each Conv/Gemm's mean rounding shift into its bias
    rounding_samples: int = 64  # calibration samples for the layer statistics of both
    # target cpu: node classes (depthwise, pointwise, dense, small-channel conv, gemm) whose INT8 kernels
    # time slower here than float stay float, if the whole model then runs faster; int8: all
    node_forms: NodeForms | str = "auto"  # or FILE.quantize.json: that report's decisions, replayed

    def __post_init__(self) -> None:
        super().__post_init__()
        check_static(self)


Int8Scheme = Int8Dynamic | Int8Static | Int8WeightOnly
Scheme = Int8Dynamic | Int8Static | Int8WeightOnly | Int4WeightOnly | Fp16
# each scheme config class -> its stage kind (dlopt.stage.STAGES)
SCHEME_KINDS: dict[type, str] = {
    Int8Dynamic: "int8-dynamic",
    Int8Static: "int8-static",
    Int8WeightOnly: "int8-weight-only",
    Int4WeightOnly: "int4-weight-only",
    Fp16: "fp16",
}
INT8_SCHEMES: dict[str, type] = {"dynamic": Int8Dynamic, "static": Int8Static, "weight-only": Int8WeightOnly}


def check_int8(config) -> None:
    if config.smoothing is not None and not 0 < config.smoothing < 1:
        raise InputError(f"smoothing alpha {config.smoothing} is out of range", "give a value in (0, 1), e.g. 0.75")
    if config.max_accuracy_drop is not None and config.max_accuracy_drop < 0:
        raise InputError(
            f"the accuracy budget (max accuracy drop) {config.max_accuracy_drop} is negative", "give a drop >= 0"
        )


def check_static(config) -> None:
    if config.method is not None and config.method not in METHODS:
        raise InputError(f"unknown calibration method {config.method!r}", f"choose one of {', '.join(METHODS)}")
    if config.percentile is not None and not 0 < config.percentile <= 100:
        raise InputError(f"percentile {config.percentile} is out of range", "give a value in (0, 100], e.g. 99.999")
    if config.weight_rounding not in ROUNDINGS:
        raise InputError(f"unknown weight rounding {config.weight_rounding!r}", f"choose one of {', '.join(ROUNDINGS)}")
    if config.node_forms not in NODE_FORMS and not is_replay(config.node_forms):
        raise InputError(
            f"unknown node forms {config.node_forms!r}",
            f"choose one of {', '.join(NODE_FORMS)}, or a FILE.quantize.json whose decisions to replay",
        )
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
    target: str = "cpu"  # a target of dlopt.targets that runs ONNX models
    preprocess: bool = True  # fusions, constant folding, shape inference (int8), each checked
    fuse_activations: bool = True  # int8: decomposed activations as single ops before calibration
    calibration_samples: int | None = None  # cap on samples read; None: all of them
    percentile: float | None = None  # for percentile calibration; None: 99.99 for CNNs, 99.999 otherwise
    max_accuracy_drop: float | None = None
    evaluator: str | None = None  # a METRIC_TABLE name | FILE.py:FUNCTION | model:NAME[:metric]; None: the task metric
    fidelity_samples: int = 32
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: the shapes of synthetic inputs
    image: ImagePreprocess | None = None  # how a folder of images is fed; None: its defaults
    min_sqnr_db: float | None = None  # fidelity floor per float output; None: FIDELITY_FLOORS_DB[precision]
    metric: str | None = None  # the verdict's task metric (dlopt.metrics.METRIC_TABLE); None: chosen from the outputs
    metric_floor: float | None = None  # None: the metric table's floor
    score_threshold: float | None = None  # detection: a box's least score; map: binarization (None: defaults)
    holdout: float = HOLDOUT_FRACTION  # share of the calibration samples held out to measure fidelity
    verdict_confidence: float = VERDICT_CONFIDENCE  # the task metric's bound (0: the point estimate only)
    strict_verdict: bool = False  # a single model is judged by its bound too, not by its estimate (see heldout)
    recover: bool = True  # int8 below the floor: keep the noisiest nodes in float until it holds
    leave_one_out_limit: int = 80
    smoothing: float | None = None  # SmoothQuant alpha (int8 transformers with data); see _Int8
    smoothing_samples: int = 64
    weight_rounding: Rounding = "auto"
    bias_correction: bool = True
    rounding_samples: int = 64
    speed_check: bool = True
    layernorm_form: LayerNormForm | str = "auto"  # or FILE.quantize.json: that report's decision, replayed
    node_forms: NodeForms | str = "auto"  # or FILE.quantize.json: that report's decisions, replayed
    trim_padding: TrimMode = "auto"


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
