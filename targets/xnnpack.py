"""The `xnnpack` target: ExecuTorch .pte programs whose operators are delegated to XNNPACK.

PyPI onnxruntime has no XNNPACK execution provider, but ExecuTorch (`pip install 'dlopt[mobile]'`,
which keeps torch 2.13) runs .pte programs from Python on x86: the same XNNPACK kernels that Android
and iOS run, here on this host's CPU. This module knows the runtime: whether ExecuTorch is here
(`executorch_status`), its thread pool (`set_threads`) and loading and running a program
(`PteProgram`). Making a program from a torch model (PT2E INT8 quantization and lowering) is a
transformation: dlopt.optimize.pt2e (`lower_to_pte`).

A .pte program has static shapes and a fixed memory layout (dim order) per input, which the runtime
does not check: PteProgram lays every input out in the order the program expects. Its inputs are
taken positionally in `input_names` order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from dlopt.errors import InputError, MissingDependencyError
from dlopt.quiet import quiet_libraries  # ExecuTorch prints while importing
from dlopt.targets.base import Int8Form, Target, TargetSession

INSTALL_HINT = (
    "pip install 'dlopt[mobile]' (ExecuTorch; it keeps torch 2.13: install torch==2.13.0 first, "
    "and pass -c with torch==2.13.0 to be sure pip does not replace it)"
)


@functools.lru_cache(maxsize=1)
def executorch_status() -> tuple[bool, str]:
    try:
        from importlib.metadata import version

        import executorch  # noqa: F401

        ver = version("executorch")
    except Exception as e:  # ModuleNotFoundError, or a broken install (wrong torch ABI) raising anything
        return False, f"ExecuTorch is not installed or cannot be imported ({type(e).__name__}: {str(e)[:150]})"
    try:
        with quiet_libraries():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
            from executorch.extension.pybindings import portable_lib  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the runtime library failed to load
        return False, f"ExecuTorch {ver} is installed but its runtime or XNNPACK backend fails to load ({str(e)[:200]})"
    return True, f"ExecuTorch {ver}, XNNPACK backend"


def require_executorch() -> None:
    ok, reason = executorch_status()
    if not ok:
        raise MissingDependencyError(f"the xnnpack target needs ExecuTorch: {reason}", INSTALL_HINT)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's thread pool (XNNPACK's work is split over it; 1 runs on the calling thread).

    Programs loaded before a change must not run after it: their XNNPACK delegate keeps a pointer to
    the old pool, and running them crashes the process (seen with ExecuTorch 1.5). So the pool is
    sized when a program is loaded (`PteProgram(..., threads=N)`), never in between."""
    require_executorch()
    with quiet_libraries():
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
        with quiet_libraries():
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
            raise InputError(
                f"the program takes {meta.num_inputs()} inputs, not {len(self.input_names)} ({list(self.input_names)})",
                "name every input of the program, in order",
            )
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
                raise InputError(
                    f".pte input {name!r} has shape {list(value.shape)}, the program's is {list(shape)}",
                    "a .pte program has the static shapes it was lowered with",
                )
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


def standard_layout(value) -> np.ndarray:
    """`value` row-major with the standard strides of its shape, also on size-1 axes (where
    np.ascontiguousarray keeps whatever stride it finds, e.g. 0); copied only when needed."""
    value = np.asarray(value)
    standard = tuple(int(np.prod(value.shape[k + 1 :], dtype=np.int64)) * value.itemsize for k in range(value.ndim))
    if value.strides == standard:
        return value  # already so: no copy (it would be timed with every run)
    return np.array(value, order="C", copy=True)


def _in_dim_order(value: np.ndarray, order: tuple[int, ...] | None) -> np.ndarray:
    """`value` with the same logical content, its bytes laid out in `order` (e.g. (0, 2, 3, 1):
    channels-last) and its strides saying so."""
    if order is None or list(order) == list(range(value.ndim)):
        return standard_layout(value)
    return standard_layout(value.transpose(order)).transpose(np.argsort(order))


class XnnpackTarget(Target):
    """Registered so that `--target xnnpack` is known and says what it needs; it does not run ONNX
    sessions (ExecuTorch runs .pte programs lowered from the torch source)."""

    name: ClassVar[str] = "xnnpack"
    description: ClassVar[str] = (
        "ExecuTorch .pte program with the XNNPACK backend (the kernels Android/iOS run), on this host's CPU"
    )
    providers: ClassVar[tuple[str, ...]] = ()
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    device_type: ClassVar[str] = "cpu"
    cpu_time_measures_work: ClassVar[bool] = True
    runtime: ClassVar[str] = "executorch"
    # XNNPACKQuantizer (PT2E): s8 activations, symmetric per-channel s8 weights; dynamic for linear layers.
    int8: ClassVar[Int8Form | None] = Int8Form(
        dynamic=True, activation="s8", per_channel=True, note="XNNPACK's int8 kernels are s8·s8 (PT2E XNNPACKQuantizer)"
    )
    # No bundle of its own: `dlopt package --target mobile --torch-source` puts its .pte in the mobile bundle.
    package_formats: ClassVar[tuple[str, ...]] = ()

    def is_available(self) -> tuple[bool, str]:
        return executorch_status()

    def require_available(self) -> None:
        require_executorch()

    def create_session(self, model, **kwargs) -> TargetSession:
        require_executorch()
        raise InputError(
            "the xnnpack target runs ExecuTorch programs lowered from the torch model, not ONNX files",
            "package with `dlopt package MODEL.onnx --target mobile --torch-source NAME --pte fp32,int8` "
            "(NAME: a reference model or path/to/file.py:build); the bundle records the .pte latency "
            "next to ONNX Runtime's",
        )


__all__ = [
    "INSTALL_HINT",
    "PteProgram",
    "XnnpackTarget",
    "executorch_status",
    "require_executorch",
    "set_threads",
    "standard_layout",
]
