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
- an accuracy budget (optimize/accuracy_budget.py) and a fidelity report against the float model.
INT4 and FP16 live in optimize/int4/ and optimize/fp16.py; `quantize` dispatches to them.

Where each part is (one hop from here):
  schemes.py       the scheme configs (Int8Dynamic, Int8Static, Int8WeightOnly) and QuantizeConfig, the front door
  recipe.py        the scheme a request resolves to, and the INT8 recipe for the model, target and CPU
  pipeline.py      `quantize`: normalization, pre-processing, INT8/INT4/FP16, budget, recovery, kernel choices
  int8.py          INT8 through ORT's quantizers; float nodes shielded
  calibrate.py     streamed calibration
  smoothquant.py   SmoothQuant for transformers
  heldout.py       held-out samples, the fidelity floor and verdict, the quick speed check
  stages.py        the Stages of the registry (dlopt.stage), with their requires/ensures checks
  files.py         quantize_file: a model file in, the model and its report out, atomically
  report.py        the summary `dlopt quantize` prints
"""

from __future__ import annotations

from dlopt.optimize.quantize.calibrate import calibrate
from dlopt.optimize.quantize.files import QuantizeOutcome, failed_path, quantize_failure, quantize_file, stage_of
from dlopt.optimize.quantize.heldout import (
    feed_description,
    fidelity_floor,
    holdout_count,
    padded_feed,
    quantized_nodes,
    speed_check,
    split_holdout,
    verdict,
)
from dlopt.optimize.quantize.int8 import quantize_int8, shield_float_nodes
from dlopt.optimize.quantize.int8_recipe import (
    Int8Recipe,
    choose_mode,
    choose_recipe,
    cpu_record,
    host_kernels_inexact,
    resolve_scheme,
)
from dlopt.optimize.quantize.pipeline import quantize
from dlopt.optimize.quantize.schemes import (
    FIDELITY_FLOORS_DB,
    METHODS,
    MODES,
    PRECISIONS,
    RECOVERY_MAX_FLOAT_SHARE,
    REPORT_SCHEMA,
    REPORT_SCHEMA_VERSION,
    ROUNDINGS,
    SCHEME_KINDS,
    Fp16,
    Int4WeightOnly,
    Int8Dynamic,
    Int8Scheme,
    Int8Static,
    Int8WeightOnly,
    QuantizeConfig,
    Scheme,
    check_int8,
    check_static,
    validate_config,
)
from dlopt.optimize.quantize.smoothquant import smooth_activations
from dlopt.optimize.quantize.stages import (
    FLOAT_ONNX,
    ONNX_MODEL,
    SAME_OUTPUTS,
    fp16_stage,
    int4_weight_only_stage,
    int8_dynamic_stage,
    int8_static_stage,
    int8_weight_only_stage,
    quantize_stage,
)
from dlopt.optimize.quantize.summary import quantize_text
from dlopt.optimize.quantize_scheme import HOLDOUT_FRACTION, HOLDOUT_MIN, quantize_targets

__all__ = [
    "FIDELITY_FLOORS_DB",
    "FLOAT_ONNX",
    "Fp16",
    "HOLDOUT_FRACTION",
    "HOLDOUT_MIN",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8Scheme",
    "Int8Static",
    "Int8WeightOnly",
    "METHODS",
    "MODES",
    "ONNX_MODEL",
    "PRECISIONS",
    "QuantizeConfig",
    "QuantizeOutcome",
    "RECOVERY_MAX_FLOAT_SHARE",
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "ROUNDINGS",
    "Int8Recipe",
    "SAME_OUTPUTS",
    "SCHEME_KINDS",
    "Scheme",
    "calibrate",
    "check_int8",
    "check_static",
    "choose_mode",
    "choose_recipe",
    "cpu_record",
    "resolve_scheme",
    "failed_path",
    "quantize_failure",
    "feed_description",
    "fidelity_floor",
    "holdout_count",
    "host_kernels_inexact",
    "padded_feed",
    "quantize",
    "quantize_file",
    "quantize_int8",
    "quantized_nodes",
    "shield_float_nodes",
    "smooth_activations",
    "speed_check",
    "split_holdout",
    "quantize_targets",
    "stage_of",
    "quantize_stage",
    "int8_dynamic_stage",
    "int8_static_stage",
    "int8_weight_only_stage",
    "int4_weight_only_stage",
    "fp16_stage",
    "quantize_text",
    "validate_config",
    "verdict",
]
