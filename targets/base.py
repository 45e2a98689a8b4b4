"""The interface every execution target implements, and the session and input placement they share.

A target says what it is (name, ONNX Runtime provider names, precisions), whether it can run here
(`is_available()` -> (bool, reason)), and builds sessions. What stages need to know about it (its
runtime, the INT8 form its kernels want, whether FP16 runs natively, what `dlopt package` builds for
it) it declares as class attributes, read as one record with `capabilities()`. The bench harness and the eval code only
talk to this interface: they never branch on a target's name.

Two things here exist because ONNX Runtime gets them wrong by default:
- asked for an execution provider it lacks, PyPI onnxruntime only warns and runs on the CPU. So
  `create_session` reads `session.get_providers()` back and raises TargetUnavailableError on such a
  silent fallback, unless the caller allows it, in which case the session is labelled as CPU;
- `session.run(feeds)` copies inputs host->device and outputs device->host on every call. `bind()`
  places the inputs on the target's device once (IO binding) and leaves the outputs there, so a
  timed loop of `BoundRun()` calls measures the model and nothing else.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from dlopt.errors import InputError, TargetUnavailableError
from dlopt.sessions import CPU_PROVIDER, RelaxedOutput, produced_notes, session_options, session_source

if TYPE_CHECKING:
    from dlopt.targets.cpu import HostCpu

RUNTIMES = ("onnxruntime", "executorch")


@dataclass(frozen=True, kw_only=True)
class Int8Form:
    """The INT8 model a target's kernels want.

    `dynamic`: dynamic quantization (activations quantized per call: DynamicQuantizeLinear,
    MatMulInteger) runs there; False: static QDQ with calibrated ranges is required.
    `activation`: the activation type of static INT8: "s8", "u8", or "host" (decided by the CPU that
    runs it: u8 on x86, whose int8 kernels are u8·s8, s8 on ARM). Weights are s8 on every target.
    `per_channel`: per-channel weight scales are supported."""

    dynamic: bool
    activation: Literal["u8", "s8", "host"]
    per_channel: bool = True
    weight: Literal["s8"] = "s8"
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Int8Types:
    """The INT8 types for one target on one CPU, with the reason (what a quantizer uses)."""

    activation: Literal["u8", "s8"]
    weight: Literal["u8", "s8"]
    reduce_range: bool  # 7-bit weights: x86 without VNNI sums u8·s8 pairs in 16 bits, which full range overflows
    reason: str


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """Everything a target declares, in one record (`dlopt.targets.capabilities(name)`)."""

    name: str
    description: str
    runtime: str  # one of RUNTIMES: the runtime that runs the artifact
    providers: tuple[str, ...]  # ONNX Runtime execution providers, priority order (none for executorch)
    precisions: tuple[str, ...]  # precisions run with the target's own kernels
    int8: Int8Form | None  # the INT8 form to quantize for; None: dlopt does not quantize to INT8 for it
    fp16_native: bool  # FP16 runs in FP16 kernels (elsewhere it is cast to float or runs slower than FP32)
    package_formats: tuple[str, ...]  # what `dlopt package --target NAME` builds; () when it is not a package target
    kernels_measurable_here: bool  # this host runs the target's own kernels (so timing choices here is valid)
    device_type: str  # where bound inputs and outputs live


@dataclass(frozen=True)
class TargetSession:
    """An ONNX Runtime session plus what it really runs on (read back from the session, not assumed)."""

    session: Any  # onnxruntime.InferenceSession
    target: str  # the target that was asked for
    runs_on: str  # the target the work really runs on: `target`, or "cpu" after an allowed fallback
    requested_providers: tuple[str, ...]
    active_providers: tuple[str, ...]
    device_type: str  # where bound inputs and outputs live: "cpu" or "cuda"
    device_id: int
    load_s: float  # wall time to create the session (graph optimization included)
    threads: int
    graph_opt_level: str
    provider_options: Mapping[str, str] = field(default_factory=dict)
    source: Any = None  # the path or bytes the session was built from (a CUDA graph needs a probe session)
    relaxed_outputs: tuple[RelaxedOutput, ...] = ()  # declared output shapes cleared on the session's copy

    @property
    def fell_back(self) -> bool:
        return self.runs_on != self.target

    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


class BoundRun:
    """One model with its inputs bound on the target's device; calling it runs the model once.

    The call is what the harness times: inputs were copied to the device when binding, outputs stay
    on the device (fetch them with `outputs()`, outside the timed loop). With `output_shapes` the
    outputs are preallocated too, which a CUDA graph needs (its replays write to fixed addresses).
    """

    def __init__(
        self,
        handle: TargetSession,
        feeds: Mapping[str, np.ndarray],
        output_shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
    ):
        import onnxruntime as ort

        self.handle = handle
        session = handle.session
        expected = set(handle.input_names())
        missing = expected - set(feeds)
        if missing:
            raise InputError(
                f"no data for model input(s) {sorted(missing)}", f"the model's inputs are {sorted(expected)}"
            )
        self._binding = session.io_binding()
        # The OrtValues must outlive the binding: on the CPU they wrap the numpy buffers without a copy.
        self._inputs = {}
        for name in handle.input_names():
            array = np.ascontiguousarray(feeds[name])
            value = ort.OrtValue.ortvalue_from_numpy(array, handle.device_type, handle.device_id)
            self._inputs[name] = (array, value)
            self._binding.bind_ortvalue_input(name, value)
        self._outputs = {}
        for name in handle.output_names():
            if output_shapes is not None:
                shape, dtype = output_shapes[name]
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(shape), dtype, handle.device_type, handle.device_id
                )
                self._outputs[name] = value
                self._binding.bind_ortvalue_output(name, value)
            else:
                self._binding.bind_output(name, handle.device_type, handle.device_id)
        self._session = session
        self._relaxed = handle.relaxed_outputs

    def __call__(self) -> None:
        self._session.run_with_iobinding(self._binding)
        if self._relaxed:  # the first run shows what a relaxed declaration really gets
            relaxed, self._relaxed = self._relaxed, ()
            label = Path(self.handle.source).name if isinstance(self.handle.source, str) else "the model"
            produced = dict(zip(self.handle.output_names(), self._binding.get_outputs()))
            produced_notes(relaxed, {n: v.shape() for n, v in produced.items()}, label)

    def outputs(self) -> dict[str, np.ndarray]:
        """The outputs of the last run, copied to host memory."""
        arrays = self._binding.copy_outputs_to_cpu()
        return dict(zip(self.handle.output_names(), arrays))

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtypes of the last run's outputs (to preallocate them for a CUDA graph)."""
        return {name: (tuple(a.shape), a.dtype) for name, a in self.outputs().items()}


