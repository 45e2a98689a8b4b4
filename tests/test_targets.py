"""Targets: registry, availability with reasons, silent-fallback detection, IO binding, CUDA (GPU only)."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError, TargetUnavailableError
from dlopt.targets import TARGETS, BoundRun, CpuTarget, CudaTarget, get_target

CUDA_OK, CUDA_REASON = CudaTarget().is_available()
needs_no_cuda = pytest.mark.skipif(CUDA_OK, reason="this machine has a working CUDA EP")
cuda = pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA here: {CUDA_REASON}")


def _mlp_bytes(batch="batch") -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Tanh", ["z"], ["y"]), helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _reference(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    return np.tanh(x @ w + b)


def test_registry_and_declared_capabilities():
    assert {"cpu", "cuda"} <= set(TARGETS)
    cpu, gpu = get_target("cpu"), get_target("cuda")
    assert cpu.providers == ("CPUExecutionProvider",) and "int8" in cpu.precisions
    assert gpu.providers[0] == "CUDAExecutionProvider" and "fp16" in gpu.precisions
    with pytest.raises(InputError, match="unknown target 'tpu'") as e:
        get_target("tpu")
    assert "cpu" in e.value.hint and "cuda" in e.value.hint


def test_cpu_is_available_and_says_which_onnxruntime():
    import onnxruntime as ort

    ok, reason = CpuTarget().is_available()
    assert ok and ort.__version__ in reason


def test_clock_choice_follows_where_the_work_runs():
    assert CpuTarget().default_clock(1) == "cpu"
    assert CpuTarget().default_clock(4) == "wall"  # pool threads are invisible to thread_time
    assert CudaTarget().default_clock(1) == "wall"


@needs_no_cuda
def test_cuda_is_unavailable_here_with_a_reason_that_says_what_to_do():
    ok, reason = CudaTarget().is_available()
    assert not ok
    assert "onnxruntime-gpu" in reason or "fell back" in reason


@needs_no_cuda
def test_silent_fallback_is_an_error_even_when_onnxruntime_only_warns():
    # Skip our availability check: onnxruntime itself is asked for CUDA, warns, and builds a CPU session.
    with pytest.raises(TargetUnavailableError, match="silent fallback") as e:
        CudaTarget().create_session(_mlp_bytes(), check_available=False)
    assert "--allow-fallback" in e.value.cli_text() and "allow_fallback=True" in str(e.value)


@needs_no_cuda
def test_allowed_fallback_is_labelled_as_cpu():
    handle = CudaTarget().create_session(_mlp_bytes(), allow_fallback=True)
    assert handle.fell_back and handle.runs_on == "cpu" and handle.target == "cuda"
    assert handle.active_providers == ("CPUExecutionProvider",) and handle.device_type == "cpu"
    with pytest.raises(TargetUnavailableError, match="not available here"):
        CudaTarget().create_session(_mlp_bytes())


@needs_no_cuda
def test_bench_on_cuda_without_a_gpu_exits_2_with_a_clear_message(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_mlp_bytes())
    result = CliRunner().invoke(main, ["bench", str(path), "--target", "cuda", "--budget", "1s"])
    assert result.exit_code == 2
    assert "target 'cuda' is not available here" in result.output
    assert "Traceback" not in result.output


def test_cpu_session_reads_back_its_settings():
    handle = CpuTarget().create_session(_mlp_bytes(), threads=2, graph_opt_level="basic")
    assert handle.runs_on == "cpu" and not handle.fell_back
    assert handle.threads == 2 and handle.graph_opt_level == "basic" and handle.load_s > 0
    assert handle.input_names() == ["x"] and handle.output_names() == ["y", "s"]


@pytest.mark.parametrize("kwargs, match", [({"threads": 0}, "threads must be at least 1"),
                                           ({"graph_opt_level": "max"}, "unknown graph optimization level")])
def test_bad_session_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        CpuTarget().create_session(_mlp_bytes(), **kwargs)


def test_corrupt_model_is_an_input_error():
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        CpuTarget().create_session(b"not a model")


def test_cuda_graph_is_refused_on_the_cpu_and_set_on_cuda():
    with pytest.raises(InputError, match="no CUDA graphs"):
        CpuTarget().provider_options(cuda_graph=True)
    assert CudaTarget().provider_options(device_id=1, cuda_graph=True) == {"device_id": "1", "enable_cuda_graph": "1"}


def test_bound_run_matches_session_run_and_numpy():
    handle = CpuTarget().create_session(_mlp_bytes())
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    bound = get_target("cpu").bind(handle, {"x": x})
    bound()
    out = bound.outputs()
    y, s = handle.session.run(None, {"x": x})
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_allclose(out["y"], _reference(x), rtol=1e-5, atol=1e-6)
    assert out["s"].shape == () and float(out["s"]) == pytest.approx(float(y.sum()), rel=1e-5)
    assert bound.output_shapes() == {"y": ((3, 8), np.dtype(np.float32)), "s": ((), np.dtype(np.float32))}


def test_preallocated_outputs_path_used_by_cuda_graphs_works_on_cpu():
    # The CUDA-graph binding preallocates outputs from a probe run's shapes; the same code on the CPU.
    handle = CpuTarget().create_session(_mlp_bytes())
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    probe = BoundRun(handle, {"x": x})
    probe()
    bound = BoundRun(handle, {"x": x}, output_shapes=probe.output_shapes())
    bound()
    bound()  # replays write into the same buffers
    np.testing.assert_allclose(bound.outputs()["y"], _reference(x), rtol=1e-5, atol=1e-6)


def test_binding_with_a_missing_input_names_it():
    handle = CpuTarget().create_session(_mlp_bytes())
    with pytest.raises(InputError, match=r"no data for model input\(s\) \['x'\]"):
        BoundRun(handle, {"other": np.zeros((1, 16), np.float32)})


@pytest.mark.cuda
@cuda
def test_cuda_io_binding_matches_the_cpu():
    x = np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)
    gpu = get_target("cuda")
    handle = gpu.create_session(_mlp_bytes(), provider_options=gpu.provider_options())
    assert handle.active_providers[0] == "CUDAExecutionProvider" and handle.device_type == "cuda"
    bound = gpu.bind(handle, {"x": x})
    bound()
    np.testing.assert_allclose(bound.outputs()["y"], _reference(x), rtol=1e-4, atol=1e-5)
    assert isinstance(gpu.memory_in_use(), int) and gpu.memory_in_use() > 0


@pytest.mark.cuda
@cuda
def test_cuda_graph_replay_matches_the_cpu():
    x = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    gpu = get_target("cuda")
    # ReduceSum to a scalar is fine on CUDA; every node must be on the CUDA EP for a graph.
    handle = gpu.create_session(_mlp_bytes(batch=8), provider_options=gpu.provider_options(cuda_graph=True))
    bound = gpu.bind(handle, {"x": x})
    for _ in range(3):
        bound()
    np.testing.assert_allclose(bound.outputs()["y"], _reference(x), rtol=1e-4, atol=1e-5)


def test_free_dimension_overrides_fix_named_axes():
    from dlopt.targets.cuda import free_dimensions

    handle = CpuTarget().create_session(_mlp_bytes(), free_dimensions={"batch": 5})
    assert handle.session.get_inputs()[0].shape == [5, 16]
    plain = CpuTarget().create_session(_mlp_bytes())
    assert free_dimensions(plain.session, {"x": np.zeros((3, 16), np.float32)}) == {"batch": 3}


@needs_no_cuda
def test_cuda_graph_request_after_allowed_fallback_binds_plainly_on_the_cpu():
    gpu = CudaTarget()
    handle = gpu.create_session(_mlp_bytes(), provider_options=gpu.provider_options(cuda_graph=True),
                                allow_fallback=True)
    assert handle.fell_back and "enable_cuda_graph" not in handle.provider_options
    x = np.ones((2, 16), np.float32)
    bound = gpu.bind(handle, {"x": x})
    bound()
    np.testing.assert_allclose(bound.outputs()["y"], _reference(x), rtol=1e-5, atol=1e-6)


class _CudaLogicOnCpu(CudaTarget):
    """The CUDA target's Python logic (graph marker, probe run, free-dimension overrides, preallocated
    outputs) driven through the CPU EP, so it is tested on machines without a GPU."""

    providers = ("CPUExecutionProvider",)
    device_type = "cpu"
    name = "cuda-logic-on-cpu"

    def is_available(self):
        return True, "test double"


def test_cuda_graph_binding_logic_runs_end_to_end_through_the_cpu_ep():
    target = _CudaLogicOnCpu()
    handle = target.create_session(_mlp_bytes(), provider_options=target.provider_options(cuda_graph=True))
    assert handle.provider_options["enable_cuda_graph"] == "1"  # the marker for bind()
    assert handle.session.get_inputs()[0].shape == ["batch", 16]  # the load-time session stays dynamic
    x = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    bound = target.bind(handle, {"x": x})
    assert bound.handle is not handle and bound.handle.session.get_inputs()[0].shape == [6, 16]  # fixed axes
    bound()
    np.testing.assert_allclose(bound.outputs()["y"], _reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vendor, family, model, core", [
    ("AuthenticAMD", 23, 1, "Zen/Zen+"),      # EPYC 7001 (Naples): 256-bit AVX2 split in two
    ("AuthenticAMD", 23, 49, "Zen 2"),        # EPYC 7002 (Rome)
    ("AuthenticAMD", 25, 1, "Zen 3"),         # EPYC 7003 (Milan)
    ("AuthenticAMD", 25, 17, "Zen 4"),        # EPYC 9004 (Genoa)
    ("GenuineIntel", 6, 143, None),           # Intel names carry their model number
])
def test_cpu_core_names_tell_amd_generations_apart(vendor, family, model, core):
    from dlopt.targets.cpu import core_name

    assert core_name(vendor, family, model) == core


# --- capabilities: each target declares them once; stages and package ask the registry ---------------

@pytest.mark.parametrize("name, runtime, providers, int8, fp16_native, package_formats", [
    ("cpu", "onnxruntime", ("CPUExecutionProvider",), dict(dynamic=True, activation="host"), False, ("onnx",)),
    ("arm64", "onnxruntime", ("CPUExecutionProvider",), dict(dynamic=True, activation="s8"), False, ()),
    ("cuda", "onnxruntime", ("CUDAExecutionProvider", "CPUExecutionProvider"), dict(dynamic=False, activation="s8"),
     True, ("onnx",)),
    ("mobile", "onnxruntime", ("CPUExecutionProvider",), dict(dynamic=True, activation="s8"), False, ("ort", "pte")),
    ("xnnpack", "executorch", (), dict(dynamic=True, activation="s8"), False, ()),
])
def test_each_target_declares_its_capabilities(name, runtime, providers, int8, fp16_native, package_formats):
    import dlopt.targets as targets

    caps = targets.capabilities(name)
    assert (caps.name, caps.runtime, caps.providers) == (name, runtime, providers)
    assert {"dynamic": caps.int8.dynamic, "activation": caps.int8.activation} == int8
    assert caps.int8.weight == "s8" and caps.int8.per_channel
    assert caps.fp16_native is fp16_native and caps.fp16_native == ("fp16" in caps.precisions)
    assert caps.package_formats == package_formats
    assert caps.kernels_measurable_here is (name == "cpu")  # kernel choices timed here hold only for cpu


def test_target_names_filter_by_runtime_int8_fp16_and_package():
    from dlopt.targets import target_names

    assert target_names() == ["cpu", "arm64", "cuda", "mobile", "xnnpack"]
    assert target_names("onnxruntime", int8=True) == ["cpu", "arm64", "cuda", "mobile"]  # what quantize takes
    assert target_names("executorch") == ["xnnpack"]
    assert target_names(fp16_native=True) == ["cuda"]
    assert target_names(package=True) == ["cpu", "cuda", "mobile"]
    with pytest.raises(InputError, match="unknown runtime kind 'tflite'") as e:
        target_names("tflite")
    assert e.value.hint == "choose one of onnxruntime, executorch"
    with pytest.raises(InputError, match="unknown target 'tpu'"):
        __import__("dlopt.targets").targets.capabilities("tpu")


def test_package_targets_come_from_the_registry():
    from dlopt.package import PACKAGE_TARGETS, PackageConfig, validate_config

    assert PACKAGE_TARGETS == ("cpu", "cuda", "mobile")
    with pytest.raises(InputError, match="unknown package target 'arm64'") as e:
        validate_config(PackageConfig(target="arm64"))
    assert e.value.hint == "choose one of cpu, cuda, mobile"


# /proc/cpuinfo texts (first processor block and the start of the second), as those machines print them.
ZEN1_VM = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm rep_good nopl cpuid pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 \
movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 sha_ni
bogomips\t: 3992.50

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx512f avx512_vnni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 amx_bf16 \
amx_tile amx_int8

"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc \
dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 \
i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1

processor\t: 1
"""
CORTEX_A53 = """processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd03
CPU revision\t: 4
"""


