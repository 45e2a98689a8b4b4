"""INT8 on graphs nobody in this project wrote the way the quantizer expects: opsets below 13, weights
in Constant nodes, If/Loop subgraphs, recurrent layers with state inputs, Gemm MLPs, and no
calibration data at all (`--mode auto` picks what works without it). Tiny seeded graphs built here;
one test runs the real PP-OCRv4 text detector when rapidocr-onnxruntime is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.data import CalibrationData
from dlopt.optimize.normalize import NormalizeConfig, default_opset, normalize, subgraph_nodes
from dlopt.graphfacts import looks_like_transformer
from dlopt.fidelity import sqnr_db
from dlopt.optimize.quantize import QuantizeConfig, choose_recipe, quantize, quantize_text
from dlopt.sessions import cpu_session
from test_quantize_int8 import cnn_model

SQNR_FLOOR_INT8_DB = 25.0  # 8-bit weights on well-scaled activations: ~30-40 dB measured on these graphs
SQNR_FLOOR_WEIGHT_ONLY_DB = 30.0  # only the weights' rounding: 37-44 dB measured


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    return sqnr_db(got, reference)


def _outputs(model, feeds) -> list[np.ndarray]:
    return cpu_session(model).run(None, feeds)


def _ops(graph) -> list[str]:
    return [n.op_type for n in graph.node]


def cnn(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """test_quantize_int8's CNN (Conv 8 -> Relu -> Conv 8 -> Relu -> GAP -> Flatten -> Gemm 10) at `opset`."""
    model = cnn_model(seed=seed, opset=opset)
    onnx.checker.check_model(model)
    return model


