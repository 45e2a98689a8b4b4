"""PT2E: a torch model lowered through ExecuTorch to a .pte program for XNNPACK, FP32 or INT8.

The transformation behind the `xnnpack` target (dlopt.targets.xnnpack runs the programs it makes).
FP32 lowers the exported graph as it is; INT8 first quantizes it with ExecuTorch's XNNPACKQuantizer
(per-channel symmetric weights, per-tensor activations) through torchao's prepare_pt2e /
convert_pt2e with calibration data, with conv -> ReLU6 quantized as one fused unit (see
_clamp_fusing_quantizer_class), and by default with GPTQ-rounded weights and bias correction folded
into the float weights before convert, on the quantizer's own grid (see _refine_int8_weights:
EfficientNet-Lite0's int8 program 16.0 dB -> 22.9 dB logit SQNR vs FP32, the same kernels).

The source is the torch model (a reference model or a factory), not the ONNX file: ExecuTorch
lowers torch programs. `dlopt package MODEL.onnx --target mobile --torch-source NAME` puts the .pte
in the bundle after checking its outputs against the ONNX model.

A .pte program has static shapes (those of the example it was exported with) and a fixed memory
layout (dim order) per input, which the runtime does not check: lower_to_pte exports from row-major
copies of the example (PteProgram lays every input out in the order the program expects). Its
inputs are taken positionally in `input_names` order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dlopt.errors import InputError, StageError
from dlopt.quiet import quiet_libraries  # ExecuTorch and torchao print while importing and lowering)
from dlopt.targets.xnnpack import require_executorch, standard_layout

if TYPE_CHECKING:
    import torch

# Bumped whenever lower_to_pte's output changes numerically, so that caches of .pte files (the
# benchmarks') are not reused across lowerings. 2: contiguous examples, conv+ReLU6 quantized as one.
# 3: int8 weights GPTQ-rounded, biases corrected (_refine_int8_weights).
LOWERING_REVISION = 3

WEIGHT_ROUNDINGS = ("gptq", "nearest")


def _Positional(module, input_names: Sequence[str]) -> torch.nn.Module:  # (named as the class it was: tests use it)
    """Wraps a module taking keyword tensors so that it takes them positionally, in a fixed order:
    a .pte program's inputs are a flat list."""
    import torch

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self.names = tuple(input_names)

        def forward(self, *args):
            out = self.inner(**dict(zip(self.names, args)))
            if isinstance(out, dict):
                out = tuple(out.values())
            return out

    return Positional().eval()


