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
    assert "--allow-fallback" in e.value.hint


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
