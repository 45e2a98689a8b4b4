"""A stateful model's INT8 is judged as the stream it runs in: held-out feeds that carry FP32's state are
re-run with the quantized model's own state (optimize/quantize/heldout.py held_out_outputs), and
weights computed from constants (torch's LSTM export) are folded to initializers first (normalize)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main

STEPS, STREAMS, DECAY = 300, 3, 0.99


def leaky_integrator(outlier: float = 8.0) -> onnx.ModelProto:
    """stateN = 0.99 state + x @ W; output = sigmoid(sum(stateN * v)): FP32's state is fed back each call, so a
    weight's rounding error enters the state on every call and adds up over ~1/(1 - 0.99) = 100 calls.
    W has one large weight in column 0 (which v ignores): per-tensor int8 scales every other weight by it."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((8, 16)) * 0.05).astype(np.float32)
    w[0, 0] = outlier
    v = (rng.standard_normal((1, 16)) * 0.05).astype(np.float32)
    v[0, 0] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["drive"], name="drive"),
             helper.make_node("Mul", ["state", "decay"], ["kept"], name="keep"),
             helper.make_node("Add", ["kept", "drive"], ["stateN"], name="integrate"),
             helper.make_node("Mul", ["stateN", "v"], ["weighted"], name="readout"),
             helper.make_node("ReduceSum", ["weighted", "axis"], ["logit"], name="logit"),
             helper.make_node("Sigmoid", ["logit"], ["output"], name="probability")]
    graph = helper.make_graph(
        nodes, "leaky", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v"),
         numpy_helper.from_array(np.array(DECAY, np.float32), "decay"), numpy_helper.from_array(np.array([1]), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


READER = '''
import numpy as np
import onnxruntime as ort

def _stream(seed):
    session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for _ in range({streams}):
        state = np.zeros((1, 16), np.float32)
        for _ in range({steps}):
            x = (1.0 + 0.3 * rng.standard_normal((1, 8))).astype(np.float32)
            feed = {{"x": x, "state": state}}
            yield feed
            state = session.run(["stateN"], feed)[0]

def calibration():
    return _stream(1)

def heldout():
    return _stream(2)
'''


def _setup(tmp_path, model: onnx.ModelProto):
    src = tmp_path / "leaky.onnx"
    onnx.save(model, src)
    (tmp_path / "leaky_reader.py").write_text(READER.format(model=str(src), streams=STREAMS, steps=STEPS))
    return src, str(tmp_path / "leaky_reader.py")


def _probabilities(path, feeds, *, own_state: bool) -> np.ndarray:
    """Per-feed probabilities: fed FP32's state as the feeds carry it, or the model's own stateN."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, state = [], None
    for k, feed in enumerate(feeds):
        feed = dict(feed)
        if own_state and k % STEPS:
            feed["state"] = state
        p, state = session.run(["output", "stateN"], feed)
        out.append(float(p.reshape(-1)[0]))
    return np.array(out)


def _heldout(reader: str) -> list[dict[str, np.ndarray]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("leaky_reader", reader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.heldout())


def _quantize(src, reader, out, *extra):
    return CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calibration", f"{reader}:calibration",
                                     "--eval-data", f"{reader}:heldout", "--no-recover", *extra])


def test_stream_that_holds_passes_and_is_judged_as_a_stream(tmp_path):
    src, reader = _setup(tmp_path, leaky_integrator())
    out = tmp_path / "q.onnx"
    result = _quantize(src, reader, out, "--per-channel")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    fidelity = report["fidelity"]
    assert fidelity["stream"] == {"state": [["state", "stateN"]], "feeds_carrying_own_state": STREAMS * (STEPS - 1)}
    assert fidelity["samples"] == STREAMS * STEPS  # the whole streams, not the first 32 feeds
    assert "stateful" in report["scheme"]["reasons"][0]  # auto: weight-only for a model that feeds back its state
    feeds = _heldout(reader)
    fp32 = _probabilities(src, feeds, own_state=True)
    streamed = np.abs(_probabilities(out, feeds, own_state=True) - fp32).max()
    assert streamed <= 0.05 and abs(streamed - fidelity["task_metric"]["value"]) < 1e-6
    assert report["quantized_nodes"]["QDQ:MatMul"] == 1  # W int8


def test_chunks_fed_fp32_state_pass_but_the_stream_drifts_so_exit_1(tmp_path):
    """Per-tensor int8 weights: one call's error is small, but it re-enters the state on every call."""
    src, reader = _setup(tmp_path, leaky_integrator())
    out = tmp_path / "q.onnx"
    result = _quantize(src, reader, out, "--per-tensor")
    assert result.exit_code == 1, result.output
    assert not out.exists() and "probability" in result.output
    failed = tmp_path / "q.failed.onnx"
    feeds = _heldout(reader)
    fp32 = _probabilities(src, feeds, own_state=False)
    per_chunk = np.abs(_probabilities(failed, feeds, own_state=False) - fp32).max()
    streamed = np.abs(_probabilities(failed, feeds, own_state=True) - _probabilities(src, feeds, own_state=True)).max()
    assert per_chunk <= 0.05 < streamed, (per_chunk, streamed)
    report = json.loads(failed.with_suffix(".quantize.json").read_text())
    assert abs(report["fidelity"]["task_metric"]["value"] - streamed) < 1e-6


def lstm_in_branches() -> onnx.ModelProto:
    """A torch-style LSTM export inside both branches of an If on an int64 scalar `sr`: W and R are
    Unsqueeze(Concat(Slice(...))) of outer initializers (the gates reordered), not initializers."""
    rng = np.random.default_rng(5)
    hidden, size = 4, 6
    raw = {n: (rng.standard_normal((4 * hidden, d)) * 0.3).astype(np.float32)
           for n, d in (("w_ih", size), ("w_hh", hidden))}

    def branch(tag: str):
        nodes, consts = [], [numpy_helper.from_array(np.array(v, np.int64), f"{tag}_{k}") for k, v in
                              (("lo", [0]), ("mid", [2 * hidden]), ("hi", [4 * hidden]), ("ax", [0]))]
        weights = []
        for name in ("w_ih", "w_hh"):
            nodes += [helper.make_node("Slice", [name, f"{tag}_lo", f"{tag}_mid", f"{tag}_ax"], [f"{tag}_{name}_a"]),
                      helper.make_node("Slice", [name, f"{tag}_mid", f"{tag}_hi", f"{tag}_ax"], [f"{tag}_{name}_b"]),
                      helper.make_node("Concat", [f"{tag}_{name}_b", f"{tag}_{name}_a"], [f"{tag}_{name}_c"], axis=0),
                      helper.make_node("Unsqueeze", [f"{tag}_{name}_c", f"{tag}_ax"], [f"{tag}_{name}"])]
            weights.append(f"{tag}_{name}")
        nodes.append(helper.make_node("LSTM", ["x", *weights], [f"{tag}_y", f"{tag}_h"], hidden_size=hidden,
                                      name=f"{tag}_lstm"))
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_h", TensorProto.FLOAT, None)],
                                 consts)

    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["h"], then_branch=branch("t"), else_branch=branch("e"))]
    graph = helper.make_graph(nodes, "lstm_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, size]),
                                                 helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(16000, np.int64), "rate"),
                               *(numpy_helper.from_array(v, k) for k, v in raw.items())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lstm_weights_computed_from_constants_become_initializers_and_quantize():
    from dlopt.optimize.normalize import NormalizeConfig, all_graphs, normalize
    from dlopt.optimize.quantize import QuantizeConfig, quantize

    model = lstm_in_branches()
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.standard_normal((3, 1, 6)).astype(np.float32), "sr": np.array(16000, np.int64)}
             for _ in range(8)]
    result = normalize(model, NormalizeConfig(), feeds[:2])
    step = next(s for s in result.report["steps"] if s["step"] == "fold_weight_inputs")
    assert step["applied"] and step["folded"] == 4 and step["max_abs_diff"] == 0.0
    normalized = result.model
    for graph in all_graphs(normalized.graph):
        names = {t.name for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "LSTM":
                assert node.input[1] in names and node.input[2] in names
    assert not {"w_ih", "w_hh"} & {t.name for t in normalized.graph.initializer}  # the raw weights are unread now
    assert not any(n.op_type in ("Slice", "Concat") for g in all_graphs(normalized.graph) for n in g.node)
    quantized = quantize(model, QuantizeConfig(mode="dynamic"), feeds)
    assert quantized.report["quantized_nodes"].get("DynamicQuantizeLSTM") == 2, quantized.report["quantized_nodes"]


def test_a_state_is_an_output_named_like_another_input_with_its_shape():
    from dlopt.graphfacts import recurrent_pairs

    assert recurrent_pairs(leaky_integrator()) == [("state", "stateN")]

    def model(inputs, outputs):
        vi = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
        nodes = [helper.make_node("Identity", [inputs[0][0]], [o[0]]) for o in outputs]
        return helper.make_model(helper.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs]))

    stateful = model([("x", [1, 4]), ("h", [1, 8])], [("y", [1, 2]), ("h_out", [1, 8])])
    assert recurrent_pairs(stateful) == [("h", "h_out")]
    assert recurrent_pairs(model([("x", [1, 4]), ("h", [1, 8])], [("h_out", [1, 9])])) == []  # not its shape
    assert recurrent_pairs(model([("image", [1, 3, 8, 8])], [("image_out", [1, 3, 8, 8])])) == []  # a filter