def test_cpuinfo_reader_amd_zen1_vm():
    from dlopt.runtime import isa_line
    from dlopt.targets.cpu import parse_cpuinfo

    cpu = parse_cpuinfo(ZEN1_VM, "x86_64")
    assert (cpu.vendor, cpu.family, cpu.model, cpu.core) == ("AuthenticAMD", 23, 1, "Zen/Zen+")
    assert cpu.is_x86 and not cpu.is_arm64
    assert not cpu.vnni and not cpu.int8_dot  # the second processor's flags are not read
    assert cpu.isa_flags == ("avx2", "fma") and "sha_ni" in cpu.flags and list(cpu.flags) == sorted(cpu.flags)
    assert cpu.label == "AMD EPYC (family 23 model 1, Zen/Zen+)"
    assert isa_line(cpu) == "x86_64: AVX2, FMA, no AVX-512, no VNNI"
    types = get_target("cpu").int8_types(cpu)
    assert (types.activation, types.weight, types.reduce_range) == ("u8", "s8", True)
    assert "no VNNI on this CPU (avx2, fma)" in types.reason


def test_cpuinfo_reader_intel_with_vnni_and_amx():
    from dlopt.runtime import isa_line
    from dlopt.targets.cpu import parse_cpuinfo

    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS, "x86_64")
    assert (cpu.vendor, cpu.family, cpu.model, cpu.core) == ("GenuineIntel", 6, 143, None)
    assert cpu.vnni and cpu.int8_dot and not cpu.dotprod
    assert cpu.label == "Intel(R) Xeon(R) Platinum 8480+"  # a model number: no family/model added
    assert isa_line(cpu) == "x86_64: AVX-512, VNNI, AMX"
    types = get_target("cpu").int8_types(cpu)
    assert (types.activation, types.weight, types.reduce_range) == ("u8", "s8", False)
    assert types.reason.startswith("u8/s8, full range: the CPU has VNNI (amx_int8, avx2, avx512_vnni")
    cuda = get_target("cuda").int8_types(cpu)  # a fixed form: the host does not change it
    assert (cuda.activation, cuda.reduce_range, cuda.reason) == ("s8", False, "s8/s8: TensorRT takes symmetric int8 only")


