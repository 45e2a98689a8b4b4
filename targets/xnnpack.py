"""The `xnnpack` target: a torch model lowered through ExecuTorch to a .pte program for XNNPACK.

PyPI onnxruntime has no XNNPACK execution provider, but ExecuTorch (`pip install 'dlopt[mobile]'`,
which keeps torch 2.13) lowers a torch model to a .pte program whose operators are delegated to
XNNPACK and runs it from Python on x86: the same XNNPACK kernels that Android and iOS run, here on
this host's CPU. FP32 lowers the exported graph as it is; INT8 first quantizes it with ExecuTorch's
XNNPACKQuantizer (per-channel symmetric weights, per-tensor activations) through torchao's
prepare_pt2e / convert_pt2e with calibration data, with conv -> ReLU6 quantized as one fused unit
(see _clamp_fusing_quantizer_class).

The source is the torch model (a reference model or a factory), not the ONNX file: ExecuTorch
lowers torch programs. `dlopt package MODEL.onnx --target mobile --torch-source NAME` puts the .pte
in the bundle after checking its outputs against the ONNX model.

A .pte program has static shapes (those of the example it was exported with) and a fixed memory
layout (dim order) per input, which the runtime does not check: lower_to_pte exports from row-major
copies of the example, and PteProgram lays every input out in the order the program expects. Its
inputs are taken positionally in `input_names` order.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dlopt.errors import InputError, MissingDependencyError, StageError
from dlopt.targets.base import Target, TargetSession

# Bumped whenever lower_to_pte's output changes numerically, so that caches of .pte files (the
# benchmarks') are not reused across lowerings. 2: contiguous examples, conv+ReLU6 quantized as one.
LOWERING_REVISION = 2

INSTALL_HINT = ("pip install 'dlopt[mobile]' (ExecuTorch; it keeps torch 2.13: install torch==2.13.0 first, "
                "and pass -c with torch==2.13.0 to be sure pip does not replace it)")


@functools.lru_cache(maxsize=1)
def executorch_status() -> tuple[bool, str]:
    try:
        from importlib.metadata import version

        import executorch  # noqa: F401
        ver = version("executorch")
    except Exception as e:  # ModuleNotFoundError, or a broken install (wrong torch ABI) raising anything
        return False, f"ExecuTorch is not installed or cannot be imported ({type(e).__name__}: {str(e)[:150]})"
    try:
        with _quiet():
            from executorch.extension.pybindings import portable_lib  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the runtime library failed to load
        return False, f"ExecuTorch {ver} is installed but its runtime or XNNPACK backend fails to load ({str(e)[:200]})"
    return True, f"ExecuTorch {ver}, XNNPACK backend"


def require_executorch() -> None:
    ok, reason = executorch_status()
    if not ok:
        raise MissingDependencyError(f"the xnnpack target needs ExecuTorch: {reason}", INSTALL_HINT)


@contextlib.contextmanager
def _quiet():
    """ExecuTorch and torchao print warnings and C++ log lines while importing and lowering."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        logging.disable(previous)


class _Positional:
    """Wraps a module taking keyword tensors so that it takes them positionally, in a fixed order:
    a .pte program's inputs are a flat list."""

    def __new__(cls, module, input_names: Sequence[str]):
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


