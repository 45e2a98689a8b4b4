"""The quantization stages of the registry (dlopt.stage): `quantize` (the front door) and one per
scheme, with what they require of their input and ensure of their output."""

from __future__ import annotations

import math
from typing import Any

from dlopt.optimize.fp16 import Fp16
from dlopt.optimize.int4 import Int4WeightOnly
from dlopt.optimize.quantize.heldout import quantized_nodes
from dlopt.optimize.quantize.pipeline import quantize
from dlopt.optimize.quantize.schemes import Int8Dynamic, Int8Static, Int8WeightOnly, QuantizeConfig, validate_config
from dlopt.stage import Artifact, Check, StageContext, StageInput, StageResult, register_stage

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
        return (
            f"it already holds quantized ops ({', '.join(f'{k} {v}' for k, v in found.items())}): "
            "quantize its float source"
        )
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
    return quantize(
        model, config, context.data, eval_data=context.eval_data, progress=context.progress, log=context.log
    )


# One Stage per scheme and the front door; the same run and checks, each its own config class.
def _write(given: StageInput, config, context: StageContext) -> Artifact:
    from dlopt.optimize.quantize.files import write_quantized  # files.py finds these stages by kind, lazily

    return write_quantized(given, config, context)


def _made_precision(config) -> str | None:
    """The precision a scheme's config asks for (quantize's precision: int8, int4, fp16; the schemes: None)."""
    return getattr(config, "precision", None)


_CHECKS: dict[str, Any] = {
    "takes": "onnx",
    "makes": "onnx",
    "ensures": (SAME_OUTPUTS,),
    "writer": _write,
    "reads": ("calibration", "eval_data"),
    "quantizes": True,
    "precision": _made_precision,
}


@register_stage(
    kind="quantize",
    config=QuantizeConfig,
    requires=(ONNX_MODEL, FLOAT_ONNX),
    validate=validate_config,
    summary="int8/int4/fp16, the scheme chosen for the model, target and CPU (mode auto), recorded in the report",
    **_CHECKS,
)
def quantize_stage(model, config: QuantizeConfig, context: StageContext) -> StageResult:
    return _run(model, config, context)


@register_stage(
    kind="int8-dynamic",
    config=Int8Dynamic,
    requires=(ONNX_MODEL, FLOAT_ONNX, DYNAMIC_TARGET),
    summary="INT8 weights, activations quantized per call",
    **_CHECKS,
)
def int8_dynamic_stage(model, config: Int8Dynamic, context: StageContext) -> StageResult:
    return _run(model, config, context)


@register_stage(
    kind="int8-static",
    config=Int8Static,
    requires=(ONNX_MODEL, FLOAT_ONNX),
    summary="static INT8 QDQ, calibrated on data",
    **_CHECKS,
)
def int8_static_stage(model, config: Int8Static, context: StageContext) -> StageResult:
    return _run(model, config, context)


@register_stage(
    kind="int8-weight-only",
    config=Int8WeightOnly,
    requires=(ONNX_MODEL, FLOAT_ONNX),
    summary="INT8 weights, float compute",
    **_CHECKS,
)
def int8_weight_only_stage(model, config: Int8WeightOnly, context: StageContext) -> StageResult:
    return _run(model, config, context)


@register_stage(
    kind="int4-weight-only",
    config=Int4WeightOnly,
    requires=(ONNX_MODEL, FLOAT_ONNX),
    summary="4-bit block-quantized weights (MatMulNBits)",
    **_CHECKS,
)
def int4_weight_only_stage(model, config: Int4WeightOnly, context: StageContext) -> StageResult:
    return _run(model, config, context)


@register_stage(
    kind="fp16",
    config=Fp16,
    requires=(ONNX_MODEL, FLOAT_ONNX),
    summary="FP16 weights and compute, overflowing nodes kept FP32",
    **{**_CHECKS, "precision": lambda config: "fp16"},
)
def fp16_stage(model, config: Fp16, context: StageContext) -> StageResult:
    return _run(model, config, context)
