"""Activation fusion before quantization (dlopt.optimize.fuse_activations): each pattern's op types before
and after, and outputs equal to the unfused graph's within tolerance, through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.optimize.fuse_activations import FuseActivations, fuse_activations
from dlopt.sessions import cpu_session

SHAPE = [2, 8, 16]


def _model(nodes, consts: dict[str, float | np.ndarray], *, opset: int = 17, out: str = "y"):
    """x [2, 8, 16] -> MatMul by a seeded weight -> h -> `nodes` -> out; consts become initializers."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 1.5).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), *nodes], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, SHAPE)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _data(n: int = 4):
    rng = np.random.default_rng(1)
    return [{"x": rng.uniform(-3, 3, SHAPE).astype(np.float32)} for _ in range(n)]


def _check(model, config=FuseActivations(), *, atol=1e-4):
    result = fuse_activations(model, config, _data())
    feeds = _data(2)
    for f in feeds:
        want = cpu_session(model, graph_opt_level="disable").run(None, f)[0]
        got = cpu_session(result.model, graph_opt_level="disable").run(None, f)[0]
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-3)
    return result, [n.op_type for n in result.model.graph.node]


N = helper.make_node
CLIP = {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6}
HARDSWISH_VARIANTS = {
    "clip_div_mul": [N("Add", ["h", "three"], ["p"]), N("Clip", ["p", "zero", "six"], ["c"]),
                     N("Div", ["c", "six"], ["d"]), N("Mul", ["h", "d"], ["y"])],
    "clip_mulsixth_mul": [N("Add", ["three", "h"], ["p"]), N("Clip", ["p", "zero", "six"], ["c"]),
                          N("Mul", ["c", "sixth"], ["d"]), N("Mul", ["d", "h"], ["y"])],
    "mul_then_div": [N("Add", ["h", "three"], ["p"]), N("Clip", ["p", "zero", "six"], ["c"]),
                     N("Mul", ["h", "c"], ["m"]), N("Div", ["m", "six"], ["y"])],
    "hardsigmoid_mul": [N("HardSigmoid", ["h"], ["s"], alpha=1 / 6, beta=0.5), N("Mul", ["h", "s"], ["y"])],
}


@pytest.mark.parametrize("variant", list(HARDSWISH_VARIANTS))
def test_hardswish_patterns_become_hardswish(variant):
    result, ops = _check(_model(HARDSWISH_VARIANTS[variant], CLIP))
    assert ops == ["MatMul", "HardSwish"]
    (step,) = result.report["steps"]
    assert step["applied"] and step["sites"] == 1 and step["fused_into"] == {"HardSwish": 1}


def test_hardswish_below_opset_14_becomes_hardsigmoid_mul():
    _, ops = _check(_model(HARDSWISH_VARIANTS["clip_div_mul"], CLIP, opset=13))
    assert ops == ["MatMul", "HardSigmoid", "Mul"]


def test_near_misses_are_left_alone():
    clip5 = [N("Add", ["h", "three"], ["p"]), N("Clip", ["p", "zero", "five"], ["c"]),
             N("Div", ["c", "six"], ["d"]), N("Mul", ["h", "d"], ["y"])]
    _, ops = _check(_model(clip5, {**CLIP, "five": 5.0}))
    assert ops == ["MatMul", "Add", "Clip", "Div", "Mul"]
    shared = [N("Add", ["h", "three"], ["p"]), N("Clip", ["p", "zero", "six"], ["c"]),  # c also read elsewhere
              N("Div", ["c", "six"], ["d"]), N("Mul", ["h", "d"], ["m"]), N("Add", ["m", "c"], ["y"])]
    _, ops = _check(_model(shared, CLIP))
    assert "HardSwish" not in ops