def lower_to_pte(
    module,
    example: Mapping[str, Any],
    *,
    input_names: Sequence[str],
    precision: str = "fp32",
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    int8_activations: str = "static",
    weight_rounding: str = "gptq",
    bias_correction: bool = True,
    rounding_samples: int = 64,
    report: dict[str, Any] | None = None,
) -> bytes:
    """Lower a torch module to an ExecuTorch program (bytes) with the XNNPACK backend.

    `example` gives the static input shapes; for `precision="int8"`, `calibration` feeds (at those
    shapes) set the activation ranges. `int8_activations="dynamic"` quantizes only the linear layers,
    their activations per run (no calibration): the recipe for transformers, whose static per-tensor
    activations lose the signal (MiniLM: -1.4 dB static, 17.9 dB dynamic).

    Static int8 only: `weight_rounding="gptq"` rounds each conv/linear weight GPTQ-style against its
    input statistics on the first `rounding_samples` calibration feeds, and `bias_correction` folds
    the mean output shift of the rounding into the bias (see _refine_int8_weights);
    `weight_rounding="nearest", bias_correction=False` is the stock XNNPACKQuantizer lowering.
    `report`, when given, receives "weight_refinement": the layers rounded, biases corrected and
    channels kept at nearest rounding (None when nothing was refined)."""
    require_executorch()
    import torch

    if precision not in ("fp32", "int8"):
        raise InputError(f"unknown .pte precision {precision!r}", "choose fp32 or int8")
    if int8_activations not in ("static", "dynamic"):
        raise InputError(f"unknown int8 activation mode {int8_activations!r}", "choose static or dynamic")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise InputError(f"unknown weight rounding {weight_rounding!r}", f"choose {' or '.join(WEIGHT_ROUNDINGS)}")
    if rounding_samples < 1:
        raise InputError(f"rounding samples {rounding_samples} must be >= 1", "e.g. 64")
    wrapped = _Positional(module, input_names)
    # Contiguous (NCHW) examples: torch.export records each input's memory layout as the program's
    # dim order, and the ExecuTorch runtime reads an input's bytes in that order without checking
    # the strides of what it is given. An example in channels-last layout (a numpy HWC image
    # transposed to CHW keeps HWC memory) made a program that expects NHWC bytes; fed ordinary
    # NCHW arrays it computed garbage (EfficientNet-Lite0: top-1 wrong, max |diff| 7 on logits).
    # Fresh copies, not .contiguous(): that keeps a size-1 axis's stride 0 (numpy's x[:, None]),
    # which ExecuTorch refuses ("0 in strides is not supported").
    args = tuple(torch.from_numpy(standard_layout(example[n])) for n in input_names)
    with quiet_libraries():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        try:
            with torch.no_grad():
                if precision == "int8":
                    wrapped, refinement = _quantize_pt2e(
                        wrapped,
                        args,
                        input_names,
                        calibration,
                        dynamic=int8_activations == "dynamic",
                        weight_rounding=weight_rounding,
                        bias_correction=bias_correction,
                        rounding_samples=rounding_samples,
                    )
                    if report is not None:
                        report["weight_refinement"] = refinement
                exported = torch.export.export(wrapped, args)
                program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        except InputError:
            raise
        except Exception as e:  # torch.export / ExecuTorch raise many types
            raise StageError(
                f"lowering to ExecuTorch ({precision}) failed: {type(e).__name__}: {str(e)[:400]}",
                "the model may use an operator ExecuTorch cannot export (the traceback is this error's cause)",
            ) from e
    return bytes(program.buffer)


def _quantize_pt2e(
    wrapped,
    args,
    input_names,
    calibration,
    *,
    dynamic: bool = False,
    weight_rounding: str = "nearest",
    bias_correction: bool = False,
    rounding_samples: int = 64,
):
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    feeds = list(calibration or [])
    if not feeds and not dynamic:
        raise InputError("an int8 .pte needs calibration data", "pass {calibration=DATA}, or use a reference model")
    graph = torch.export.export(wrapped, args).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = _clamp_fusing_quantizer_class()().set_global(config)
    prepared = prepare_pt2e(graph, quantizer)
    if dynamic:
        feeds = feeds[:1] or [dict(zip(input_names, (a.numpy() for a in args)))]  # no ranges to observe
    refine = not dynamic and (weight_rounding == "gptq" or bias_correction)
    layers = _weight_layers(prepared) if refine else []
    recorder = _StatisticsRecorder(prepared, layers) if layers else None
    for index, sample in enumerate(feeds):
        inputs = [torch.as_tensor(np.asarray(sample[n])) for n in input_names]
        if recorder is not None and index < rounding_samples:
            recorder.run(*inputs)  # the same forward (observers included), also recording layer inputs
        else:
            prepared(*inputs)
    refinement = None
    if recorder is not None:
        refinement = _refine_int8_weights(
            prepared, layers, recorder.stats, gptq=weight_rounding == "gptq", bias_correction=bias_correction
        )
    return convert_pt2e(prepared), refinement


@dataclass(frozen=True)
class _WeightLayer:
    """A conv2d / linear node of a prepared (observed) graph whose weight the int8 quantizer
    observes per output channel: the node, its weight's attribute path and its observer's."""

    node: Any
    weight: str
    observer: str


def _weight_layers(prepared) -> list[_WeightLayer]:
    import torch
    from torchao.quantization.pt2e.observer import ObserverBase

    layers = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.conv2d.default,
            torch.ops.aten.linear.default,
        ):
            continue
        obs = node.args[1] if len(node.args) > 1 else None
        if not (
            isinstance(obs, torch.fx.Node)
            and obs.op == "call_module"
            and isinstance(obs.target, str)
            and isinstance(prepared.get_submodule(obs.target), ObserverBase)
        ):
            continue  # not quantized (no weight observer)
        weight = obs.args[0]
        # a weight shared by several layers would need one rounding for all of their inputs: left alone
        if (
            not isinstance(weight, torch.fx.Node)
            or weight.op != "get_attr"
            or not isinstance(weight.target, str)
            or len(weight.users) != 1
            or len(obs.users) != 1
        ):
            continue
        observer = prepared.get_submodule(obs.target)
        value = _get_attr(prepared, weight.target)
        if (
            getattr(observer, "qscheme", None) != torch.per_channel_symmetric
            or getattr(observer, "ch_axis", None) != 0
            or observer.dtype != torch.int8
            or value.dtype != torch.float32
            or value.dim() != (4 if node.target == torch.ops.aten.conv2d.default else 2)
        ):
            continue
        layers.append(_WeightLayer(node, weight.target, obs.target))
    return layers


