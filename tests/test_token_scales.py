"""Per-token activation scales for dynamic INT8 MatMuls after a GELU (dlopt.optimize.quantize.token_scales):
the graph's ops, outputs against the float model, and MiniLM's embeddings on held-out sentences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.optimize.quantize.token_scales import per_token_scales
from dlopt.sessions import cpu_session

HIDDEN, FFN = 32, 128


def _ffn(seed: int = 0):
    """x [B, T, H] -> Gelu (com.microsoft) -> MatMul -> y, a feed-forward block's second projection, and
    z = MatMul(x): a projection of something else."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, FFN)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) * 0.1).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gelu", ["x"], ["a"], domain="com.microsoft"),
             helper.make_node("MatMul", ["a", "w2"], ["y"]),
             helper.make_node("MatMul", ["x", "w1"], ["z"])]
    out = lambda name, width: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "t", width])  # noqa: E731
    graph = helper.make_graph(nodes, "ffn", [out("x", HIDDEN)], [out("y", HIDDEN), out("z", FFN)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _inputs(seed: int = 1):
    """Tokens of ordinary magnitude and, in each row, one outlier token 30x larger (as BERT's [SEP])."""
    x = np.random.default_rng(seed).standard_normal((4, 12, HIDDEN)).astype(np.float32)
    x[:, 0] *= 30
    return x


def _dynamic(model, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return onnx.load(tmp_path / "q.onnx")


def _sqnr(ref, y) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2)))


def test_the_projection_after_gelu_gets_per_token_scales_and_is_closer_to_float(tmp_path):
    model = _ffn()
    quantized = _dynamic(model, tmp_path)
    plain = onnx.ModelProto()
    plain.CopyFrom(quantized)
    rewritten, report = per_token_scales(quantized)
    assert len(report["matmuls"]) == 1  # y's MatMul only: z's reads x, not a GELU's output
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("DynamicQuantizeLinear") == 1  # z's, untouched
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("QuantizeLinear") == 1 and "ReduceMax" in ops
    assert "Abs" not in ops and ops.count("Cast") == 1  # GELU's floor bounds |min|; the kernel scales per channel
    x = _inputs()
    ref = cpu_session(model).run(None, {"x": x})[0]
    before = cpu_session(plain).run(None, {"x": x})[0]
    after = cpu_session(rewritten).run(None, {"x": x})[0]
    assert after.shape == ref.shape
    ordinary = (slice(None), slice(1, None))  # the tokens whose step the outliers coarsened
    assert _sqnr(ref[ordinary], after[ordinary]) > _sqnr(ref[ordinary], before[ordinary]) + 3  # dB
    assert _sqnr(ref, after) >= _sqnr(ref, before)


def test_nothing_to_rewrite_without_a_gelu(tmp_path):
    model = _ffn()
    model.graph.node[0].op_type, model.graph.node[0].domain = "Relu", ""
    quantized = _dynamic(model, tmp_path)
    count = len(quantized.graph.node)
    rewritten, report = per_token_scales(quantized)
    assert report["matmuls"] == [] and len(rewritten.graph.node) == count


