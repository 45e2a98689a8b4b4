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


# -- per-node INT8 or float in static QDQ graphs ------------------------------------------------------
import pytest  # noqa: E402

from dlopt.optimize.kernel_choice import (  # noqa: E402
    NodeFormConfig,
    choose_node_forms,
    node_class,
    quantized_nodes_by_class,
    time_node_classes,
)


@pytest.mark.parametrize("op, shape, group, expected", [
    ("Conv", (16, 1, 3, 3), 16, "depthwise conv"),
    ("Conv", (32, 16, 1, 1), 1, "pointwise conv"),
    ("Conv", (32, 16, 3, 3), 1, "dense conv"),
    ("Conv", (32, 3, 3, 3), 1, "small-channel conv"),
    ("Conv", (8, 1, 5, 5), 1, "small-channel conv"),  # one input channel, not grouped: fashion-cnn's first conv
    ("Gemm", (10, 64), 1, "gemm"),
    ("MatMul", (64, 10), 1, "gemm"),
])
def test_node_classes(op, shape, group, expected):
    assert node_class(op, shape, group) == expected


def _mobile_block_model():
    """image[b, 3, 12, 12] -> stem conv 3->16 -> Relu -> depthwise 3x3 -> Relu -> pointwise 16->24 -> GAP ->
    Flatten -> Gemm 10: one node of each class."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["image", "k0", "b0"], ["a0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "k1", "b1"], ["a1"], name="dwconv", pads=[1, 1, 1, 1], group=16),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2", "b2"], ["a2"], name="pwconv"),
             helper.make_node("GlobalAveragePool", ["a2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "mobile_block", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [init("k0", 16, 3, 3, 3), init("b0", 16), init("k1", 16, 1, 3, 3), init("b1", 16), init("k2", 24, 16, 1, 1),
         init("b2", 24), init("wf", 10, 24), init("bf", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


def _fake_timer(int8_cost, float_cost, boundary_cost=0.0):
    """A timer that prices each model by kernel_costs.graph_cost (per node class and form, plus Q/DQ boundaries)."""
    from kernel_costs import graph_cost

    return lambda models, feeds: [graph_cost(m, int8_cost, float_cost, boundary_cost) for m in models]


def _quantized(model, exclude=()):
    from dlopt.data import CalibrationData
    from dlopt.optimize.quantize import QuantizeConfig, choose_recipe, quantize_int8

    config = QuantizeConfig(mode="static", method="minmax", weight_rounding="nearest", bias_correction=False,
                            node_forms="int8", speed_check=False)
    data = CalibrationData.from_arrays({"image": _images(8, 1)}, source="images")
    data.bind(model)
    recipe = choose_recipe(model, config)
    return lambda names=(): quantize_int8(model, config, recipe, data, exclude_nodes=list(exclude) + list(names))[0]


def _ran_ops(model, tmp_path):
    return _session_ops(model, tmp_path)


def test_quantized_nodes_are_classified_by_kernel():
    model = _mobile_block_model()
    classes = quantized_nodes_by_class(model, _quantized(model)())
    assert {k: [n.name for n in v] for k, v in classes.items()} == {
        "small-channel conv": ["stem"], "depthwise conv": ["dwconv"], "pointwise conv": ["pwconv"], "gemm": ["head"]}


def test_a_class_whose_int8_form_is_slower_stays_float_when_the_whole_model_gains(tmp_path):
    model = _mobile_block_model()
    requantize = _quantized(model)
    qdq = requantize()
    timer = _fake_timer(int8_cost={"depthwise conv": 5.0}, float_cost={"depthwise conv": 1.0}, boundary_cost=0.5)
    result = choose_node_forms(model, qdq, {"image": _images(1, 2)}, requantize, NodeFormConfig(), timer=timer)
    report = result.report
    assert report["float_classes"] == ["depthwise conv"] and report["kept"] and report["float_nodes"] == ["dwconv"]
    assert report["classes"]["depthwise conv"]["ratio"] == 5.0 and report["classes"]["gemm"]["ratio"] == 1.0
    assert report["whole_model"]["gain"] == pytest.approx(4.0 / 1.5 * 1.0 / 1.0, rel=0.5)
    assert "1 node(s) kept in float (depthwise conv)" in report["decision"]
    ran = _ran_ops(result.model, tmp_path)  # ORT runs the depthwise conv in float, the others in INT8
    assert ran.count("QLinearConv") == 2 and ran.count("Conv") + ran.count("FusedConv") == 1
    assert model.SerializeToString() == _mobile_block_model().SerializeToString()


def test_the_choice_is_reverted_when_the_whole_model_is_not_faster():
    model = _mobile_block_model()
    requantize = _quantized(model)
    qdq = requantize()
    # the depthwise conv is slower in INT8, but the Q/DQ pair around it as a float node costs more
    timer = _fake_timer(int8_cost={"depthwise conv": 2.0}, float_cost={"depthwise conv": 1.0}, boundary_cost=2.0)
    result = choose_node_forms(model, qdq, {"image": _images(1, 2)}, requantize, NodeFormConfig(), timer=timer)
    assert result.report["float_classes"] == ["depthwise conv"] and not result.report["kept"]
    assert result.model is qdq and "all INT8" in result.report["decision"]


def test_int8_forms_asked_skips_the_timing():
    model = _mobile_block_model()
    qdq = _quantized(model)()
    result = choose_node_forms(model, qdq, {"image": _images(1, 2)}, lambda names: pytest.fail("requantized"),
                               NodeFormConfig(forms="int8"), timer=lambda m, f: pytest.fail("timed"))
    assert result.model is qdq and result.report["decision"] == "every quantizable node INT8 (asked)"


def test_both_forms_are_really_timed_in_the_models_shapes():
    model = _mobile_block_model()
    timing = time_node_classes(model, _quantized(model)(), {"image": _images(2, 3)},
                               NodeFormConfig(rounds=3, runs_per_round=2))
    assert set(timing) == {"small-channel conv", "depthwise conv", "pointwise conv", "gemm"}
    for t in timing.values():
        assert t["float_us"] > 0 and t["int8_us"] > 0 and t["ratio"] == pytest.approx(t["int8_us"] / t["float_us"],
                                                                                      rel=1e-2)


def test_quantize_reports_the_node_forms_and_keeps_the_faster_model(monkeypatch):
    import dlopt.optimize.kernel_choice as kc
    from dlopt.data import CalibrationData
    from dlopt.optimize.quantize import QuantizeConfig, quantize, quantize_text

    monkeypatch.setattr(kc, "time_models", lambda models, feeds, **_: _fake_timer(
        {"small-channel conv": 4.0}, {"small-channel conv": 1.0}, 0.5)(models, feeds))
    data = CalibrationData.from_arrays({"image": _images(8, 1)}, source="images")
    result = quantize(_mobile_block_model(), QuantizeConfig(mode="static", speed_check=False), data)
    forms = result.report["node_forms"]
    assert forms["kept"] and forms["float_nodes"] == ["stem"] and result.report["nodes_excluded"] == ["stem"]
    stem = next(n for n in result.model.graph.node if n.name == "stem")
    assert stem.input[1] in {t.name for t in result.model.graph.initializer}  # float weights
    text = quantize_text(result.report)
    assert "node forms: 1 node(s) kept in float (small-channel conv)" in text and "runs as" in text
    import json
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(result.report["node_forms"], default=str)),
                        {**schema["properties"]["node_forms"], "$defs": schema["$defs"]})
