"""What every quantization scheme's config shares: its data, what stays float, its target, and how the
result is verified (a fidelity floor on held-out samples, a quick speed check).

The schemes themselves: Int8Dynamic, Int8Static, Int8WeightOnly (optimize/quantize.py), Int4WeightOnly
(optimize/int4/) and Fp16 (optimize/fp16.py). Each adds only the fields its transformation reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from dlopt.errors import InputError
from dlopt.images import ImagePreprocess
from dlopt.metrics import VERDICT_CONFIDENCE
from dlopt.optimize.kernel_choice import LAYERNORM_FORMS, LayerNormForm
from dlopt.optimize.trim_padding import TRIM_MODES, TrimMode

# Held out of the calibration data for the fidelity check (the last samples): at least this share and
# HOLDOUT_MIN, and every sample beyond the first CALIBRATION_KEEP, at most half of the samples and at most
# fidelity_samples. Static INT8's ranges settle on a few samples while a verdict on few samples is noise:
# a layout detector's 4 held-out pages of 16 (46 boxes) read Jaccard 0.92, 12 other pages 0.883.
HOLDOUT_FRACTION = 0.2
HOLDOUT_MIN = 4
CALIBRATION_KEEP = 8


@dataclass(frozen=True, kw_only=True)
class QuantizeScheme:
    """The fields every quantization scheme has. Not a stage config itself: use one of the schemes."""

    precision: ClassVar[str]  # int8 | int4 | fp16: picks the default fidelity floor
    exclude_nodes: tuple[str, ...] = ()  # node names kept in float
    exclude_ops: tuple[str, ...] = ()  # op types kept in float
    target: str = "cpu"  # a target of dlopt.targets that runs ONNX models (quantize_targets())
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: the shapes of synthetic inputs
    image: ImagePreprocess | None = None  # how a folder of images is fed; None: its defaults
    calibration_samples: int | None = None  # cap on samples read; None: all of them
    fidelity_samples: int = 32
    min_sqnr_db: float | None = None  # fidelity floor per float output; None: the precision's default
    # the task metric the verdict is on (dlopt.metrics.METRIC_TABLE); None: chosen from the outputs
    metric: str | None = None
    metric_floor: float | None = None  # None: the table's floor (sqnr: min_sqnr_db or the precision's)
    # detection: the score a box must reach to count; map: the binarization threshold (the user's own
    # post-processing's); None: the metric's default (dlopt.metrics.CONFIDENCE 0.25, MAP_THRESHOLD 0.3)
    score_threshold: float | None = None
    holdout: float = HOLDOUT_FRACTION  # share of the calibration samples held out to measure fidelity
    # the verdict judges the task metric's one-sided bound at this confidence over the held-out samples
    # (dlopt.metrics.metric_bounds); 0: the point estimate, as measured on those samples
    verdict_confidence: float = VERDICT_CONFIDENCE
    strict_verdict: bool = False  # a single model is judged by its bound too, not by its estimate (see heldout)
    speed_check: bool = True  # time FP32 vs the result (b1, one thread, ~2 s) and warn when it is slower
    # target cpu: residual sums before LayerNorms written so that ORT does not fuse them into its
    # SkipLayerNormalization when that measures slower here (dlopt.optimize.kernel_choice); auto: timed
    layernorm_form: LayerNormForm | str = "auto"  # or FILE.quantize.json: that report's decision, replayed
    # models with an attention mask: slice the token inputs to the batch's longest real length
    # (dlopt.optimize.trim_padding); auto: only where held-out inputs confirm equivalence
    trim_padding: TrimMode = "auto"

    def __post_init__(self) -> None:
        check_common(self)


def quantize_targets() -> list[str]:
    """The targets a quantized ONNX model can be made for: the registry's ONNX Runtime targets."""
    from dlopt.targets import target_names

    return target_names(kind="onnxruntime")


def check_common(config) -> None:
    """The checks of the shared fields (also run on the `quantize` front door's request)."""
    name = type(config).__name__
    if config.target not in quantize_targets():
        raise InputError(f"{name}: unknown target {config.target!r}", f"choose one of {', '.join(quantize_targets())}")
    if not 0 <= config.holdout < 1:
        raise InputError(f"{name}: hold-out share {config.holdout} is out of range", "give a value in [0, 1), e.g. 0.2")
    if not 0 <= config.verdict_confidence < 1:
        raise InputError(
            f"{name}: verdict confidence {config.verdict_confidence} is out of range",
            "give a value in [0, 1), e.g. 0.95 (0: judge the point estimate)",
        )
    if config.min_sqnr_db is not None and math.isnan(config.min_sqnr_db):
        raise InputError(f"{name}: the fidelity floor (min SQNR) is not a number", "give a floor in dB, e.g. 15")
    if config.metric is not None:
        from dlopt.metrics import metric_info

        metric_info(config.metric)
    if config.score_threshold is not None and not 0 <= config.score_threshold <= 1:
        raise InputError(
            f"{name}: score threshold {config.score_threshold} is out of range",
            "give the score your post-processing keeps boxes above, in [0, 1], e.g. 0.5",
        )
    if config.metric_floor is not None and math.isnan(config.metric_floor):
        raise InputError(f"{name}: the metric floor is not a number", "give a floor in the metric's unit, e.g. 0.9")
    if config.layernorm_form not in LAYERNORM_FORMS and not str(config.layernorm_form).endswith(".json"):
        raise InputError(
            f"{name}: unknown layernorm form {config.layernorm_form!r}",
            f"choose one of {', '.join(LAYERNORM_FORMS)}, or a FILE.quantize.json to replay",
        )
    if config.trim_padding not in TRIM_MODES:
        raise InputError(
            f"{name}: unknown trim-padding mode {config.trim_padding!r}", f"choose one of {', '.join(TRIM_MODES)}"
        )
    if config.fidelity_samples < 1:
        raise InputError(f"{name}: fidelity_samples {config.fidelity_samples} must be >= 1", "e.g. 32")
    if config.calibration_samples is not None and config.calibration_samples < 1:
        raise InputError(
            f"{name}: calibration_samples {config.calibration_samples} must be >= 1", "give a positive cap, or none"
        )


def check_excluded_nodes(exclude_nodes, names: set[str]) -> None:
    """Every node a scheme is asked to keep in float must be a node of the model (`names`): a typo would
    otherwise quantize the node the user meant to protect, silently."""
    unknown = [n for n in exclude_nodes if n not in names]
    if unknown:
        sample = ", ".join(sorted(n for n in names if n)[:5])
        raise InputError(
            f"{{exclude_nodes=NAMES}}: nodes not in the model: {', '.join(unknown)}",
            f"use node names from the graph (e.g. {sample})",
        )


__all__ = [
    "CALIBRATION_KEEP",
    "HOLDOUT_FRACTION",
    "check_excluded_nodes",
    "HOLDOUT_MIN",
    "LAYERNORM_FORMS",
    "QuantizeScheme",
    "check_common",
    "quantize_targets",
]