def test_cpuinfo_reader_arm_features_dotprod_and_i8mm():
    from dlopt.runtime import isa_line
    from dlopt.targets.cpu import parse_cpuinfo

    cpu = parse_cpuinfo(GRAVITON3, "aarch64")
    assert (cpu.vendor, cpu.family, cpu.model, cpu.core) == ("ARM", 8, 0xD40, "Neoverse-V1")
    assert cpu.is_arm64 and not cpu.is_x86
    assert cpu.dotprod and cpu.i8mm and cpu.int8_dot and not cpu.vnni
    assert {"asimddp", "i8mm", "sve"} <= set(cpu.isa_flags)
    assert cpu.label == "ARM Neoverse-V1"  # aarch64 kernels print no model name
    assert isa_line(cpu) == "aarch64: dot-product int8 (asimddp)"
    types = get_target("cpu").int8_types(cpu)  # target cpu on an ARM host: s8·s8
    assert (types.activation, types.weight, types.reduce_range) == ("s8", "s8", False)

    old = parse_cpuinfo(CORTEX_A53, "aarch64")
    assert old.core == "Cortex-A53" and not old.dotprod and not old.i8mm
    assert isa_line(old) == "aarch64: no int8 dot product"
    unknown = parse_cpuinfo(CORTEX_A53.replace("0xd03", "0xabc"), "aarch64")
    assert unknown.core is None and unknown.label == "ARM part 0xabc"