@pytest.mark.heavy
def test_minilm_dynamic_int8_packed_keeps_cosine_0_993_on_held_out_sentences():
    """dlopt quantize on MiniLM: dynamic INT8 with per-token scales after GELU, trim-padding auto packs
    the tokens; embeddings vs FP32 on sentences after the calibration/check samples, in padded batches of 8."""
    from dlopt.bench import load_data
    from dlopt.fidelity import cosine_per_sample
    from dlopt.optimize.export import Export, export
    from dlopt.optimize.quantize import QuantizeConfig, quantize
    from dlopt.data import load_data as load_calibration
    from dlopt.sources import load_source

    fp32 = export(load_source("minilm"), Export()).model
    data = load_calibration("model:minilm", fp32, limit=32)
    result = quantize(fp32, QuantizeConfig(speed_check=False), data)
    report = result.report
    assert report["recipe"]["token_scales"] and len(report["token_scales"]["matmuls"]) == 6
    assert report["trim_padding"]["applied"] and report["trim_padding"]["form"] == "pack", report["trim_padding"]
    # the If after the trim prefix: batches with padding left run packed (else), unpadded ones sliced (then)
    (switch,) = [n for n in result.model.graph.node if n.op_type == "If"]
    branches = {a.name: {n.op_type for n in a.g.node} for a in switch.attribute}
    packed, sliced = branches["else_branch"], branches["then_branch"]
    assert {"MultiHeadAttention", "NonZero", "ScatterND"} <= packed and "QAttention" not in packed
    assert "QAttention" in sliced and "NonZero" not in sliced
    held_out = {k: v[64:128] for k, v in load_data("model:minilm", samples=128, seq_len=128).items()}
    ref_session, session = cpu_session(fp32), cpu_session(result.model)
    cos = []
    for i in range(0, 64, 8):
        feeds = {k: v[i:i + 8] for k, v in held_out.items()}
        ref, got = ref_session.run(None, feeds)[0], session.run(None, feeds)[0]
        assert got.shape == ref.shape == (8, 384)
        cos.append(cosine_per_sample(got, ref))
    cos = np.concatenate(cos)
    assert cos.mean() >= 0.993 and cos.min() >= 0.98, (cos.mean(), cos.min())
    single = np.concatenate([  # batches of one: no padding once sliced, the sliced branch
        cosine_per_sample(session.run(None, f)[0], ref_session.run(None, f)[0])
        for f in ({k: v[i:i + 1] for k, v in held_out.items()} for i in range(16))
    ])
    assert single.mean() >= 0.993 and single.min() >= 0.98, (single.mean(), single.min())


def _per_token_reference(a: np.ndarray, weight_int8: np.ndarray, weight_scale: np.ndarray, floor: float) -> np.ndarray:
    """What the rewrite computes, in numpy: each row quantized symmetrically around 128 with the step
    max(max |a|, floor) / 127 (times its float32 reciprocal), the integer products scaled per weight channel
    and per row."""
    amax = np.maximum(np.abs(a).max(axis=-1, keepdims=True), floor).astype(np.float32)
    scale = (amax * np.float32(1 / 127)).astype(np.float32)
    q = np.clip(np.rint(a.astype(np.float32) * (np.float32(1) / scale)), -127, 127)
    return (q @ weight_int8.astype(np.float64)) * weight_scale * scale


def test_per_token_form_matches_its_arithmetic_and_gelu_floor_never_clips(tmp_path):
    """The rewritten projection equals per-row symmetric quantization computed in numpy, with max |a| from
    max a and GELU's floor: including rows whose values are all small (there the floor sets the step)."""
    from dlopt.optimize.quantize.token_scales import GELU_FLOOR

    model = _ffn()
    rewritten, _ = per_token_scales(_dynamic(model, tmp_path))
    weights = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    matmul = next(n for n in rewritten.graph.node if n.op_type == "MatMulIntegerToFloat")
    weight_int8, weight_scale = weights[matmul.input[1]], weights[matmul.input[3]]
    x = _inputs()
    x[:, 3] *= 0.01  # rows of GELU outputs within (-0.17, 0.171): their max is under the floor
    gelu = cpu_session(_gelu_only()).run(None, {"x": x})[0]
    assert np.abs(gelu[:, 3]).max() < GELU_FLOOR and gelu.min() >= -GELU_FLOOR
    expected = _per_token_reference(gelu, weight_int8, weight_scale, GELU_FLOOR)
    got = cpu_session(rewritten).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _gelu_only():
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["a"], domain="com.microsoft")], "gelu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", HIDDEN])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "t", HIDDEN])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def test_other_sources_take_max_abs(tmp_path):
    """A projection after an op with no known floor (given in `after`) takes its rows' max |x| (Abs)."""
    model = _ffn()
    model.graph.node[0].op_type, model.graph.node[0].domain = "Tanh", ""
    rewritten, report = per_token_scales(_dynamic(model, tmp_path), after=("Tanh",))
    ops = [n.op_type for n in rewritten.graph.node]
    assert len(report["matmuls"]) == 1 and "Abs" in ops and "MatMulIntegerToFloat" in ops
    x = _inputs()
    ref = cpu_session(model).run(None, {"x": x})[0]
    got = cpu_session(rewritten).run(None, {"x": x})[0]
    assert _sqnr(ref, got) > 30
