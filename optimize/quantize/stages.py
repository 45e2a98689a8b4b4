"""The quantization stages of the registry (dlopt.stage.STAGES): `quantize` (the front door) and one per
scheme, with what they require of their input and ensure of their output."""

from __future__ import annotations

import math

from dlopt.errors import InputError
from dlopt.optimize.fp16 import Fp16
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.quantize.pipeline import quantize
from dlopt.optimize.quantize.schemes import (Int8Dynamic, Int8Static, Int8WeightOnly, QuantizeConfig, Scheme,
                                             validate_config)
from dlopt.optimize.quantize.verification import quantized_nodes
from dlopt.stage import Check, Stage, StageContext, StageResult


# -- the stages -------------------------------------------------------------------------------------------


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
    elements = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for tensor in model.graph.initializer:
        if tensor.data_type in elements:
            elements[tensor.data_type] += math.prod(tensor.dims)
    if elements[onnx.TensorProto.FLOAT16] > elements[onnx.TensorProto.FLOAT]:
        return "it is already FP16 (most of its weights are float16): quantize its float32 source"
    return None


def _outputs_problem(model, config, before) -> str | None:
    names, wanted = [o.name for o in model.graph.output], [o.name for o in before.graph.output]
    return None if names == wanted else f"its outputs {names} are not its input's {wanted}"


def _dynamic_target_problem(model, config, before) -> str | None:
    from dlopt.targets import capabilities

    form = capabilities(config.target).int8
    if form is not None and not form.dynamic:
        return f"the {config.target} target runs static QDQ only ({form.note}): use int8-static"
    return None


ONNX_MODEL = Check("an ONNX model", _onnx_problem)
DYNAMIC_TARGET = Check("a target that runs dynamic INT8", _dynamic_target_problem)
FLOAT_ONNX = Check("a float ONNX model", _float_problem)
SAME_OUTPUTS = Check("the graph outputs of its input", _outputs_problem)


def _run(model, config, context: StageContext) -> StageResult:
    return quantize(model, config, context.data, eval_data=context.eval_data, progress=context.progress,
                    log=context.log)


# What the core uses of quantization besides `apply` (dlopt.api's quantize verb, dlopt run's failed-result
# handling, package's calibration): the same on every quantize stage; modules that import this one, lazily.
HELPERS = {
    "quantize_file": "dlopt.optimize.quantize.files:quantize_file",  # a model file in, model + report out
    "failure_error": "dlopt.optimize.quantize.files:failure_error",  # the VerificationError of a failed outcome
    "failed_path": "dlopt.optimize.quantize.files:failed_path",  # where a failed result is kept: OUT.failed.onnx
    "summary_text": "dlopt.optimize.quantize.report:summary_text",  # what `dlopt quantize` prints
    "load_calibration": "dlopt.data:load_data",  # a data spec as CalibrationData (dlopt.data)
    # what a search over quantization candidates asks (dlopt.search): the held-out split, the accuracy
    # evaluator, the graph facts the recipe is chosen by, the calibration methods to try
    "split_holdout": "dlopt.optimize.quantize.verification:split_holdout",
    "build_evaluator": "dlopt.optimize.sensitivity:build_evaluator",
    "op_counts": "dlopt.optimize.preprocess:op_counts",
    "looks_like_transformer": "dlopt.optimize.preprocess:looks_like_transformer",
    "METHODS": "dlopt.optimize.quantize.schemes:METHODS",
    # exported LM folders (genai_config.json + model.onnx): a folder in, a folder out (dlopt.optimize.quantize_lm)
    "quantize_lm_folder": "dlopt.optimize.quantize_lm:quantize_lm_folder",
    "QuantizeLm": "dlopt.optimize.quantize_lm:QuantizeLm",
    "lm_summary_text": "dlopt.optimize.quantize_lm:summary_text",
    "check_lm_config": "dlopt.optimize.quantize_lm:check_config",
}


def _quantize_stage(kind: str, config: type, summary: str, validate=None, requires: tuple[Check, ...] = ()) -> Stage:
    return Stage(kind=kind, config=config, run=_run, takes="onnx", makes="onnx",
                 requires=(ONNX_MODEL, FLOAT_ONNX, *requires), ensures=(SAME_OUTPUTS,), summary=summary,
                 validate=validate, helpers=HELPERS)


QUANTIZE = _quantize_stage("quantize", QuantizeConfig, "int8/int4/fp16, the scheme chosen for the model, target "
                           "and CPU (mode auto), recorded in the report", validate_config)
INT8_DYNAMIC = _quantize_stage("int8-dynamic", Int8Dynamic, "INT8 weights, activations quantized per call",
                               requires=(DYNAMIC_TARGET,))
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
