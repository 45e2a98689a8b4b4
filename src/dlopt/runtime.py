"""The ONNX Runtime session configuration dlopt uses wherever it runs a model, and recommends in bundles.

Denormals. Softmax over padded input exponentiates masked logits (-3.4e38, or -1e4: the same) into
denormal floats, and x86 cores handle each denormal operand in a slow microcode assist. On MiniLM-L6 with
real sentences padded to 128 tokens that cost ~5 ms per call on a Xeon (26 -> 33 ms FP32, 8.6 -> 14.5 ms
INT8) and, on this 2-core AMD EPYC, the table printed by benchmarks/denormals.py. ONNX Runtime's session
option `session.set_denormal_as_zero` sets flush-to-zero and denormals-are-zero (the MXCSR bits) on the
session's intra-op pool threads; on the *calling* thread it sets them only once per process, from the
options of the FIRST session created (a `std::call_once` in InferenceSession's initialization), and
clears them there when that first session lacks the option. With one intra-op thread the caller does all
the work, so a process whose first session lacks the option keeps denormals for good.

So every session dlopt creates carries the option (dlopt.sessions.session_options), and `flush_denormals()` checks what
really holds on the calling thread by running a one-node graph whose exact result is a denormal. The option
is always on rather than timed per CPU: it removes microcode assists and adds no work, so it cannot make
a kernel slower (measured no slower here: benchmarks/denormals.py), and the calling thread's state cannot
be timed both ways inside one process anyway. Numerically it only changes values below 1.2e-38 to zero.
A side effect: numpy and torch code run afterwards on the same thread see FTZ/DAZ too.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from dlopt.sessions import SESSION_CONFIG, session_options


def _denormal_probe():
    """A one-node graph y = x * 0.5: fed 2e-38 (a normal float), its exact result 1e-38 is a denormal,
    which flush-to-zero turns into 0."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "half"], ["y"])],
        "denormal_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.full(4, 0.5, np.float32), "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def initialize(*, denormal_as_zero: bool = True) -> None:
    """Create this process's first ONNX Runtime session, with dlopt's options, if none was created yet
    through here; every later call is free. Call it before any other session is made."""
    _first_session(denormal_as_zero)


@lru_cache(maxsize=1)
def _first_session(denormal_as_zero: bool) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(
        _denormal_probe().SerializeToString(),
        session_options(denormal_as_zero=denormal_as_zero),
        providers=["CPUExecutionProvider"],
    )
    out = session.run(None, {"x": np.full(4, 2e-38, np.float32)})[0]
    return bool(np.all(out == 0))


def flush_denormals() -> bool:
    """Whether ONNX Runtime's kernels flush denormals to zero on the calling thread, checked (not assumed)
    by running the probe graph: the process's first session decided it (see the module docstring)."""
    import onnxruntime as ort

    initialize()
    session = ort.InferenceSession(
        _denormal_probe().SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    return bool(np.all(session.run(None, {"x": np.full(4, 2e-38, np.float32)})[0] == 0))


def runtime_report() -> dict[str, Any]:
    """The session configuration in effect, for reports: the config entries every session carries, and
    whether denormals are really flushed on the calling thread (with why, when they are not)."""
    flushed = flush_denormals()
    return {
        "session_config": dict(SESSION_CONFIG),
        "denormals_flushed_on_calling_thread": flushed,
        "denormals": (
            "flushed to zero (session.set_denormal_as_zero, set by this process's first session)"
            if flushed
            else "NOT flushed on the calling thread: this process's first ONNX Runtime session was created "
            "without session.set_denormal_as_zero (ONNX Runtime applies it to the caller once per "
            "process); padded inputs may run slower here than in a fresh dlopt process"
        ),
    }


def cpu_label() -> str:
    """'<CPU model>, <ISA line>' for labelling figures, e.g. 'AMD EPYC, AVX2+FMA (no AVX-512, no VNNI)'."""
    from dlopt.targets.cpu import host_cpu

    cpu = host_cpu()
    return f"{cpu.label}, {isa_line(cpu)}"


def isa_line(cpu) -> str:
    """The ISA facts that decide int8/float kernel speed, from dlopt.targets.cpu.host_cpu() (or anything with
    its machine, flags and vnni), e.g.
    'x86_64: AVX2, FMA, no AVX-512, no VNNI' or 'x86_64: AVX-512, VNNI, AMX'."""
    flags = set(cpu.flags)
    if cpu.machine not in ("x86_64", "amd64", "i686", "x86"):
        return f"{cpu.machine}: " + ("dot-product int8 (asimddp)" if "asimddp" in flags else "no int8 dot product")
    parts = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
    if "avx512f" not in flags:
        parts += ["FMA"] * ("fma" in flags) + ["no AVX-512"]
    parts.append("VNNI" if cpu.vnni else "no VNNI")
    if "amx_int8" in flags:
        parts.append("AMX")
    return f"{cpu.machine}: {', '.join(parts)}"


__all__ = ["cpu_label", "flush_denormals", "initialize", "isa_line", "runtime_report"]