def test_cpuinfo_reader_without_cpuinfo():
    from dlopt.targets.cpu import parse_cpuinfo

    cpu = parse_cpuinfo("", "ARM64")
    assert (cpu.machine, cpu.vendor, cpu.family, cpu.flags) == ("arm64", "", None, ())
    assert cpu.is_arm64 and not cpu.int8_dot


def test_bench_runtime_and_cpu_target_label_this_host_alike():
    from dlopt.bench import machine_fingerprint
    from dlopt.runtime import cpu_label, isa_line
    from dlopt.targets.cpu import cpu_model_name, host_cpu

    fingerprint = machine_fingerprint(1, get_target("cpu"))
    assert fingerprint["cpu_model"] == cpu_model_name() == host_cpu().label == get_target("cpu").device_name()
    assert fingerprint["cpu_isa"] == isa_line(host_cpu())
    assert cpu_label() == f"{fingerprint['cpu_model']}, {fingerprint['cpu_isa']}"
    assert get_target("mobile").device_name().startswith(cpu_model_name())


def test_arm64_target_runs_only_on_arm64_hosts():
    from dlopt.targets.cpu import host_cpu

    ok, reason = get_target("arm64").is_available()
    assert ok is host_cpu().is_arm64
    if not ok:
        assert reason == f"this host is {host_cpu().machine}, not ARM64"
        with pytest.raises(TargetUnavailableError, match="target 'arm64' is not available here"):
            get_target("arm64").create_session(_mlp_bytes())