class Target:
    """Base of the execution targets. Subclasses set the class attributes and `is_available`."""

    name: ClassVar[str]
    description: ClassVar[str]
    providers: ClassVar[tuple[str, ...]]  # priority order; the first one must really be active
    precisions: ClassVar[tuple[str, ...]]  # precisions this target runs with its own kernels
    device_type: ClassVar[str] = "cpu"
    # Whether the calling thread's CPU time measures a one-thread run faithfully. True for CPU
    # kernels run on the calling thread; False where the work happens elsewhere (a GPU).
    cpu_time_measures_work: ClassVar[bool] = True
    runtime: ClassVar[str] = "onnxruntime"
    int8: ClassVar[Int8Form | None] = None
    package_formats: ClassVar[tuple[str, ...]] = ()
    # Whether the kernels timed on this host are the target's own (CPU: yes; a phone, a GPU elsewhere: no).
    kernels_measurable_here: ClassVar[bool] = False

    def is_available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def session_threads(self) -> int:
        """Intra-op threads a session on this target gets unless told otherwise."""
        return 1

    def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            description=self.description,
            runtime=self.runtime,
            providers=self.providers,
            precisions=self.precisions,
            int8=self.int8,
            fp16_native="fp16" in self.precisions,
            package_formats=self.package_formats,
            kernels_measurable_here=self.kernels_measurable_here,
            device_type=self.device_type,
        )

    def int8_types(self, cpu: HostCpu | None = None) -> Int8Types:
        """The INT8 activation/weight types for this target; `cpu` (default: this host) decides the
        "host" activation form. Raises InputError where the target takes no INT8 model."""
        if self.int8 is None:
            raise InputError(
                f"target {self.name!r} takes no INT8 model", f"targets with INT8: {', '.join(_int8_target_names())}"
            )
        if self.int8.activation == "s8":
            return Int8Types(activation="s8", weight="s8", reduce_range=False, reason=f"s8/s8: {self.int8.note}")
        if self.int8.activation == "u8":
            return Int8Types(activation="u8", weight="s8", reduce_range=False, reason=f"u8/s8: {self.int8.note}")
        if cpu is None:
            from dlopt.targets.cpu import host_cpu

            cpu = host_cpu()
        if not cpu.is_x86:
            return Int8Types(
                activation="s8", weight="s8", reduce_range=False, reason="s8/s8: ARM int8 dot-product kernels are s8·s8"
            )
        if cpu.vnni:
            return Int8Types(
                activation="u8",
                weight="s8",
                reduce_range=False,
                reason=f"u8/s8, full range: the CPU has VNNI ({', '.join(cpu.isa_flags)})",
            )
        return Int8Types(
            activation="u8",
            weight="s8",
            reduce_range=True,
            reason="u8/s8 with reduce_range (7-bit weights): no VNNI on this CPU "
            f"({', '.join(cpu.isa_flags) or 'no flags read'}), its u8·s8 kernel sums pairs "
            "in 16 bits and would saturate",
        )

    def default_clock(self, threads: int) -> str:
        """'cpu' (thread CPU time) where it measures the whole run, else 'wall'.

        With more than one intra-op thread, work runs on pool threads that the calling thread's CPU
        time does not see, so only wall time is honest there."""
        return "cpu" if self.cpu_time_measures_work and threads == 1 else "wall"

    def provider_options(
        self, *, device_id: int = 0, cuda_graph: bool = False, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Options for this target's first provider. CPU takes none."""
        if cuda_graph:
            raise InputError(f"target {self.name!r} has no CUDA graphs", "use {target=cuda}, or drop {cuda_graph}")
        return dict(extra or {})

    def device_name(self, device_id: int = 0) -> str:
        return self.description

    def memory_in_use(self, device_id: int = 0) -> int | None:
        """Bytes in use on the target's device (None where the device is the host: see process RSS)."""
        return None

    def require_available(self) -> None:
        ok, reason = self.is_available()
        if not ok:
            raise TargetUnavailableError(
                f"target {self.name!r} is not available here: {reason}",
                "use {target=cpu}, or {allow_fallback} to run on the CPU labelled as such",
            )

    def create_session(
        self,
        model: str | Path | bytes,
        *,
        threads: int = 1,
        graph_opt_level: str = "all",
        provider_options: Mapping[str, str] | None = None,
        allow_fallback: bool = False,
        device_id: int = 0,
        check_available: bool = True,
        free_dimensions: Mapping[str, int] | None = None,
        profile_prefix: str | None = None,
    ) -> TargetSession:
        """Build a session for `model` (a path or serialized bytes) on this target.

        `free_dimensions` fixes named dynamic axes (e.g. {"batch": 1, "seq": 128}), which lets graph
        optimization fold shape computations away (a CUDA graph needs that).
        Raises TargetUnavailableError when the target cannot run here or ONNX Runtime silently put the
        session on another provider; with `allow_fallback` the session is returned labelled as CPU.
        `profile_prefix`: ONNX Runtime's profiler on, its trace written under this prefix (dlopt.profile)."""
        import onnxruntime as ort

        fallback_only = False
        if check_available:
            ok, reason = self.is_available()
            if not ok:
                if not allow_fallback:
                    self.require_available()
                fallback_only = True  # allowed: build it on the CPU, labelled as such
        options = session_options(threads=threads, graph_opt_level=graph_opt_level)
        for dim_name, size in (free_dimensions or {}).items():
            options.add_free_dimension_override_by_name(dim_name, int(size))
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        first = self.providers[0]
        if fallback_only:
            requested: list[Any] = [CPU_PROVIDER]
        else:
            first_options = dict(provider_options or {})
            if first != CPU_PROVIDER or first_options:
                requested = [(first, first_options)] + [p for p in self.providers[1:]]
            else:
                requested = list(self.providers)
        source = str(model) if isinstance(model, Path) else model
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # "Specified provider ... is not in available provider names": checked below, as an error
                warnings.simplefilter("ignore", UserWarning)
                with session_source(source) as (relaxed, relaxed_outputs):  # wrong declarations (dlopt.sessions)
                    session = ort.InferenceSession(relaxed, sess_options=options, providers=requested)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented …)
            label = source if isinstance(source, str) else "the model"
            raise InputError(
                f"onnxruntime cannot load {label} on target {self.name!r}: {str(e).strip()[:400]}",
                "check the model with `python -m onnx.checker`, or try another {target=NAME}",
            ) from e
        load_s = time.perf_counter() - start
        active = tuple(session.get_providers())
        runs_on = self.name
        if active[0] != first:
            if not allow_fallback:
                raise TargetUnavailableError(
                    f"target {self.name!r} asked onnxruntime for {first} but the session runs on "
                    f"{', '.join(active)} (a silent fallback: results would be CPU numbers)",
                    f"install a build of onnxruntime with {first} (and its libraries), or pass "
                    "{allow_fallback} to measure on the CPU labelled as such",
                )
            runs_on = "cpu"
        names = tuple(p if isinstance(p, str) else p[0] for p in requested)
        return TargetSession(
            session=session,
            target=self.name,
            runs_on=runs_on,
            requested_providers=names,
            active_providers=active,
            device_type=self.device_type if runs_on == self.name else "cpu",
            device_id=device_id,
            load_s=load_s,
            threads=threads,
            graph_opt_level=graph_opt_level,
            provider_options=dict(provider_options or {}) if not fallback_only else {},
            source=source,
            relaxed_outputs=relaxed_outputs,
        )

    def bind(self, handle: TargetSession, feeds: Mapping[str, np.ndarray]) -> BoundRun:
        """Place `feeds` on the session's device once; the returned callable runs the model."""
        return BoundRun(handle, feeds)


def _int8_target_names() -> list[str]:
    from dlopt.targets import target_names

    return target_names(int8=True)