def lower_to_pte(module, example: Mapping[str, Any], *, input_names: Sequence[str], precision: str = "fp32",
                 calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                 int8_activations: str = "static") -> bytes:
    """Lower a torch module to an ExecuTorch program (bytes) with the XNNPACK backend.

    `example` gives the static input shapes; for `precision="int8"`, `calibration` feeds (at those
    shapes) set the activation ranges. `int8_activations="dynamic"` quantizes only the linear layers,
    their activations per run (no calibration): the recipe for transformers, whose static per-tensor
    activations lose the signal (MiniLM: -1.4 dB static, 17.9 dB dynamic)."""
    require_executorch()
    import torch

    if precision not in ("fp32", "int8"):
        raise InputError(f"unknown .pte precision {precision!r}", "choose fp32 or int8")
    if int8_activations not in ("static", "dynamic"):
        raise InputError(f"unknown int8 activation mode {int8_activations!r}", "choose static or dynamic")
    wrapped = _Positional(module, input_names)
    # Contiguous (NCHW) examples: torch.export records each input's memory layout as the program's
    # dim order, and the ExecuTorch runtime reads an input's bytes in that order without checking
    # the strides of what it is given. An example in channels-last layout (a numpy HWC image
    # transposed to CHW keeps HWC memory) made a program that expects NHWC bytes; fed ordinary
    # NCHW arrays it computed garbage (EfficientNet-Lite0: top-1 wrong, max |diff| 7 on logits).
    # Fresh copies, not .contiguous(): that keeps a size-1 axis's stride 0 (numpy's x[:, None]),
    # which ExecuTorch refuses ("0 in strides is not supported").
    args = tuple(torch.from_numpy(_standard_layout(example[n])) for n in input_names)
    with _quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        try:
            with torch.no_grad():
                if precision == "int8":
                    wrapped = _quantize_pt2e(wrapped, args, input_names, calibration,
                                             dynamic=int8_activations == "dynamic")
                exported = torch.export.export(wrapped, args)
                program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        except InputError:
            raise
        except Exception as e:  # torch.export / ExecuTorch raise many types
            raise StageError(f"lowering to ExecuTorch ({precision}) failed: {type(e).__name__}: {str(e)[:400]}",
                             "the model may use an operator ExecuTorch cannot export; run with --debug") from e
    return bytes(program.buffer)


def _quantize_pt2e(wrapped, args, input_names, calibration, *, dynamic: bool = False):
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    feeds = list(calibration or [])
    if not feeds and not dynamic:
        raise InputError("an int8 .pte needs calibration data", "pass --calibration, or use a reference model")
    graph = torch.export.export(wrapped, args).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = _clamp_fusing_quantizer_class()().set_global(config)
    prepared = prepare_pt2e(graph, quantizer)
    if dynamic:
        feeds = feeds[:1] or [dict(zip(input_names, (a.numpy() for a in args)))]  # no ranges to observe
    for sample in feeds:
        prepared(*(torch.as_tensor(np.asarray(sample[n])) for n in input_names))
    return convert_pt2e(prepared)


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

    import torch

    # nn.ReLU6 exports as hardtanh, F.relu6 as relu6 (which the stock quantizer leaves float)
    clamps = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default, torch.ops.aten.relu6.default,
              torch.ops.aten.relu6_.default)

    def annotated(node) -> bool:
        return Q_ANNOTATION_KEY in node.meta and node.meta[Q_ANNOTATION_KEY]._annotated

    scalar_forms = {torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar,
                    torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar}

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
                    clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                                          _annotated=True)
            return super().annotate(model)  # the stock patterns skip what is annotated here

    return ClampFusingQuantizer


def set_threads(threads: int) -> None:
    """Size ExecuTorch's thread pool (XNNPACK's work is split over it; 1 runs on the calling thread).

    Programs loaded before a change must not run after it: their XNNPACK delegate keeps a pointer to
    the old pool, and running them crashes the process (seen with ExecuTorch 1.5). So the pool is
    sized when a program is loaded (`PteProgram(..., threads=N)`), never in between."""
    require_executorch()
    with _quiet():
        from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class PteProgram:
    """A loaded .pte program: `run(feeds)` -> list of numpy outputs. With `threads`, ExecuTorch's
    thread pool is resized first; every program loaded earlier is then invalid (see set_threads)."""

    def __init__(self, source: str | os.PathLike | bytes, input_names: Sequence[str], *, threads: int | None = None):
        require_executorch()
        if threads is not None:
            set_threads(threads)
        with _quiet():
            from executorch.runtime import Runtime

            runtime = Runtime.get()
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            self._program = runtime.load_program(data)
            self._method = self._program.load_method("forward")
        except Exception as e:  # the runtime's own error types
            label = "the program" if isinstance(source, bytes) else str(source)
            raise InputError(f"ExecuTorch cannot load {label}: {str(e)[:300]}", "package it again") from e
        self.input_names = tuple(input_names)
        meta = self._method.metadata
        if meta.num_inputs() != len(self.input_names):
            raise InputError(f"the program takes {meta.num_inputs()} inputs, not {len(self.input_names)} "
                             f"({list(self.input_names)})", "name every input of the program, in order")
        self.input_shapes = tuple(tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs()))
        self.input_dim_orders = _input_dim_orders(data, len(self.input_names))

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"no data for .pte input(s) {missing}", f"its inputs are {list(self.input_names)}")
        tensors = []
        for name, shape, order in zip(self.input_names, self.input_shapes, self.input_dim_orders):
            value = np.asarray(feeds[name])
            if value.shape != shape:
                raise InputError(f".pte input {name!r} has shape {list(value.shape)}, the program's is {list(shape)}",
                                 "a .pte program has the static shapes it was lowered with")
            tensors.append(torch.from_numpy(_in_dim_order(value, order)))
        outputs = self._method.execute(tensors)
        # The output tensors live in the program's planned memory, which the next execute() overwrites:
        # copy them out (without the copy, a list of runs' outputs all hold the last run's values).
        return [o.detach().clone().numpy() if hasattr(o, "detach") else np.array(o, copy=True) for o in outputs]


