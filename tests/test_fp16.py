"""FP16 conversion on tiny graphs built in code: overflow and underflow kept FP32 automatically (checked
with onnx's reference evaluator, which computes every FP16 op in FP16), converter pitfalls repaired,
exclusions, fidelity floor, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dlopt.errors import InputError, StageError
from dlopt.optimize.fp16 import Fp16, convert_fp16

SQNR_FLOOR_FP16_DB = 50.0  # FP16 keeps 11 significant bits: ~60-70 dB on well-scaled values


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def _model(nodes, inits, x_type=TensorProto.FLOAT, x_shape=(1, 8)):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", x_type, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def overflow_model():
    """big_mm's output reaches ~2e5 (beyond FP16's 65504); the Mul brings it back to ~200."""
    rng = np.random.default_rng(0)
    return _model([helper.make_node("MatMul", ["x", "w"], ["big"], name="big_mm"),
                   helper.make_node("Mul", ["big", "s"], ["z"], name="scale"),
                   helper.make_node("MatMul", ["z", "w2"], ["y"], name="head")],
                  [_init("w", rng.standard_normal((8, 8)) * 3e4), _init("s", 1e-3),
                   _init("w2", rng.standard_normal((8, 4)) / 3)])


def underflow_model():
    """b = x·1e-8 flushes to zero in FP16, and b/b is then 0/0 = NaN."""
    return _model([helper.make_node("Mul", ["x", "s"], ["a"], name="tiny"),
                   helper.make_node("Mul", ["a", "s"], ["b"], name="tinier"),
                   helper.make_node("Div", ["b", "b"], ["c"], name="ratio"),
                   helper.make_node("Add", ["c", "x"], ["y"], name="add")], [_init("s", 1e-4)])


def mlp_model():
    rng = np.random.default_rng(1)
    return _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                   helper.make_node("Relu", ["h"], ["r"], name="relu"),
                   helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                  [_init("w1", rng.standard_normal((8, 256)) / 3), _init("w2", rng.standard_normal((256, 4)) / 16)])


def feeds(count: int = 4, seed: int = 2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(count)]


def exact_fp16(model, samples):
    """Outputs with every FP16 op computed in FP16 (numpy), as a GPU would store them."""
    evaluator = ReferenceEvaluator(model)
    with np.errstate(all="ignore"):
        return [evaluator.run(None, s)[0] for s in samples]


def sqnr_db(reference, candidate) -> float:
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    out = np.concatenate([c.ravel() for c in candidate]).astype(np.float64)
    return float(20 * np.log10(np.linalg.norm(ref) / max(np.linalg.norm(ref - out), 1e-30)))


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def initializer_type(model, name_prefix):
    return next(t.data_type for t in model.graph.initializer if t.name.startswith(name_prefix))


def test_overflowing_node_is_kept_fp32_and_output_is_finite():
    model, data = overflow_model(), feeds()
    before = model.SerializeToString()
    result = convert_fp16(model, Fp16(), data)
    assert model.SerializeToString() == before
    assert set(result.report["fp32_nodes"]) == {"big_mm", "scale"}
    assert "reaches" in result.report["fp32_nodes"]["big_mm"]
    q = result.model
    assert initializer_type(q, "w") == TensorProto.FLOAT  # big_mm's weight stayed FP32
    assert initializer_type(q, "w2") == TensorProto.FLOAT16  # the rest is FP16
    reference = exact_fp16(model, data)
    out = exact_fp16(q, data)
    assert all(np.isfinite(o).all() for o in out)
    assert sqnr_db(reference, out) > 40.0
    assert result.report["fidelity"]["outputs"]["y"]["finite"] is True
    assert result.report["fp16_check"].startswith("onnx reference evaluator")


def test_without_fallback_the_same_graph_overflows():
    """The guard above is needed: a plain conversion of this graph gives Inf/NaN, and is refused."""
    with pytest.raises(StageError, match=r"outputs \['y'\] are NaN/Inf"):
        convert_fp16(overflow_model(), Fp16(auto_fallback=False), feeds())


def test_underflow_into_a_division_is_kept_fp32():
    model, data = underflow_model(), feeds()
    result = convert_fp16(model, Fp16(), data)
    assert {"tinier", "ratio"} <= set(result.report["fp32_nodes"])
    out = exact_fp16(result.model, data)
    assert all(np.isfinite(o).all() for o in out)
    np.testing.assert_allclose(np.concatenate(out), np.concatenate(exact_fp16(model, data)), rtol=2e-3, atol=2e-3)
    with pytest.raises(StageError):
        convert_fp16(model, Fp16(auto_fallback=False), data)


def test_plain_graph_converts_entirely_within_the_fidelity_floor():
    model, data = mlp_model(), feeds()
    result = convert_fp16(model, Fp16(), data)
    q = result.model
    assert result.report["fp32_nodes"] == {}
    assert all(t.data_type == TensorProto.FLOAT16 for t in q.graph.initializer)
    # keep_io_types: the graph's inputs and outputs are still FP32
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert sqnr_db(exact_fp16(model, data), exact_fp16(q, data)) > SQNR_FLOOR_FP16_DB
    assert result.report["fidelity"]["outputs"]["y"]["sqnr_db"] > SQNR_FLOOR_FP16_DB
    assert result.report["bytes_after"] < 0.6 * result.report["bytes_before"]


def test_cast_to_float_inside_the_fp16_region_is_repaired():
    """int input -> Cast(to=FLOAT) -> Mul: the converter declares the Cast's output FP16 but leaves
    to=FLOAT, which ONNX Runtime refuses; the stage repairs it."""
    model = _model([helper.make_node("Cast", ["x"], ["xf"], name="to_float", to=TensorProto.FLOAT),
                    helper.make_node("Mul", ["xf", "w"], ["y"], name="mul")],
                   [_init("w", np.linspace(-1, 1, 8))], x_type=TensorProto.INT64)
    data = [{"x": np.arange(8, dtype=np.int64)[None]}]
    result = convert_fp16(model, Fp16(), data)
    cast = node(result.model, "to_float")
    assert next(a.i for a in cast.attribute if a.name == "to") == TensorProto.FLOAT16
    import onnxruntime as ort

    y = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data[0])
    np.testing.assert_allclose(y[0][0], np.arange(8) * np.linspace(-1, 1, 8), rtol=1e-3, atol=1e-3)


def test_excluded_nodes_and_ops_stay_fp32():
    result = convert_fp16(mlp_model(), Fp16(exclude_nodes=("fc1",)), feeds())
    assert initializer_type(result.model, "w1") == TensorProto.FLOAT
    assert initializer_type(result.model, "w2") == TensorProto.FLOAT16
    assert result.report["fp32_nodes"] == {"fc1": "exclude_nodes"}
    by_op = convert_fp16(mlp_model(), Fp16(exclude_ops=("MatMul",)), feeds())
    assert all(t.data_type == TensorProto.FLOAT for t in by_op.model.graph.initializer)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"transformer_fusion": "maybe"}, "transformer_fusion 'maybe'"),
    ({"check_samples": 0}, "must be >= 1"),
])
def test_bad_config_is_an_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        Fp16(**kwargs)


def already_fp16_model():
    return helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")], "h",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [_init("c", np.ones(4), np.float16)]),
        opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model, config, data, message", [
    (mlp_model(), Fp16(exclude_nodes=("nope",)), None, r"exclude_nodes=NAMES: nodes not in the model: nope \(use node names"),
    (already_fp16_model(), Fp16(), None, "no FP32 weights or inputs"),
    (mlp_model(), Fp16(), [{"image": np.zeros((1, 8), np.float32)}], r"lacks inputs \['x'\]"),
    (b"not a model", Fp16(), None, "takes an onnx.ModelProto"),
])
def test_bad_input_is_an_input_error(model, config, data, message):
    with pytest.raises(InputError, match=message):
        convert_fp16(model, config, data)