def images(n: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def mlp(*, constants: bool = False, gemm: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 32] -> Linear 64 -> Relu -> Linear 16: MatMul+Add, or Gemm (transB, as torch exports
    nn.Linear); with constants=True every weight sits in a Constant node instead of an initializer."""
    rng = np.random.default_rng(seed)
    w1, b1, w2 = _f32(rng.standard_normal((32, 64)) / 6), _f32(rng.standard_normal(64) * 0.1), \
        _f32(rng.standard_normal((64, 16)) / 8)
    if gemm:
        weights = {"w1": w1.T.copy(), "b1": b1, "w2": w2.T.copy()}
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
                 helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
                 helper.make_node("Gemm", ["h2", "w2"], ["y"], name="fc2", transB=1)]
    else:
        weights = {"w1": w1, "b1": b1, "w2": w2}
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
                 helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
                 helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
                 helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")]
    tensors = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    if constants:
        nodes = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in tensors] + nodes
        tensors = []
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def if_model(where: str) -> onnx.ModelProto:
    """x[batch, 32] -> MatMul 32 -> If(flag) {then: MatMul 16, else: MatMul 16} -> y. The branch weights are
    initializers of the branch ('local'), Constant nodes in the branch ('constant') or initializers
    of the outer graph read from inside the branch ('outer')."""
    rng = np.random.default_rng(0)
    outer = []

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(_f32(rng.standard_normal((32, 16)) / 6), f"{name}_w")
        nodes, local = [], []
        if where == "constant":
            nodes.append(helper.make_node("Constant", [], [w.name], value=w))
        elif where == "local":
            local.append(w)
        else:
            outer.append(w)
        nodes.append(helper.make_node("MatMul", ["h", w.name], [f"{name}_y"], name=f"{name}_matmul"))
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                 ["batch", 16])], local)

    w0 = numpy_helper.from_array(_f32(rng.standard_normal((32, 32)) / 6), "w0")
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=branch("then"),
                              else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
                                                  helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w0, *outer])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def loop_model() -> onnx.ModelProto:
    """x[batch, 32] -> Loop 3 times { h = Tanh(h @ w) }, w a Constant node inside the body."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(_f32(rng.standard_normal((32, 32)) / 6), "w")
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=w),
         helper.make_node("MatMul", ["h_in", "w"], ["p"], name="step_matmul"),
         helper.make_node("Tanh", ["p"], ["h_out"], name="step_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_pass")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 32])])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)
    graph = helper.make_graph([loop], "loop_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
                              [numpy_helper.from_array(np.array(3, np.int64), "trip")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def recurrent_model(op: str, hidden: int = 32, features: int = 16) -> onnx.ModelProto:
    """x[seq, batch, 16] and the initial state(s) h0 (and c0 for LSTM) as graph inputs -> LSTM/GRU ->
    last hidden state -> MatMul 8."""
    rng = np.random.default_rng(0)
    gates = {"LSTM": 4, "GRU": 3}[op]
    state_inputs = ["h0", "c0"] if op == "LSTM" else ["h0"]
    nodes = [helper.make_node(op, ["x", "W", "R", "B", "", *state_inputs], ["Y", "Y_h"], name="rnn",
                              hidden_size=hidden),
             helper.make_node("Squeeze", ["Y_h", "axis0"], ["h"], name="squeeze"),
             helper.make_node("MatMul", ["h", "wo"], ["y"], name="head")]
    inits = [numpy_helper.from_array(_f32(rng.standard_normal((1, gates * hidden, features)) / 4), "W"),
             numpy_helper.from_array(_f32(rng.standard_normal((1, gates * hidden, hidden)) / 6), "R"),
             numpy_helper.from_array(_f32(rng.standard_normal((1, 2 * gates * hidden)) * 0.1), "B"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(_f32(rng.standard_normal((hidden, 8)) / 5), "wo")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", features])]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, "batch", hidden]) for s in state_inputs]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph(nodes, "recurrent", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


# -- opsets below 13 -------------------------------------------------------------------------------------
def _dequantize_axes(model) -> list[int | None]:
    return [next((a.i for a in n.attribute if a.name == "axis"), None)
            for n in model.graph.node if n.op_type == "DequantizeLinear"]


def test_an_opset_12_model_is_upgraded_and_quantized_per_channel():
    model = cnn(opset=12)
    data = CalibrationData.from_arrays({"image": images()}, source="images")
    result = quantize(model, QuantizeConfig(mode="static", speed_check=False, node_forms="int8"), data)
    onnx.checker.check_model(result.model, full_check=True)
    norm = result.report["normalization"]
    assert norm["opset"] == {"before": 12, "after": 13}
    assert [s["applied"] for s in norm["steps"] if s["step"] == "opset_upgrade"] == [True]
    assert result.report["recipe"]["per_channel"] is True
    assert any("opset 12 upgraded to 13" in r for r in result.report["recipe"]["reasons"])
    assert default_opset(result.model) >= 13
    # per-channel weights: DequantizeLinear nodes with an axis (Conv weights on axis 0)
    assert _dequantize_axes(result.model).count(0) >= 2
    feeds = {"image": images(4, seed=7)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0]) >= SQNR_FLOOR_INT8_DB


def _converter_that_raises(model, target):
    raise RuntimeError("No Adapter From Version $12 for Conv")


def _converter_that_changes_outputs(model, target):
    """A conversion that runs but computes something else (here: the head's bias doubled)."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    converted.opset_import[0].version = target
    bias = next(t for t in converted.graph.initializer if t.name == "bf")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) * 2, "bf"))
    return converted


@pytest.mark.parametrize("converter, why", [(_converter_that_raises, "No Adapter From Version \\$12 for Conv"),
                                            (_converter_that_changes_outputs, "outputs moved by .* rejected")])
def test_a_rejected_opset_upgrade_falls_back_to_per_tensor_and_says_why(monkeypatch, converter, why):
    import re

    from onnx import version_converter

    monkeypatch.setattr(version_converter, "convert_version", converter)
    model = cnn(opset=12)
    data = CalibrationData.from_arrays({"image": images()}, source="images")
    result = quantize(model, QuantizeConfig(mode="static", speed_check=False, node_forms="int8"), data)
    onnx.checker.check_model(result.model, full_check=True)  # valid: no axis at opset 12
    assert result.report["normalization"]["opset"] == {"before": 12, "after": 12}
    assert result.report["recipe"]["per_channel"] is False
    reason = next(r for r in result.report["recipe"]["reasons"] if r.startswith("per-tensor"))
    assert "opset 12 has no per-channel DequantizeLinear" in reason
    assert re.search(why, reason), reason
    assert set(_dequantize_axes(result.model)) == {None}
    feeds = {"image": images(4, seed=7)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0]) >= 20.0


# -- weights in Constant nodes --------------------------------------------------------------------------
def test_constant_node_weights_become_initializers_with_identical_outputs():
    model = mlp(constants=True)
    result = normalize(model, NormalizeConfig())
    assert "Constant" not in _ops(result.model.graph)
    assert {t.name for t in result.model.graph.initializer} == {"w1", "b1", "w2"}
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)}
    np.testing.assert_array_equal(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0])


def test_constant_node_weights_are_quantized_without_preprocessing():
    model = mlp(constants=True)
    result = quantize(model, QuantizeConfig(mode="dynamic", preprocess=False, speed_check=False))
    assert result.report["quantized_nodes"].get("MatMulInteger") == 2
    assert "MatMul" not in _ops(result.model.graph)
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0]) >= SQNR_FLOOR_INT8_DB


def test_constant_node_weights_are_quantized_to_4_bits_too():
    model = mlp(constants=True)
    result = quantize(model, QuantizeConfig(precision="int4", speed_check=False))
    assert result.report["quantized_nodes"] == {"MatMulNBits": 2}
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0]) >= 15.0  # 4-bit: ~22 dB here


# -- subgraphs --------------------------------------------------------------------------------------------
def _branch_ops(model) -> dict[str, list[str]]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return {a.name: _ops(a.g) for a in node.attribute}


def _if_sqnr(model, quantized) -> list[float]:
    x = np.random.default_rng(4).standard_normal((4, 32)).astype(np.float32)
    return [_sqnr(_outputs(model, {"x": x, "flag": np.array(flag)})[0],
                  _outputs(quantized, {"x": x, "flag": np.array(flag)})[0]) for flag in (True, False)]


@pytest.mark.parametrize("where", ["local", "constant", "outer"])
def test_matmuls_inside_if_branches_are_quantized_dynamically(where):
    model = if_model(where)
    result = quantize(model, QuantizeConfig(mode="dynamic", speed_check=False))
    onnx.checker.check_model(result.model, full_check=True)  # topologically sorted, subgraphs included
    for ops in _branch_ops(result.model).values():
        assert "MatMulInteger" in ops and "MatMul" not in ops
    assert result.report["quantized_nodes"]["MatMulInteger"] == 3
    assert min(_if_sqnr(model, result.model)) >= SQNR_FLOOR_INT8_DB


@pytest.mark.parametrize("where", ["local", "outer"])
def test_static_qdq_gives_if_branch_weights_int8_with_a_dequantize_inside_the_branch(where):
    """ORT's static QDQ quantizer does not enter subgraphs: the branch weights become weight-only int8."""
    model = if_model(where)
    rng = np.random.default_rng(3)
    data = CalibrationData.from_feeds([{"x": rng.standard_normal((1, 32)).astype(np.float32),
                                        "flag": np.array(i % 2 == 0)} for i in range(8)])
    result = quantize(model, QuantizeConfig(mode="static", speed_check=False, node_forms="int8"), data)
    onnx.checker.check_model(result.model, full_check=True)
    for ops in _branch_ops(result.model).values():
        assert ops == ["DequantizeLinear", "MatMul"]
    assert result.report["weight_only"]["nodes"] == {"MatMul": 2}
    for where_, node in subgraph_nodes(result.model, ["DequantizeLinear"]):
        assert node.input[0].endswith("/int8")
    assert min(_if_sqnr(model, result.model)) >= SQNR_FLOOR_INT8_DB


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_node_inside_a_branch_can_be_kept_float_by_name(mode):
    model = if_model("local")
    rng = np.random.default_rng(3)
    data = CalibrationData.from_feeds([{"x": rng.standard_normal((1, 32)).astype(np.float32),
                                        "flag": np.array(i % 2 == 0)} for i in range(4)])
    result = quantize(model, QuantizeConfig(mode=mode, exclude_nodes=("then_matmul",), speed_check=False, node_forms="int8"), data)
    branches = _branch_ops(result.model)
    assert branches["then_branch"] == ["MatMul"]  # float, its weight a float initializer
    assert branches["else_branch"] != ["MatMul"]
    then = next(a.g for a in next(n for n in result.model.graph.node if n.op_type == "If").attribute
                if a.name == "then_branch")
    assert [t.data_type for t in then.initializer] == [TensorProto.FLOAT]


def test_a_loop_body_matmul_with_a_constant_weight_is_quantized():
    model = loop_model()
    result = quantize(model, QuantizeConfig(speed_check=False))
    assert result.report["recipe"]["mode"] == "dynamic"
    body = next(a.g for a in result.model.graph.node[0].attribute if a.name == "body")
    assert "MatMulInteger" in _ops(body) and "MatMul" not in _ops(body)
    x = np.random.default_rng(4).standard_normal((4, 32)).astype(np.float32)
    assert _sqnr(_outputs(model, {"x": x})[0], _outputs(result.model, {"x": x})[0]) >= SQNR_FLOOR_INT8_DB


# -- recurrent layers with state inputs ---------------------------------------------------------------------
def _recurrent_feeds(op: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal((5, 3, 16)).astype(np.float32),
             "h0": (0.5 * rng.standard_normal((1, 3, 32))).astype(np.float32)}
    if op == "LSTM":
        feeds["c0"] = (0.5 * rng.standard_normal((1, 3, 32))).astype(np.float32)
    return feeds


@pytest.mark.parametrize("op, expected", [
    ("LSTM", {"DynamicQuantizeLSTM": 1, "MatMulInteger": 1}),  # ORT's integer LSTM
    ("GRU", {"QDQ:GRU": 1, "MatMulInteger": 1}),  # no integer GRU in ORT: its W and R weight-only int8
])
def test_recurrent_layers_with_state_inputs_are_quantized(op, expected):
    model = recurrent_model(op)
    assert not looks_like_transformer(model)
    result = quantize(model, QuantizeConfig(speed_check=False))
    assert result.report["recipe"]["mode"] == "dynamic"
    assert {k: result.report["quantized_nodes"].get(k) for k in expected} == expected
    if op == "GRU":
        assert result.report["weight_only"]["nodes"] == {"GRU": 1} and result.report["weight_only"]["weights"] == 2
    feeds = _recurrent_feeds(op)
    assert _sqnr(_outputs(model, feeds)[0], _outputs(result.model, feeds)[0]) >= SQNR_FLOOR_INT8_DB


def test_integer_inputs_that_are_not_token_ids_do_not_make_a_transformer():
    """Softmax and four MatMuls beside an integer input read only by a Shape-like Gather: not an encoder."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", [f"h{i - 1}" if i else "x", f"w{i}"], [f"h{i}"], name=f"mm{i}")
             for i in range(4)]
    nodes += [helper.make_node("Softmax", ["h3"], ["p"], name="softmax", axis=-1),
              helper.make_node("Gather", ["p", "index"], ["y"], name="pick", axis=1)]
    graph = helper.make_graph(nodes, "picker", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
                                                helper.make_tensor_value_info("index", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(_f32(rng.standard_normal((16, 16)) / 4), f"w{i}")
                               for i in range(4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not looks_like_transformer(model)
    recipe = choose_recipe(model, QuantizeConfig(), has_data=False)
    assert recipe.mode == "dynamic" and not recipe.fuse_transformer


def test_an_integer_index_into_a_small_table_gets_synthetic_ids_the_model_runs_on():
    """Without data, ids for an input that indexes a 10-row table (through a Cast) stay below 10:
    token-like ids up to 1000 made ORT fail ('indices element out of data bounds')."""
    from dlopt.inputs import model_feeds, value_ranges

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["slot"], ["slot64"], name="cast", to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "slot64"], ["e"], name="pick"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("slot", TensorProto.INT32, ["batch"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(_f32(rng.standard_normal((10, 16))), "table"),
                               numpy_helper.from_array(_f32(rng.standard_normal((16, 8)) / 4), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert value_ranges(model) == {"slot": (0, 10)}
    assert all(f["slot"].max() < 10 for f in model_feeds(model, count=4))
    result = quantize(model, QuantizeConfig(speed_check=False))
    assert result.report["recipe"]["mode"] == "dynamic"
    assert result.report["quantized_nodes"].get("MatMulInteger") == 1


# -- no calibration data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gemm", [False, True])
def test_readme_headline_command_on_a_plain_mlp_gives_dynamic_int8(tmp_path, gemm):
    src, out = tmp_path / "my.onnx", tmp_path / "my8.onnx"
    model = mlp(gemm=gemm)
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "dynamic: no calibration data" in result.output
    assert "Traceback" not in result.output
    quantized = onnx.load(out)
    ops = _ops(quantized.graph)
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and "Gemm" not in ops
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(quantized, feeds)[0]) >= SQNR_FLOOR_INT8_DB


def test_a_conv_model_without_data_gets_weight_only_int8_and_is_told_about_calibration(tmp_path):
    src, out = tmp_path / "cnn.onnx", tmp_path / "cnn8.onnx"
    rng = np.random.default_rng(0)
    model = cnn()
    # a wider last layer so that the weights dominate the file, as in real CNNs
    wide = numpy_helper.from_array(_f32(rng.standard_normal((64, 8, 3, 3)) / 8), "k2")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "k2"))
    model.graph.initializer.append(wide)
    for name, shape in (("c2", (64,)), ("wf", (10, 64))):
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))
        model.graph.initializer.append(numpy_helper.from_array(_f32(rng.standard_normal(shape) / 4), name))
    onnx.checker.check_model(model)
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "weight-only: static INT8 for this CNN (Conv) needs calibration data" in result.output
    assert "--calibration" in result.output
    quantized = onnx.load(out)
    inits = {t.name: t for t in quantized.graph.initializer}
    assert sum(t.data_type == TensorProto.INT8 for t in inits.values()) == 3  # conv1, conv2, head
    for node in quantized.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = next(n for n in quantized.graph.node if node.input[1] in n.output)
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8
    assert out.stat().st_size < src.stat().st_size / 3  # int8 weights on disk
    feeds = {"image": images(4, seed=7)}
    assert _sqnr(_outputs(model, feeds)[0], _outputs(quantized, feeds)[0]) >= SQNR_FLOOR_WEIGHT_ONLY_DB


@pytest.mark.parametrize("model_fn, target, mode", [
    (mlp, "cpu", "dynamic"), (mlp, "mobile", "dynamic"), (mlp, "cuda", "weight-only"),  # CUDA runs no dynamic
    (cnn, "cpu", "weight-only"), (cnn, "arm64", "weight-only"),
])
def test_auto_without_data_picks_a_recipe_that_needs_none(model_fn, target, mode):
    recipe = choose_recipe(model_fn(), QuantizeConfig(target=target), has_data=False)
    assert recipe.mode == mode
    assert "calibration" in recipe.reasons[0]
    with_data = choose_recipe(model_fn(), QuantizeConfig(target=target), has_data=True)
    assert with_data.mode != "weight-only"


def test_static_mode_asked_without_data_is_still_an_input_error(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(cnn(), src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--mode", "static",
                                       "--node-forms", "int8"])
    assert result.exit_code == 2 and "static quantization needs calibration data" in result.output


# -- a real third-party model -------------------------------------------------------------------------------
def _rapidocr_model(name: str) -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / name
    return path if path.exists() else None


@pytest.mark.skipif(_rapidocr_model("ch_PP-OCRv4_det_infer.onnx") is None,
                    reason="rapidocr-onnxruntime is not installed (scripts/test.sh installs it)")
def test_pp_ocrv4_detector_opset_12_quantizes_per_channel_to_a_valid_graph():
    """The model from the issue: opset 12, every weight in a Constant node. Static per-channel INT8
    used to write an invalid graph (DequantizeLinear with axis at opset 12)."""
    model = onnx.load(_rapidocr_model("ch_PP-OCRv4_det_infer.onnx"))
    assert default_opset(model) == 12
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 1, 3, 64, 64)).astype(np.float32)  # normalized (x/255 - 0.5)/0.5
    data = CalibrationData.from_feeds([{"x": s} for s in x], source="uniform images")
    # node_forms int8: the graph checked is the quantizer's, not a per-CPU choice of float nodes; and no
    # recovery of the fidelity floor on these noise images
    config = QuantizeConfig(speed_check=False, fidelity_samples=2, rounding_samples=4, node_forms="int8",
                            recover=False)
    static = quantize(model, config, data)
    onnx.checker.check_model(static.model)
    norm = static.report["normalization"]
    assert norm["opset"] == {"before": 12, "after": 13}
    assert [(s["step"], s["applied"]) for s in norm["steps"]] == [("constants_to_initializers", True),
                                                                   ("opset_upgrade", True)]
    assert static.report["recipe"]["mode"] == "static" and static.report["recipe"]["per_channel"] is True
    assert static.report["quantized_nodes"]["QDQ:Conv"] == 62
    assert _dequantize_axes(static.model).count(0) >= 62  # every Conv weight per output channel

    weight_only = quantize(model, dataclasses.replace(config, mode="weight-only"), data)
    assert weight_only.report["weight_only"]["nodes"] == {"Conv": 62, "ConvTranspose": 2}
    assert _dequantize_axes(weight_only.model).count(0) == 62
    assert weight_only.report["bytes_after"] < weight_only.report["bytes_before"] / 3


# -- detectors: boxes in pixels joined with class scores ------------------------------------------------------
def detector_model(seed: int = 0, classes: int = 6, size: int = 32, pixels: float = 640.0) -> onnx.ModelProto:
    """A YOLO-shaped head on a conv backbone: boxes (sigmoid x pixels, 0..640) and class scores (sigmoid,
    0..1) joined by a Concat on axis 1, reshaped to one output [1, 4+C, N]."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=None):
        scale = scale if scale is not None else np.sqrt(2.0 / np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    n = (size // 4) ** 2
    inits = [weight("k1", 16, 3, 3, 3), numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             weight("k2", 16, 16, 3, 3), numpy_helper.from_array(np.zeros(16, np.float32), "b2"),
             weight("kbox", 4, 16, 1, 1), weight("kcls", classes, 16, 1, 1, scale=0.6),
             numpy_helper.from_array((rng.standard_normal(classes) - 2.0).astype(np.float32), "bcls"),
             numpy_helper.from_array(np.array(pixels, np.float32), "pixels"),
             numpy_helper.from_array(np.array([1, 4 + classes, n], np.int64), "out_shape")]
    node = helper.make_node
    nodes = [node("Conv", ["images", "k1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
             node("Relu", ["c1"], ["r1"], name="relu1"),
             node("Conv", ["r1", "k2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             node("Relu", ["c2"], ["r2"], name="relu2"),
             node("Conv", ["r2", "kbox"], ["box_logits"], name="box_conv"),
             node("Sigmoid", ["box_logits"], ["box_unit"], name="box_sigmoid"),
             node("Mul", ["box_unit", "pixels"], ["box_px"], name="box_to_pixels"),
             node("Conv", ["r2", "kcls", "bcls"], ["cls_logits"], name="cls_conv"),
             node("Sigmoid", ["cls_logits"], ["cls_prob"], name="cls_sigmoid"),
             node("Concat", ["box_px", "cls_prob"], ["head"], axis=1, name="head_concat"),
             node("Reshape", ["head", "out_shape"], ["output0"], name="head_reshape")]
    graph = helper.make_graph(nodes, "tiny_detector",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + classes, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _detector_runs(model, images_) -> np.ndarray:
    session = cpu_session(model)
    return np.concatenate([session.run(None, {"images": x[None]})[0] for x in images_])


def _quantize_detector(model, calibration, monkeypatch, *, handled: bool):
    """Static INT8 with every op type ORT's quantize_static quantizes by default (Concat, Sigmoid and Mul
    too, each with one per-tensor scale), the way a YOLO head reaches the collapse; `handled`: with
    dlopt's mixed-range handling, else without it."""
    from onnxruntime.quantization.registry import QDQRegistry

    from dlopt.optimize.quantize import int8 as int8_module

    monkeypatch.setattr(int8_module, "default_op_types", lambda recipe: set(QDQRegistry) | {"Concat", "Sigmoid", "Mul"})
    if not handled:
        monkeypatch.setattr(int8_module, "mixed_range_outputs", lambda *args, **kwargs: [])
    result = quantize(model, QuantizeConfig(mode="static", recover=False, node_forms="int8"),
                      CalibrationData.from_arrays({"images": calibration}, source="test images"))
    monkeypatch.undo()
    return result


def test_a_detector_head_joining_pixels_and_scores_keeps_each_its_own_scale(monkeypatch):
    model = detector_model()
    photos = np.random.default_rng(1).uniform(0, 1, (32, 3, 32, 32)).astype(np.float32)
    calibration, held = photos[:24], photos[24:]
    reference = _detector_runs(model, held)

    plain = _quantize_detector(model, calibration, monkeypatch, handled=False)
    assert "mixed_range_outputs" not in plain.report
    collapsed = _detector_runs(plain.model, held)
    # the joined output's one scale (a step of ~2.3 pixels) flattens the scores; the boxes do not notice
    assert _sqnr(reference[:, 4:], collapsed[:, 4:]) < 5.0 and _sqnr(reference[:, :4], collapsed[:, :4]) > 40.0

    result = _quantize_detector(model, calibration, monkeypatch, handled=True)
    (handled,) = result.report["mixed_range_outputs"]
    assert handled["node"] == "head_concat" and handled["outputs"] == ["output0"] and handled["ratio"] > 1000
    assert handled["kept_float"] == ["head_concat", "head_reshape"] and handled["narrow_inputs"] == ["cls_prob"]
    assert "apart, into graph output output0" in handled["why"]
    import json
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text())
    jsonschema.validate(result.report["mixed_range_outputs"], schema["properties"]["mixed_range_outputs"])
    assert "mixed-range output: head_concat joins" in quantize_text(result.report)
    graph = result.model.graph
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("head", "output0") for n in graph.node)
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "cls_prob" for n in graph.node)  # its own scale
    assert _ops(graph).count("Conv") == 4 and "DequantizeLinear" in _ops(graph)  # the rest stays INT8
    got = _detector_runs(result.model, held)
    assert _sqnr(reference[:, :4], got[:, :4]) >= 40.0  # boxes: 50.2 dB measured
    assert _sqnr(reference[:, 4:], got[:, 4:]) >= 35.0  # scores: 39.1 dB measured, from 0.0 dB


def test_mixed_range_detection_needs_a_wide_ratio_and_only_layout_ops_to_an_output():
    from types import SimpleNamespace

    from dlopt.optimize.quantize.int8 import mixed_range_outputs

    def ranges(box_high: float, score_high: float):
        return {"box_px": SimpleNamespace(range_value=(np.float32(0.0), np.float32(box_high))),
                "cls_prob": SimpleNamespace(range_value=(np.float32(0.0), np.float32(score_high)))}

    model = detector_model()
    (found,) = mixed_range_outputs(model, ranges(600.0, 1.0))
    assert found["kept_float"] == ["head_concat", "head_reshape"] and found["ratio"] == 600.0
    assert mixed_range_outputs(model, ranges(30.0, 1.0)) == []  # 30x apart: one scale serves both
    assert mixed_range_outputs(model, {}) == []  # no calibrated ranges: nothing to judge
    assert mixed_range_outputs(model, ranges(600.0, 1.0), skip={"head_concat"}) == []  # excluded already
    # a Concat whose result feeds more computation, not only layout ops to an output, is left alone
    feeding = detector_model()
    next(n for n in feeding.graph.node if n.name == "head_reshape").output[0] = "reshaped"
    feeding.graph.node.append(helper.make_node("Relu", ["reshaped"], ["output0"], name="after_head"))
    assert mixed_range_outputs(feeding, ranges(600.0, 1.0)) == []