def test_silu_becomes_quickgelu_except_for_static_int8():
    silu = [N("Sigmoid", ["h"], ["s"]), N("Mul", ["s", "h"], ["y"])]
    result, ops = _check(_model(silu, {}))
    assert ops == ["MatMul", "QuickGelu"]
    assert next(a.f for a in result.model.graph.node[1].attribute if a.name == "alpha") == 1.0
    kept, ops = _check(_model(silu, {}), FuseActivations(static_int8=True))
    assert ops == ["MatMul", "Sigmoid", "Mul"] and "silu" in kept.report["skipped"]


GELU = {"sqrt2": 2 ** 0.5, "inv_sqrt2": 2 ** -0.5, "one": 1.0, "half": 0.5}
GELU_VARIANTS = {
    "bert": [N("Div", ["h", "sqrt2"], ["t"]), N("Erf", ["t"], ["e"]), N("Add", ["e", "one"], ["a"]),
             N("Mul", ["h", "a"], ["m"]), N("Mul", ["m", "half"], ["y"])],
    "half_of_sum": [N("Mul", ["h", "inv_sqrt2"], ["t"]), N("Erf", ["t"], ["e"]), N("Add", ["one", "e"], ["a"]),
                    N("Mul", ["a", "half"], ["m"]), N("Mul", ["h", "m"], ["y"])],
    "half_x_first": [N("Mul", ["h", "half"], ["hh"]), N("Div", ["h", "sqrt2"], ["t"]), N("Erf", ["t"], ["e"]),
                     N("Add", ["e", "one"], ["a"]), N("Mul", ["hh", "a"], ["y"])],
}


@pytest.mark.parametrize("variant", list(GELU_VARIANTS))
def test_gelu_patterns_become_gelu(variant):
    result, ops = _check(_model(GELU_VARIANTS[variant], GELU))
    assert ops == ["MatMul", "Gelu"]
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)


def test_gelu_after_a_bias_becomes_biasgelu():
    nodes = [N("Add", ["h", "bias"], ["hb"])] + [
        helper.make_node(n.op_type, ["hb" if i == "h" else i for i in n.input], list(n.output))
        for n in GELU_VARIANTS["bert"]]
    bias = np.linspace(-1, 1, 16, dtype=np.float32)
    result, ops = _check(_model(nodes, {**GELU, "bias": bias}))
    assert ops == ["MatMul", "BiasGelu"]
    assert result.report["steps"][0]["fused_into"] == {"BiasGelu": 1}


def test_nothing_to_fuse_is_reported_empty():
    model = _model([N("Relu", ["h"], ["y"])], {})
    result = fuse_activations(model, FuseActivations(), _data())
    assert result.model is model and result.report["steps"] == []


def test_static_quantize_fuses_before_calibration_and_reports_it():
    """dlopt's static INT8 of a Conv-hardswish-Conv model: the hard-swish is one op in the quantized graph,
    the report lists the fusion, and --no-fuse-activations leaves the four ops."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
             *[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in CLIP.items()]]
    nodes = [N("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv1"), *[onnx.NodeProto.FromString(n.SerializeToString())
                                                                  for n in HARDSWISH_VARIANTS["clip_div_mul"][:3]],
             N("Mul", ["h", "d"], ["a"]), N("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    for i, node in enumerate(nodes):
        node.name = node.name or f"n{i}"
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = [{"x": rng.uniform(-2, 2, (1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
    config = QuantizeConfig(mode="static", speed_check=False, node_forms="int8", layernorm_form="unfused")
    result = quantize(model, config, data)
    steps = result.report["activation_fusion"]["steps"]
    assert [(s["step"], s["applied"], s["sites"]) for s in steps] == [("hardswish", True, 1)]
    ops = {n.op_type for n in result.model.graph.node}
    assert "HardSwish" in ops and not ops & {"Clip", "Div"}
    assert result.report["verdict"]["passed"]
    plain = quantize(model, QuantizeConfig(mode="static", speed_check=False, node_forms="int8",
                                           layernorm_form="unfused", fuse_activations=False), data)
    assert plain.report["activation_fusion"] is None and "HardSwish" not in {n.op_type for n in plain.model.graph.node}