def _input_dim_orders(data: bytes, count: int) -> tuple[tuple[int, ...] | None, ...]:
    """The memory order (dim order) each input of the program's forward method expects.

    The runtime reads an input's bytes in this order whatever the strides of the tensor it is given
    (ExecuTorch 1.5), and its Python API does not expose it; it is read from the program itself,
    through ExecuTorch's (private) flatbuffer reader. None where that reader is unavailable: inputs
    are then passed contiguous, which is right for the programs lower_to_pte writes."""
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary

        pte = deserialize_pte_binary(data)
        plan = getattr(pte, "program", pte).execution_plan[0]
        orders = [tuple(plan.values[i].val.dim_order) for i in plan.inputs]
    except Exception:  # noqa: BLE001 - a private API: its absence or change must not stop a run
        return (None,) * count
    return tuple(orders) if len(orders) == count else (None,) * count


def _standard_layout(value) -> np.ndarray:
    """`value` row-major with the standard strides of its shape, also on size-1 axes (where
    np.ascontiguousarray keeps whatever stride it finds, e.g. 0); copied only when needed."""
    value = np.asarray(value)
    standard = tuple(int(np.prod(value.shape[k + 1:], dtype=np.int64)) * value.itemsize for k in range(value.ndim))
    if value.strides == standard:
        return value  # already so: no copy (it would be timed with every run)
    return np.array(value, order="C", copy=True)


def _in_dim_order(value: np.ndarray, order: tuple[int, ...] | None) -> np.ndarray:
    """`value` with the same logical content, its bytes laid out in `order` (e.g. (0, 2, 3, 1):
    channels-last) and its strides saying so."""
    if order is None or list(order) == list(range(value.ndim)):
        return _standard_layout(value)
    return _standard_layout(value.transpose(order)).transpose(np.argsort(order))


class XnnpackTarget(Target):
    """Registered so that `--target xnnpack` is known and says what it needs; it does not run ONNX
    sessions (ExecuTorch runs .pte programs lowered from the torch source)."""

    name: ClassVar[str] = "xnnpack"
    description: ClassVar[str] = ("ExecuTorch .pte program with the XNNPACK backend (the kernels Android/iOS run), "
                                  "on this host's CPU")
    providers: ClassVar[tuple[str, ...]] = ()
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    device_type: ClassVar[str] = "cpu"
    cpu_time_measures_work: ClassVar[bool] = True

    def is_available(self) -> tuple[bool, str]:
        return executorch_status()

    def require_available(self) -> None:
        require_executorch()

    def create_session(self, model, **kwargs) -> TargetSession:
        require_executorch()
        raise InputError("the xnnpack target runs ExecuTorch programs lowered from the torch model, not ONNX files",
                         "package with `dlopt package MODEL.onnx --target mobile --torch-source NAME --pte fp32,int8` "
                         "(NAME: a reference model or path/to/file.py:build); the bundle records the .pte latency "
                         "next to ONNX Runtime's")


__all__ = ["INSTALL_HINT", "LOWERING_REVISION", "PteProgram", "XnnpackTarget", "executorch_status", "lower_to_pte", "require_executorch",
           "set_threads"]
