"""dlopt.runtime: every session carries dlopt's configuration, and denormals are really flushed on the
calling thread only when the process's first ONNX Runtime session carried the option."""

import subprocess
import sys

import pytest

from dlopt.runtime import isa_line
from dlopt.sessions import SESSION_CONFIG
from dlopt.sessions import session_options
from dlopt.targets.cpu import HostCpu

PROBE = """
import onnxruntime as ort
from dlopt import runtime
{first}
print(runtime.flush_denormals())
"""


@pytest.mark.parametrize("first, flushed", [
    ("", True),  # dlopt's own first session carries the option
    ("runtime.initialize()", True),
    # a first session made without it (e.g. by the user's code) turns it off on the caller for good
    ("ort.InferenceSession(runtime._denormal_probe().SerializeToString(), providers=['CPUExecutionProvider'])", False),
    ("runtime.initialize(denormal_as_zero=False)", False),
])
def test_denormals_are_flushed_on_the_calling_thread_only_when_the_first_session_says_so(first, flushed):
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == str(flushed)


def test_session_options_carry_the_config_and_the_level():
    options = session_options(threads=3, graph_opt_level="basic")
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    for key, value in SESSION_CONFIG.items():
        assert options.get_session_config_entry(key) == value
    assert session_options(graph_opt_level="disable").graph_optimization_level.name == "ORT_DISABLE_ALL"
    # a stage's own entries come on top of dlopt's
    both = session_options(config_entries={"session.enable_saved_runtime_optimizations": "1"})
    assert both.get_session_config_entry("session.enable_saved_runtime_optimizations") == "1"
    assert both.get_session_config_entry("session.set_denormal_as_zero") == "1"
    with pytest.raises(Exception, match="does not have configuration with key"):
        session_options(denormal_as_zero=False).get_session_config_entry("session.set_denormal_as_zero")


@pytest.mark.parametrize("cpu, line", [
    (HostCpu.with_flags("x86_64", ("avx2", "fma")), "x86_64: AVX2, FMA, no AVX-512, no VNNI"),
    (HostCpu.with_flags("x86_64", ("amx_int8", "avx2", "avx512_vnni", "avx512f", "fma")), "x86_64: AVX-512, VNNI, AMX"),
    (HostCpu.with_flags("aarch64", ("asimddp",)), "aarch64: dot-product int8 (asimddp)"),
])
def test_isa_line_names_what_decides_int8_speed(cpu, line):
    assert isa_line(cpu) == line