def _get_attr(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set_param(module, path: str, value) -> None:
    """A new Parameter at `path`: never written in place, since the exported module's parameters
    are the caller's own tensors."""
    import torch

    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def _conv_arguments(node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """stride, padding, dilation, groups of an aten.conv2d node (defaults filled in)."""

    def pair(v, default):
        v = default if v is None else v
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return (int(v[0]), int(v[-1]))

    args = list(node.args) + [None] * (7 - len(node.args))
    kwargs = node.kwargs
    stride = pair(kwargs.get("stride", args[3]), [1])
    padding = pair(kwargs.get("padding", args[4]), [0])
    dilation = pair(kwargs.get("dilation", args[5]), [1])
    groups = int(kwargs.get("groups", args[6]) or 1)
    return stride, padding, dilation, groups


class _StatisticsRecorder:
    """Runs the prepared graph node by node (torch.fx.Interpreter), accumulating for every layer
    the second moments H = sum x x^T and sums of its input rows (optimize/rounding.py's
    LayerStatistics): the im2col patches for a conv, the rows of the input for a linear layer."""

    def __init__(self, prepared, layers: Sequence[_WeightLayer]):
        import torch

        from dlopt.optimize.rounding import LayerStatistics

        self.stats = LayerStatistics({}, {}, {}, 0)
        self._by_node = {layer.node: layer for layer in layers}
        recorder = self

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                if n in recorder._by_node:
                    weight = _get_attr(prepared, recorder._by_node[n].weight)
                    conv = _conv_arguments(n) if weight.dim() == 4 else None
                    _add_layer_input(recorder.stats, n.name, self.env[n.args[0]], weight.shape, conv)
                return super().run_node(n)

        self._interpreter = Recorder(prepared)

    def run(self, *inputs) -> None:
        self._interpreter.run(*inputs)
        self.stats.samples += 1


def _add_layer_input(
    stats,
    name: str,
    x,
    weight_shape: Sequence[int],
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int] | None,
) -> None:
    """Accumulate into `stats` (LayerStatistics) the rows that layer `name` multiplies its weight rows
    with, for one input batch x: the im2col patches of a conv (`conv`: stride, padding, dilation,
    groups), the rows of x for a linear layer (`conv` None)."""
    import torch
    import torch.nn.functional as F

    x = x.detach().float()
    if conv is None:
        cols, groups = x.reshape(1, 1, -1, x.shape[-1]).transpose(2, 3), 1
    else:
        stride, padding, dilation, groups = conv
        kh, kw = weight_shape[2], weight_shape[3]
        if (kh, kw) == (1, 1) and padding == (0, 0):  # a pointwise conv's rows are its input pixels
            cols = x[:, :, :: stride[0], :: stride[1]].reshape(x.shape[0], x.shape[1], -1)
        else:
            cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        # [N, groups, K, positions]: K channel-major (c, kh, kw), a group's channels contiguous (the
        # weight's own order). H and the sums are taken without transposing the patches (a copy).
        cols = cols.reshape(x.shape[0], groups, -1, cols.shape[-1])
    h = torch.matmul(cols, cols.transpose(2, 3)).sum(dim=0).double().numpy()  # [groups, K, K]
    total = cols.sum(dim=(0, 3), dtype=torch.float64).numpy()  # [groups, K]
    stats.add(name, h, total, cols.shape[0] * cols.shape[3])


def _refine_int8_weights(
    prepared, layers: Sequence[_WeightLayer], stats, *, gptq: bool, bias_correction: bool
) -> dict[str, int]:
    """Fold GPTQ-rounded weights and bias correction into the float parameters of a calibrated
    prepared graph, before convert_pt2e quantizes them with the weight observers.

    Why hand-written (the reasons of optimize/rounding.py, whose GPTQ maths this reuses): the stock
    quantizer rounds every weight to the nearest grid point, and on BatchNorm-folded CNNs the
    rounding error of high-gain zero-sum depthwise filters becomes an output offset that later
    layers amplify (EfficientNet-Lite0 int8 .pte: 16.0 dB logit SQNR). The new float weight of a
    channel is code * scale for GPTQ's codes, except the channel's largest-magnitude element, kept at
    its original value (code +-127, whatever GPTQ chose for it), so that:
    - the observer (PerChannelMinMaxObserver, symmetric, quant range [-127, 127]) computes the same
      scale, max(|w|) / 127 (floored at its eps), since the largest |w| of the channel is unchanged
      and every other element is clipped to at most that magnitude;
    - quantize_per_channel's round(w * (1 / scale)) gives back exactly GPTQ's code: code * scale
      carries a relative float32 error of about 1e-7, far from the .5 rounding boundaries for codes
      of magnitude <= 127.
    Both are checked here, not assumed: the observer is re-run on the new weight, and a channel
    whose scale moved keeps its original (nearest-rounded) weights. The bias correction uses the
    codes the quantizer will actually produce: b' = b - (W_q - W) . E[x] per output channel (a layer
    without a bias gets one; one whose bias is computed in the graph is left uncorrected).
    Statistics are taken on the float model (not sequentially on the already-rounded layers), as
    optimize/rounding.py does for ONNX Runtime."""
    import torch

    from dlopt.optimize.rounding import gptq_round, one_blas_thread

    rounded = corrected = kept = 0
    with one_blas_thread():
        for layer in layers:
            name = layer.node.name
            if name not in stats.hessian:
                continue
            observer = prepared.get_submodule(layer.observer)
            w = _get_attr(prepared, layer.weight).detach()
            scale = observer.calculate_qparams()[0].detach().to(torch.float32)
            qmin, qmax = int(observer.quant_min), int(observer.quant_max)
            outputs = w.shape[0]
            if scale.numel() != outputs:
                continue
            groups = stats.hessian[name].shape[0]
            rows = w.double().reshape(groups, outputs // groups, -1).numpy()
            per_channel = (-1,) + (1,) * (w.dim() - 1)
            new = w
            if gptq:
                codes = gptq_round(rows, stats.hessian[name], scale.double().reshape(groups, -1).numpy(), qmin, qmax)
                flat = w.reshape(outputs, -1)
                top = flat.abs().argmax(dim=1, keepdim=True)
                limit = flat.abs().gather(1, top)
                candidate = torch.from_numpy(codes).float().reshape(outputs, -1) * scale[:, None]
                candidate = torch.maximum(torch.minimum(candidate, limit), -limit)
                candidate.scatter_(1, top, flat.gather(1, top))  # the grid end stays where the observer finds it
                candidate = candidate.reshape(w.shape)
                moved = ~torch.eq(_observed_scale(observer, candidate), scale)
                if moved.any():  # not expected (see above); such channels keep the nearest rounding
                    candidate = torch.where(moved.reshape(per_channel), w, candidate)
                    kept += int(moved.sum())
                new = candidate
                rounded += 1
            if bias_correction:
                s = scale.reshape(per_channel)
                quantized = torch.clamp(torch.round(new * (1.0 / s)), qmin, qmax) * s  # quantize_per_channel's formula
                mean = stats.total[name] / max(stats.rows[name], 1)  # [groups, K]
                error = (quantized.double() - w.double()).reshape(groups, outputs // groups, -1).numpy()
                shift = torch.from_numpy(np.einsum("gok,gk->go", error, mean).reshape(-1))
                corrected += _add_bias(prepared, layer.node, -shift.float())
            if new is not w:
                _set_param(prepared, layer.weight, new.contiguous())
                observer.reset_min_max_vals()
                observer(new)
    prepared.recompile()
    return {"weights_rounded": rounded, "biases_corrected": corrected, "channels_kept_nearest": kept}


def _observed_scale(observer, weight):
    import copy

    probe = copy.deepcopy(observer)
    probe.reset_min_max_vals()
    probe(weight)
    return probe.calculate_qparams()[0].to(weight.dtype)


def _add_bias(prepared, node, delta) -> bool:
    """bias += delta for a conv2d / linear node (a new bias parameter when it has none); False, and
    nothing changed, when its bias is computed rather than a parameter."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if hasattr(bias, "op"):
        if bias.op != "get_attr":
            return False
        _set_param(prepared, bias.target, _get_attr(prepared, bias.target).detach() + delta)
        return True
    target = f"_dlopt_bias_{node.name}"
    _set_param(prepared, target, delta)
    with prepared.graph.inserting_before(node):
        get = prepared.graph.get_attr(target)
    args = list(node.args) + [None] * (3 - len(node.args))
    args[2] = get
    node.args = tuple(args)
    if "bias" in node.kwargs:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    return True


def _clamp_fusing_quantizer_class():
    """XNNPACKQuantizer that also quantizes conv -> hardtanh / relu6 (ReLU6, clamp) as one fused unit.

    Why hand-written: ExecuTorch 1.5's XNNPACKQuantizer fuses conv -> relu, but a hardtanh after a
    conv only shares the conv's output quantization, so the int8 grid spans the conv's raw output
    (tens on both sides in EfficientNet-Lite0) of which ReLU6 keeps [0, 6]: most of the 256 levels
    are wasted, and Lite0's int8 logits fell to 5.5 dB SQNR (62 % top-1 agreement with FP32).
    Annotated like conv -> relu (inputs and weights at the conv, the output observed after the
    clamp), the grid covers [0, 6], and XNNPACK fuses the clamp into the conv (its
    FuseActivationPass takes relu and hardtanh), as TFLite does with ReLU6.

    It also keeps integer arithmetic integer before annotation (see transform_for_annotation)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
    from torchao.quantization.pt2e.utils import _is_conv_node

    # nn.ReLU6 exports as hardtanh, F.relu6 as relu6 (which the stock quantizer leaves float)
    clamps = (
        torch.ops.aten.hardtanh.default,
        torch.ops.aten.hardtanh_.default,
        torch.ops.aten.relu6.default,
        torch.ops.aten.relu6_.default,
    )

    def annotated(node) -> bool:
        return Q_ANNOTATION_KEY in node.meta and node.meta[Q_ANNOTATION_KEY]._annotated

    scalar_forms = {
        torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar,
        torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar,
    }

    class ClampFusingQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            # The stock transform turns every Python scalar of add/mul into a float tensor constant,
            # also in integer arithmetic: transformers' attention-mask code (arange(64) + 0, then
            # used as an index) became float and MiniLM's calibration failed ("tensors used as
            # indices must be long"). Integer add/mul with a scalar take the exact .Scalar overload,
            # which the transform leaves alone.
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in scalar_forms and len(node.args) == 2:
                    tensor, other = node.args
                    val = getattr(tensor, "meta", {}).get("val")
                    if not hasattr(other, "op") and val is not None and not val.dtype.is_floating_point:
                        node.target = scalar_forms[node.target]
            model.recompile()
            return super().transform_for_annotation(model)

        def annotate(self, model):
            config = self.global_config
            if config is not None and not config.input_activation.is_dynamic and not config.is_qat:
                for clamp in model.graph.nodes:
                    if clamp.op != "call_function" or clamp.target not in clamps:
                        continue
                    conv = clamp.args[0]
                    if not (hasattr(conv, "op") and _is_conv_node(conv)) or len(conv.users) > 1:
                        continue
                    inputs = {conv.args[0]: get_input_act_qspec(config), conv.args[1]: get_weight_qspec(config)}
                    bias = conv.args[2] if len(conv.args) > 2 else None
                    if hasattr(bias, "op"):
                        inputs[bias] = get_bias_qspec(config)
                    if any(annotated(n) for n in (conv, clamp, *list(inputs)[1:])):  # not the input activation
                        continue
                    conv.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
                    clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                        output_qspec=get_output_act_qspec(config), _annotated=True
                    )
            return super().annotate(model)  # the stock patterns skip what is annotated here

    return ClampFusingQuantizer


__all__ = ["LOWERING_REVISION", "WEIGHT_ROUNDINGS", "lower_to_pte"]
