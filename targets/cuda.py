"""The CUDA target: onnxruntime-gpu's CUDA execution provider, with IO binding and optional CUDA graphs.

What makes its numbers trustworthy:
- `is_available()` does not trust the provider list: onnxruntime-gpu lists CUDAExecutionProvider even
  where the CUDA or cuDNN libraries or the driver are missing, and then falls back to the CPU. It
  builds a one-node session and reads back which provider took it.
- inputs are copied to the GPU once when binding and outputs stay there (IO binding), so the timed
  call has no host<->device copies; ONNX Runtime synchronizes the stream at the end of each run, so
  the wall time of a call covers the GPU work.
- with `cuda_graph=True` the whole graph is captured once and replayed (ONNX Runtime's
  `enable_cuda_graph`), which removes the per-kernel launch cost that dominates small batches. CUDA
  graphs need every input and output at a fixed device address, so outputs are preallocated from the
  shapes of one run on the plain session; and every node must run on the CUDA EP, so the graph
  session is built per input shape with its dynamic axes fixed (free-dimension overrides), which
  lets ONNX Runtime fold away the shape computations it would otherwise run on the CPU.
- GPU memory is read from NVML (the driver's library), device-wide.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from dlopt.errors import InputError
from dlopt.targets.base import CPU_PROVIDER, BoundRun, Int8Form, Target, TargetSession

CUDA_PROVIDER = "CUDAExecutionProvider"


class CudaTarget(Target):
    name: ClassVar[str] = "cuda"
    description: ClassVar[str] = "ONNX Runtime CUDA execution provider (onnxruntime-gpu)"
    providers: ClassVar[tuple[str, ...]] = (CUDA_PROVIDER, CPU_PROVIDER)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16", "int4")
    device_type: ClassVar[str] = "cuda"
    # The calling thread mostly waits for the GPU (or spins on it): its CPU time measures nothing useful.
    cpu_time_measures_work: ClassVar[bool] = False
    # INT8 on NVIDIA GPUs runs through TensorRT: static QDQ graphs (no dynamic quantization), symmetric s8.
    int8: ClassVar[Int8Form | None] = Int8Form(
        dynamic=False, activation="s8", per_channel=True, note="TensorRT takes symmetric int8 only"
    )
    package_formats: ClassVar[tuple[str, ...]] = ("onnx",)

    def is_available(self) -> tuple[bool, str]:
        return _probe_cuda()

    def provider_options(
        self, *, device_id: int = 0, cuda_graph: bool = False, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        options = {"device_id": str(device_id)}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        options.update({k: str(v) for k, v in (extra or {}).items()})
        return options

    def create_session(self, model, *, provider_options: Mapping[str, str] | None = None, **kwargs) -> TargetSession:
        """As Target.create_session; with enable_cuda_graph in the options, the session made here is a
        plain one (it gives load time and output shapes), and `bind` builds the graph session once the
        input shapes are known: with dynamic axes, shape computations run on the CPU EP, which a CUDA
        graph cannot hold, so the graph session gets those axes fixed and folded away."""
        options = dict(provider_options or {})
        graph = options.pop("enable_cuda_graph", "0") == "1"
        handle = super().create_session(model, provider_options=options, **kwargs)
        if graph and not handle.fell_back:
            # a marker for bind(): this session itself has no graph
            handle = dataclasses.replace(handle, provider_options={**handle.provider_options, "enable_cuda_graph": "1"})
        return handle

    def bind(self, handle: TargetSession, feeds: Mapping[str, np.ndarray]) -> BoundRun:
        if handle.fell_back or handle.provider_options.get("enable_cuda_graph") != "1":
            return BoundRun(handle, feeds)
        # A CUDA graph replays into fixed output buffers: learn the output shapes from one run of the
        # plain session, then build the graph session with these shapes fixed and preallocate them.
        probe = BoundRun(handle, feeds)
        probe()
        shapes = probe.output_shapes()
        del probe
        fixed = free_dimensions(handle.session, feeds)
        try:
            graph_handle = Target.create_session(
                self,
                handle.source,
                threads=handle.threads,
                graph_opt_level=handle.graph_opt_level,
                provider_options=handle.provider_options,
                device_id=handle.device_id,
                check_available=False,
                free_dimensions=fixed,
            )
            bound = BoundRun(graph_handle, feeds, output_shapes=shapes)
            bound()  # the first runs capture the graph: fail here, clearly, rather than in the timed loop
            bound()
        except Exception as e:  # onnxruntime's own exception types
            raise InputError(
                f"CUDA graph capture failed: {str(e).strip()[:300]}",
                "CUDA graphs need every node on the CUDA EP; run without {cuda_graph}",
            ) from e
        return bound

    def device_name(self, device_id: int = 0) -> str:
        return _nvml_device_name(device_id) or "CUDA device"

    def memory_in_use(self, device_id: int = 0) -> int | None:
        return _nvml_memory_used(device_id)


def free_dimensions(session, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Named dynamic axes of the session's inputs -> their sizes in `feeds` (for dimension overrides)."""
    sizes: dict[str, int] = {}
    for spec in session.get_inputs():
        shape = np.asarray(feeds[spec.name]).shape
        for dim, size in zip(spec.shape, shape):
            if isinstance(dim, str) and dim:
                if sizes.get(dim, size) != size:
                    raise InputError(
                        f"axis {dim!r} has sizes {sizes[dim]} and {size} in one feed",
                        "give inputs whose shared axes agree",
                    )
                sizes[dim] = int(size)
    return sizes