def test_int8_types_refused_for_a_target_without_int8():
    from dlopt.targets import Target

    class Fp16Only(Target):
        name = "fp16-only"
        description = "test"
        providers = ("CPUExecutionProvider",)
        precisions = ("fp16",)

    with pytest.raises(InputError, match="target 'fp16-only' takes no INT8 model") as e:
        Fp16Only().int8_types()
    assert e.value.hint == "targets with INT8: cpu, arm64, cuda, mobile, xnnpack"


def test_target_errors_name_options_for_the_reader():
    """Library errors spell keyword arguments for API users and flags on the CLI (never a flag in str())."""
    with pytest.raises(InputError) as e:
        CpuTarget().provider_options(cuda_graph=True)
    assert str(e.value) == "target 'cpu' has no CUDA graphs (use target=cuda, or drop cuda_graph=True)"
    assert e.value.cli_text() == "target 'cpu' has no CUDA graphs (use --target cuda, or drop --cuda-graph)"
    with pytest.raises(InputError, match="not NAME=DIMS") as e:
        __import__("dlopt.targets.mobile").targets.mobile.parse_fix_shape("x")
    assert "--" not in str(e.value)


def test_package_asks_the_targets_what_their_bundles_hold():
    import os

    from dlopt.package import PackageConfig
    from dlopt.package.config import builds
    from dlopt.targets.mobile import PHONE_THREADS

    assert [t for t in ("cpu", "cuda", "mobile") if builds(PackageConfig(target=t), "ort")] == ["mobile"]
    assert [t for t in ("cpu", "cuda", "mobile") if builds(PackageConfig(target=t), "pte")] == ["mobile"]
    assert [t for t in ("cpu", "cuda", "mobile") if builds(PackageConfig(target=t), "onnx")] == ["cpu", "cuda"]
    # default session threads: phone-like (capped at this host's cores) for mobile, 1 elsewhere
    assert get_target("mobile").session_threads() == max(1, min(PHONE_THREADS, os.cpu_count() or 1))
    assert get_target("cpu").session_threads() == get_target("cuda").session_threads() == 1
