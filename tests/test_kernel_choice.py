"""Residual sums before LayerNorms: the rewrite that keeps ORT from fusing them into SkipLayerNormalization."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from dlopt.optimize.kernel_choice import (
    KernelChoiceConfig,
    choose_layernorm_form,
    find_layernorm_sites,
    time_layernorm_forms,
)
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 32


def _residual_block_model(opset: int = 17):
    """x -> MatMul -> Add(x) -> LayerNorm -> SkipLayerNorm(with beta, bias; its sum output used) -> y."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(
        rng.normal(0, 0.3, shape).astype(np.float32) + (1.0 if name.startswith("gamma") else 0.0), name)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "x"], ["residual"], name="residual_add"),
        helper.make_node("LayerNormalization", ["residual", "gamma1", "beta1"], ["ln1"], name="ln1", axis=-1,
                         epsilon=1e-5),
        helper.make_node("MatMul", ["ln1", "w2"], ["h2"], name="proj2"),
        helper.make_node("SkipLayerNormalization", ["h2", "ln1", "gamma2", "beta2", "bias2"],
                         ["y", "", "", "summed"], name="skip_ln", domain="com.microsoft", epsilon=1e-5),
        helper.make_node("Mul", ["summed", "y"], ["z"], name="use_sum"),
    ]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8, HIDDEN]) for name in ("y", "z")],
        [init("w", HIDDEN, HIDDEN), init("w2", HIDDEN, HIDDEN), init("gamma1", HIDDEN), init("beta1", HIDDEN),
         init("gamma2", HIDDEN), init("beta2", HIDDEN), init("bias2", HIDDEN)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _session_ops(model, tmp_path) -> list[str]:
    """The op types ORT runs after its own session-time fusions (ORT_ENABLE_ALL)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "session_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _run(model, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


def test_sites_are_the_fusable_add_and_the_skip_layernorm():
    sites = find_layernorm_sites(_residual_block_model())
    assert [n.name for n in sites["add"]] == ["residual_add"]
    assert [n.name for n in sites["skip_layernorm"]] == ["skip_ln"]


def test_unfused_form_keeps_outputs_and_stops_ort_fusing(tmp_path):
    model = _residual_block_model()
    before = model.SerializeToString()
    assert "SkipLayerNormalization" in _session_ops(model, tmp_path)
    result = choose_layernorm_form(model, KernelChoiceConfig(layernorm="unfused"))
    assert model.SerializeToString() == before  # the input is never modified
    assert result.report["rewritten"] == 2
    ops = [n.op_type for n in result.model.graph.node]
    assert "SkipLayerNormalization" not in ops and "Add" not in ops
    assert ops.count("Sum") == 2 and ops.count("LayerNormalization") == 2
    onnx.checker.check_model(result.model)
    # ORT's session-time SkipLayerNormFusion matches Add only: the rewritten graph stays unfused
    assert "SkipLayerNormalization" not in _session_ops(result.model, tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 8, HIDDEN)).astype(np.float32)
    for expected, actual in zip(_run(model, x), _run(result.model, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_fused_or_a_small_gain_leaves_the_model_as_it_is():
    model = _residual_block_model()
    assert choose_layernorm_form(model, KernelChoiceConfig(layernorm="fused")).model is model
    slow_unfused = {"fused_us": 100.0, "unfused_us": 95.0, "ratio": 1.05}
    result = choose_layernorm_form(model, KernelChoiceConfig(min_gain=1.15), timing=slow_unfused)
    assert result.model is model and result.report["rewritten"] == 0
    assert "kept fused" in result.report["decision"]
    fast_unfused = {"fused_us": 300.0, "unfused_us": 60.0, "ratio": 5.0}
    result = choose_layernorm_form(model, KernelChoiceConfig(min_gain=1.15), timing=fast_unfused)
    assert result.report["rewritten"] == 2 and "unfused" in result.report["decision"]


def test_skip_layernorm_below_opset_17_is_left_alone():
    sites = choose_layernorm_form(_residual_block_model(opset=16), KernelChoiceConfig(layernorm="unfused"))
    ops = [n.op_type for n in sites.model.graph.node]
    assert "SkipLayerNormalization" in ops  # no ONNX LayerNormalization before opset 17 to write instead
    assert ops.count("Sum") == 1


def test_graph_without_layernorm_has_nothing_to_choose():
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = choose_layernorm_form(model)
    assert result.model is model and result.report["sites"] == 0


def test_timing_measures_both_forms():
    timing = time_layernorm_forms(HIDDEN, KernelChoiceConfig(rows=16, rounds=3, runs_per_round=5))
    assert timing["fused_us"] > 0 and timing["unfused_us"] > 0
    assert np.isfinite(timing["ratio"]) and timing["ratio"] > 0


def test_quantize_writes_the_chosen_form_and_reports_it():
    from dlopt.optimize.quantize import QuantizeConfig, quantize

    model = _residual_block_model()
    config = QuantizeConfig(mode="dynamic", layernorm_form="unfused", speed_check=False, preprocess=False)
    result = quantize(model, config)
    assert result.report["kernel_choice"]["rewritten"] == 2
    ops = [n.op_type for n in result.model.graph.node]
    assert "MatMulInteger" in ops and "SkipLayerNormalization" not in ops and ops.count("Sum") == 2
    kept = quantize(model, QuantizeConfig(mode="dynamic", layernorm_form="fused", speed_check=False, preprocess=False))
    assert kept.report["kernel_choice"]["rewritten"] == 0
    assert "SkipLayerNormalization" in [n.op_type for n in kept.model.graph.node]


def test_a_qdq_quantized_add_is_left_to_ort():
    model = _residual_block_model()
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "h_scale")
    zero = numpy_helper.from_array(np.array(128, np.uint8), "h_zero")
    model.graph.initializer.extend([scale, zero])
    nodes = list(model.graph.node)
    quantize_h = helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zero"], ["h_q"], name="q")
    dequantize_h = helper.make_node("DequantizeLinear", ["h_q", "h_scale", "h_zero"], ["h_dq"], name="dq")
    nodes[1].input[0] = "h_dq"  # residual_add now reads a dequantized tensor, as in a static QDQ graph
    del model.graph.node[:]
    model.graph.node.extend(nodes[:1] + [quantize_h, dequantize_h] + nodes[1:])
    assert find_layernorm_sites(model)["add"] == []