@functools.lru_cache(maxsize=1)
def _probe_cuda() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return False, f"onnxruntime cannot be imported ({e})"
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        return False, (
            f"onnxruntime {ort.__version__} here has no {CUDA_PROVIDER} (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime on a machine "
            "with an NVIDIA GPU"
        )
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # onnxruntime-gpu >= 1.21: load CUDA/cuDNN from the nvidia-* wheels if present
        with contextlib.suppress(Exception):  # preloading is best effort; the probe below decides
            preload()
    import warnings

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    from dlopt.sessions import session_options

    options = session_options()  # this probe may be the process's first session: it must carry dlopt's config
    options.log_severity_level = 4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=[CUDA_PROVIDER, CPU_PROVIDER]
            )
    except Exception as e:  # noqa: BLE001 - any failure means "not available", with its reason
        return False, f"the CUDA execution provider failed to start: {str(e).strip()[:300]}"
    active = session.get_providers()
    if not active or active[0] != CUDA_PROVIDER:
        return False, (
            f"onnxruntime lists {CUDA_PROVIDER} but a session fell back to {', '.join(active)}: "
            "no GPU, no driver, or the CUDA/cuDNN libraries are missing "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]')"
        )
    name = _nvml_device_name(0)
    return True, f"onnxruntime {ort.__version__} {CUDA_PROVIDER}" + (f" on {name}" if name else "")


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.lru_cache(maxsize=1)
def _nvml():
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    return lib


def _nvml_handle(device_id: int):
    lib = _nvml()
    if lib is None:
        return None, None
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device_id), ctypes.byref(handle)) != 0:
        return lib, None
    return lib, handle


def _nvml_memory_used(device_id: int) -> int | None:
    """Bytes in use on the GPU, all processes (NVML indexes devices as the driver does, which can
    differ from CUDA's order when CUDA_VISIBLE_DEVICES reorders them)."""
    lib, handle = _nvml_handle(device_id)
    if handle is None:
        return None
    memory = _NvmlMemory()
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    return int(memory.used)


def _nvml_device_name(device_id: int) -> str | None:
    lib, handle = _nvml_handle(device_id)
    if handle is None:
        return None
    buffer = ctypes.create_string_buffer(96)
    if lib.nvmlDeviceGetName(handle, buffer, ctypes.c_uint(96)) != 0:
        return None
    return buffer.value.decode(errors="replace")
