"""4-bit weight-only quantization on tiny graphs built in code: op types, SQNR floors, embeddings,
Gemm rewriting, exclusions and fallbacks, sensitivity ranking, determinism, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.errors import InputError
from dlopt.optimize.int4 import Int4WeightOnly, gemm_to_matmul, dequantize_blocks, quantize_blocks, quantize_int4

# Round-to-nearest 4-bit with a scale per 32 weights gives ~19-21 dB on one Gaussian layer; two layers
# and a ReLU lose a little more. 8-bit blocks give ~40 dB. A result above the 4-bit ceiling would mean
# the weights were not quantized at all.
SQNR_FLOOR_INT4_DB = 15.0
SQNR_CEILING_INT4_DB = 30.0
SQNR_FLOOR_INT8_DB = 35.0


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def lm_model(seed: int = 0) -> onnx.ModelProto:
    """ids[batch, seq] -> Gather(table 1024x64) -> MatMul 128 (+bias) -> Relu -> MatMul 64 -> y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("table", rng.standard_normal((1024, 64))), _init("w1", rng.standard_normal((64, 128)) / 8),
         _init("b1", rng.standard_normal(128) * 0.1), _init("w2", rng.standard_normal((128, 64)) / 11)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_model(seed: int = 0, alpha: float = 0.5, beta: float = 2.0) -> onnx.ModelProto:
    """x[batch, 64] -> Gemm(transB, alpha, beta, bias) 32 -> y."""
    rng = np.random.default_rng(seed)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1, alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node], "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("w", rng.standard_normal((32, 64)) / 8), _init("b", rng.standard_normal(32) * 0.05)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lm_feeds(count: int = 6, seq: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 1024, (1, seq)).astype(np.int64)} for _ in range(count)]


def run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def sqnr_db(reference, candidate) -> float:
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    out = np.concatenate([c.ravel() for c in candidate]).astype(np.float64)
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - out)))


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def attr(n, name):
    return next(helper.get_attribute_value(a) for a in n.attribute if a.name == name)


# -- structure and fidelity --------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_quantizes_matmuls_and_embedding_within_sqnr_floor(symmetric):
    model = lm_model()
    before = model.SerializeToString()
    feeds = lm_feeds()
    result = quantize_int4(model, Int4WeightOnly(symmetric=symmetric, algorithm="rtn", sensitive_fraction=0, keep_last=0),
                           feeds)
    q = result.model
    assert model.SerializeToString() == before  # the input is never modified
    assert ops(q).count("MatMulNBits") == 2 and "MatMul" not in ops(q)
    assert ops(q).count("GatherBlockQuantized") == 1 and "Gather" not in ops(q)
    assert [i.name for i in q.graph.input] == ["ids"] and [o.name for o in q.graph.output] == ["y"]
    assert all(attr(n, "bits") == 4 and attr(n, "block_size") == 32 for n in q.graph.node
               if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    sqnr = sqnr_db(run(model, feeds), run(q, feeds))
    assert SQNR_FLOOR_INT4_DB <= sqnr <= SQNR_CEILING_INT4_DB
    assert result.report["fidelity"]["outputs"]["y"]["sqnr_db"] == pytest.approx(sqnr, abs=0.1)
    # 4-bit weights + a scale (+ zero point) per 32: about 1/6 of the float size
    assert result.report["bytes_after"] < 0.2 * result.report["bytes_before"]
    assert result.report["quantized_nodes"] == {"GatherBlockQuantized(4-bit)": 1, "MatMulNBits(4-bit)": 2}


@pytest.mark.parametrize("symmetric", [False, True])
def test_embedding_rows_match_the_numpy_block_dequantization(symmetric):
    """GatherBlockQuantized on uint8-packed nibbles returns exactly the dequantized rows (packing is right)."""
    model = lm_model()
    q = quantize_int4(model, Int4WeightOnly(symmetric=symmetric, sensitive_fraction=0)).model
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    # expose the embedding output of the quantized model
    q.graph.output.append(helper.make_empty_tensor_value_info("e"))
    ids = np.array([[0, 5, 1023, 77]], dtype=np.int64)
    import onnxruntime as ort

    rows = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(["e"], {"ids": ids})[0]
    expected = dequantize_blocks(*quantize_blocks(table, 32, symmetric), 32)[ids[0]]
    np.testing.assert_allclose(rows[0], expected, rtol=0, atol=1e-6)
    assert sqnr_db([table[ids[0]]], [rows[0]]) > 17.0


def test_gemm_rewrite_is_exact_and_gemm_weights_get_quantized():
    model = gemm_model()
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert gemm_to_matmul(rewritten, set()) == ["head"]
    assert ops(rewritten) == ["MatMul", "Add"]
    np.testing.assert_allclose(run(rewritten, [{"x": x}])[0], run(model, [{"x": x}])[0], rtol=1e-5, atol=1e-5)

    q = quantize_int4(model, Int4WeightOnly(sensitive_fraction=0, keep_last=0)).model
    assert ops(q) == ["MatMulNBits", "Add"]
    assert SQNR_FLOOR_INT4_DB <= sqnr_db(run(model, [{"x": x}]), run(q, [{"x": x}])) <= SQNR_CEILING_INT4_DB


def test_excluded_nodes_and_ops_stay_float():
    model = lm_model()
    q = quantize_int4(model, Int4WeightOnly(exclude_nodes=("fc2",), exclude_ops=("Gather",), sensitive_fraction=0,
                                             keep_last=0)).model
    assert node(q, "fc2").op_type == "MatMul" and node(q, "fc2").input[1] == "w2"
    assert node(q, "embed").op_type == "Gather" and node(q, "embed").input[0] == "table"
    assert node(q, "fc1_Q4").op_type == "MatMulNBits"
    w2 = next(t for t in q.graph.initializer if t.name == "w2")
    assert w2.data_type == TensorProto.FLOAT


@pytest.mark.parametrize("fallback_bits, op_type", [(8, "MatMulNBits"), (32, "MatMul")])
def test_keep_first_and_last_use_the_fallback_precision(fallback_bits, op_type):
    model = lm_model()
    feeds = lm_feeds()
    result = quantize_int4(model, Int4WeightOnly(keep_first=1, keep_last=1, fallback_bits=fallback_bits,
                                                 sensitive_fraction=0), feeds)
    kept = [n for n in result.model.graph.node if n.name in ("fc1", "fc2", "fc1_Q8", "fc2_Q8")]
    assert [n.op_type for n in kept] == [op_type, op_type]
    assert result.report["fallback_nodes"] == {"fc1": "keep_first", "fc2": "keep_last"}
    kept_as = 8 if fallback_bits == 8 else "float"
    assert result.report["layers"] == {"linear": 2, "four_bit": 0, "kept": [
        {"node": "fc1", "bits": kept_as, "why": "one of the first 1 linear layers (keep_first=1)"},
        {"node": "fc2", "bits": kept_as, "why": "the last linear layer (keep_last=1, the default: a language "
                                                "model's output head loses the most at 4 bits)"}]}
    if fallback_bits == 8:
        assert all(attr(n, "bits") == 8 for n in kept)
    # only the 4-bit embedding is left: far closer to float than all-4-bit
    assert sqnr_db(run(model, feeds), run(result.model, feeds)) > 20.0


def test_sensitivity_ranking_keeps_the_outlier_layer_at_8_bits():
    """fc2's weight rows meet one huge input channel; its 4-bit error dominates and it is the one kept."""
    model = lm_model()
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).copy()
    w1[:, 7] *= 200.0  # channel 7 of fc2's input is an outlier channel
    for i, t in enumerate(model.graph.initializer):
        if t.name == "w1":
            model.graph.initializer[i].CopyFrom(_init("w1", w1))
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")).copy()
    w2[7] *= 0.05  # ... whose weights are tiny: 4-bit blocks that span row 7 round them away
    for i, t in enumerate(model.graph.initializer):
        if t.name == "w2":
            model.graph.initializer[i].CopyFrom(_init("w2", w2))
    feeds = lm_feeds()
    result = quantize_int4(model, Int4WeightOnly(sensitive_fraction=0.5, keep_last=0), feeds)
    sqnr = result.report["sensitivity_sqnr_db"]
    assert sqnr["fc2"] < sqnr["fc1"] - 3.0
    assert list(result.report["fallback_nodes"]) == ["fc2"]
    assert attr(node(result.model, "fc2_Q8"), "bits") == 8
    all4 = quantize_int4(model, Int4WeightOnly(sensitive_fraction=0, keep_last=0), feeds).model
    reference = run(model, feeds)
    assert sqnr_db(reference, run(result.model, feeds)) > sqnr_db(reference, run(all4, feeds)) + 3.0


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
def test_error_minimizing_algorithms_produce_matmulnbits_within_floor(algorithm):
    model = lm_model()
    feeds = lm_feeds(count=4)
    config = Int4WeightOnly(algorithm=algorithm, symmetric=algorithm != "hqq", sensitive_fraction=0, keep_last=0,
                            gptq_samples=4)
    result = quantize_int4(model, config, feeds)
    assert ops(result.model).count("MatMulNBits") == 2 and "MatMul" not in ops(result.model)
    assert SQNR_FLOOR_INT4_DB <= sqnr_db(run(model, feeds), run(result.model, feeds)) <= SQNR_CEILING_INT4_DB


def test_block_size_64_and_accuracy_level_are_written():
    q = quantize_int4(lm_model(), Int4WeightOnly(block_size=64, accuracy_level=4, sensitive_fraction=0)).model
    mm = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert [attr(n, "block_size") for n in mm] == [64, 64] and [attr(n, "accuracy_level") for n in mm] == [4, 4]
    assert attr(node(q, "embed"), "block_size") == 64


def test_deterministic():
    feeds = lm_feeds()
    a = quantize_int4(lm_model(), Int4WeightOnly(), feeds).model.SerializeToString()
    b = quantize_int4(lm_model(), Int4WeightOnly(), feeds).model.SerializeToString()
    assert a == b


# -- bad input ---------------------------------------------------------------------------------------
def no_matmul_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="add")], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("c", np.ones(4))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 48}, "block_size 48 is not a power of two"),
    ({"block_size": 8}, "block_size 8 is not a power of two >= 16"),
    ({"embedding_block_size": 100}, "embedding_block_size 100"),
    ({"algorithm": "awq"}, "unknown algorithm 'awq'"),
    ({"algorithm": "hqq", "symmetric": True}, "hqq .* cannot be symmetric"),
    ({"fallback_bits": 16}, "fallback_bits 16"),
    ({"sensitive_fraction": 1.5}, "sensitive_fraction 1.5"),
    ({"exclude_ops": ("Conv",)}, r"exclude_ops \['Conv'\]"),
    ({"accuracy_level": 7}, "accuracy_level 7"),
])
def test_bad_config_is_an_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        Int4WeightOnly(**kwargs)


@pytest.mark.parametrize("model, config, data, message", [
    (no_matmul_model(), Int4WeightOnly(), None, "no MatMul or Gemm with a constant 2-D float weight"),
    (lm_model(), Int4WeightOnly(exclude_nodes=("nope",)), None, r"exclude_nodes=NAMES: nodes not in the model: nope \(use node names"),
    (lm_model(), Int4WeightOnly(algorithm="gptq"), None, "gptq needs calibration data"),
    (lm_model(), Int4WeightOnly(), [{"tokens": np.zeros((1, 3), np.int64)}], r"lacks inputs \['ids'\]"),
    ("model.onnx", Int4WeightOnly(), None, "takes an onnx.ModelProto"),
])
def test_bad_model_or_data_is_an_input_error(model, config, data, message):
    with pytest.raises(InputError, match=message):
        quantize_int4(model, config, data)


# -- dlopt's own 4-bit writer (algorithm "mse") -------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clip_search_lowers_weight_error_and_its_matmulnbits_is_exact(symmetric):
    """The clip search never does worse than plain round-to-nearest (ratio 1 is a candidate) and does
    better on Gaussian weights; the MatMulNBits it writes computes exactly x · dequantized(W)."""
    from dlopt.optimize.int4 import quantize_blocks_mse

    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 96)).astype(np.float32)  # K=96 is not a multiple of 64: padding path
    plain = dequantize_blocks(*quantize_blocks(w, 32, symmetric), 32)
    searched = dequantize_blocks(*quantize_blocks_mse(w, 32, symmetric), 32)
    assert np.square(searched - w).sum() < 0.99 * np.square(plain - w).sum()

    model = lm_model()
    result = quantize_int4(model, Int4WeightOnly(algorithm="mse", symmetric=symmetric, block_size=64,  # fp32 compute:
                                                 sensitive_fraction=0, accuracy_level=0))  # exact products
    q = result.model
    assert ops(q).count("MatMulNBits") == 2 and ops(q).count("GatherBlockQuantized") == 1
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    expected_w1 = dequantize_blocks(*quantize_blocks_mse(np.ascontiguousarray(w1.T), 64, symmetric), 64).T
    q.graph.output.append(helper.make_empty_tensor_value_info("h0"))
    import onnxruntime as ort

    ids = np.array([[3, 9, 600]], dtype=np.int64)
    session = ort.InferenceSession(_expose(q, "e").SerializeToString(), providers=["CPUExecutionProvider"])
    y, e, h0 = session.run(["y", "e", "h0"], {"ids": ids})
    np.testing.assert_allclose(h0, e @ expected_w1, rtol=1e-4, atol=1e-4)
    feeds = lm_feeds()
    assert SQNR_FLOOR_INT4_DB <= sqnr_db(run(model, feeds), run(q, feeds)) <= SQNR_CEILING_INT4_DB


def _expose(model, name):
    model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


# -- the real model (DLOPT_HEAVY=1): the acceptance numbers ----------------------------------
@pytest.fixture(scope="module")
def minilm_fp32():
    from dlopt.optimize.export import Export, export
    from dlopt.sources import load_source

    return export(load_source("minilm"), Export()).model


@pytest.mark.heavy
def test_minilm_int4_is_under_16_mb_with_cosine_above_0_98(minilm_fp32):
    import onnxruntime as ort

    from dlopt.models import get_reference_model, onnx_runner
    from dlopt.data import load_data

    data = load_data("model:minilm", minilm_fp32, limit=32)
    result = quantize_int4(minilm_fp32, Int4WeightOnly(), data)
    assert result.model.ByteSize() <= 16_000_000
    assert result.report["quantized_nodes"]["GatherBlockQuantized(4-bit)"] >= 1  # the 47 MB table too
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    metrics = get_reference_model("minilm").evaluate(onnx_runner(session))
    assert metrics["cosine_vs_reference"] >= 0.98
    assert metrics["pang_lee_accuracy"] >= 0.70  # FP32: 0.735


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_lowers_output_error_against_round_to_nearest(symmetric):
    """On correlated inputs GPTQ's error compensation gives a clearly smaller ‖XW − XŴ‖ than plain
    rounding on the same grid format (it minimizes output error, not weight error)."""
    from dlopt.optimize.int4 import gptq_blocks

    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64)) * 0.3  # correlated features
    w = rng.standard_normal((64, 48)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    rtn = dequantize_blocks(*quantize_blocks(np.ascontiguousarray(w.T), 32, symmetric), 32).T
    g = dequantize_blocks(*gptq_blocks(w, h, 32, symmetric), 32).T
    err_rtn = np.linalg.norm(x @ (w - rtn))
    err_gptq = np.linalg.norm(x @ (w - g))
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_weights_of_inputs_never_seen_in_calibration(act_order):
    from dlopt.optimize.int4 import gptq_blocks

    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64)) * 0.3
    x[:, [5, 40]] = 0.0  # never non-zero on the calibration rows (a dead ReLU channel there)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    codes, scales, zeros = gptq_blocks(w, 2 * x.T @ x / len(x), 32, False, act_order=act_order)
    got = dequantize_blocks(codes, scales, zeros, 32).T
    step = np.repeat(scales.T, 32, axis=0)  # [K, N]
    # they may fire on other inputs: rounded to the nearest code of their block's grid, not set to 0
    for row in (5, 40):
        assert np.all(np.abs(got[row] - w[row]) <= step[row] / 2 + 1e-6)
        assert np.count_nonzero(got[row]) > 8


# -- tied LM heads, symmetric grids, GPTQ variants --------------------------------------------------------
def tied_lm_model(seed: int = 0, vocab: int = 512, hidden: int = 64) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(w) -> MatMul(·, Transpose(table)) -> logits: a tied LM head, exported
    the way torch's dynamo exporter writes it (the table transposed at run time)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["h"], name="mix"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="head_t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [_init("table", rng.standard_normal((vocab, hidden)) * 0.5), _init("w", rng.standard_normal((hidden, hidden)) / 8)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("fallback_bits, bits", [(8, 8), (32, 4)])
def test_tied_lm_head_is_quantized_and_the_table_stored_once(fallback_bits, bits):
    """The head's Transpose(table) is folded and quantized; the embedding reads the head's codes, so the
    float table is gone and the file holds the tied weight once. keep_last=1 puts both at 8 bits."""
    model = tied_lm_model()
    feeds = [{"ids": np.random.default_rng(2).integers(0, 512, (1, 16)).astype(np.int64)} for _ in range(3)]
    keep_last = 1 if fallback_bits == 8 else 0
    config = Int4WeightOnly(sensitive_fraction=0, keep_last=keep_last, symmetric=True, exclude_nodes=("mix",))
    result = quantize_int4(model, config, feeds)
    q = result.model
    assert "Transpose" not in ops(q) and ops(q).count("MatMul") == 1 and "Gather" not in ops(q)
    head = next(n for n in q.graph.node if n.name.startswith("head_Q"))
    embed = node(q, "embed")
    assert embed.op_type == "GatherBlockQuantized" and attr(embed, "bits") == attr(head, "bits") == bits
    assert embed.input[0].startswith("embed__tied") and result.report["embeddings_tied_to_matmul"] == ["embed"]
    assert not [t.name for t in q.graph.initializer if t.data_type == TensorProto.FLOAT and sorted(t.dims) == [64, 512]]
    untied = quantize_int4(model, dataclasses.replace(config, share_tied_embeddings=False), feeds).model
    table_bytes = 512 * 64 * bits / 8
    assert q.ByteSize() < untied.ByteSize() - 0.9 * table_bytes
    floor = SQNR_FLOOR_INT8_DB - 3 if bits == 8 else SQNR_FLOOR_INT4_DB - 3  # logits: two quantized factors
    assert sqnr_db(run(model, feeds), run(q, feeds)) > floor
    # the embedding rows are exactly the head's dequantized columns
    q.graph.output.append(helper.make_empty_tensor_value_info("e"))
    import onnxruntime as ort

    rows = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(["e"], feeds[0])[0]
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    assert sqnr_db([table[feeds[0]["ids"][0]]], [rows[0]]) > (35.0 if bits == 8 else 17.0)


def test_symmetric_grid_puts_the_extreme_weight_on_minus_8_exactly():
    """Symmetric codes: zero point 8 for every block, a signed scale that maps each block's largest
    |w| onto code 0 (value -8·scale) exactly, whichever its sign; an unsigned amax/8 scale would clip a
    positive extreme to 7/8 of itself."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[0, 5] = 9.0  # a positive extreme in block (0, 0)
    w[1, 40] = -9.0  # a negative one in block (1, 1)
    q, scale, zp = quantize_blocks(w, 32, symmetric=True)
    assert (zp == 8).all() and q.max() <= 15
    deq = dequantize_blocks(q, scale, zp, 32)
    assert q[0, 5] == 0 and q[1, 40] == 0
    assert deq[0, 5] == pytest.approx(9.0, rel=1e-6) and deq[1, 40] == pytest.approx(-9.0, rel=1e-6)
    assert scale[0, 0] < 0 < scale[1, 1]
    # within half a step on the grid [-8, 7]·scale; the other sign's tail beyond 7 steps is clipped by < 1 step
    step = np.repeat(np.abs(scale), 32, axis=1)
    on_grid = np.abs(w) <= 7.5 * step
    assert (np.abs(deq - w)[on_grid] <= 0.5 * step[on_grid] + 1e-6).all()
    assert (np.abs(deq - w) <= step + 1e-6).all()
    # the written MatMulNBits has no zero-point input (the contrib op's default, 8, is the grid's)
    q_model = quantize_int4(lm_model(), Int4WeightOnly(sensitive_fraction=0, keep_last=0, symmetric=True)).model
    assert all(len(n.input) == 3 for n in q_model.graph.node if n.op_type == "MatMulNBits")


def test_gptq_act_order_and_clip_search_lower_the_output_error_further():
    """Inputs whose channels differ in energy (as LLM activations do): visiting the strong inputs first
    and choosing block ranges by energy-weighted error beat plain GPTQ and round-to-nearest."""
    from dlopt.optimize.int4 import gptq_blocks

    rng = np.random.default_rng(7)
    k, n = 256, 128
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((4096, k)) @ mix) * np.exp(rng.standard_normal(k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = 2 * x.T @ x / len(x)

    def error(wq):
        return np.linalg.norm(x @ (w - wq)) / np.linalg.norm(x @ w)

    rtn = error(dequantize_blocks(*quantize_blocks(np.ascontiguousarray(w.T), 32, True), 32).T)
    plain = error(dequantize_blocks(*gptq_blocks(w, h, 32, True), 32).T)
    best = error(dequantize_blocks(*gptq_blocks(w, h, 32, True, act_order=True, clip_search=True), 32).T)
    assert plain < rtn
    assert best < 0.85 * rtn and best < 0.9 * plain


@pytest.mark.parametrize("with_data, algorithm", [(True, "gptq"), (False, "rtn")])
def test_auto_algorithm_is_gptq_with_data_and_rtn_without(with_data, algorithm):
    result = quantize_int4(lm_model(), Int4WeightOnly(sensitive_fraction=0), lm_feeds() if with_data else None)
    assert result.report["algorithm"] == algorithm
    assert any("round-to-nearest" in note for note in result.report["notes"]) is not with_data
    # keep_last=1 by default: the last MatMul (an LM head in a decoder) is 8-bit
    assert attr(node(result.model, "fc2_Q8"), "bits") == 8 and attr(node(result.model, "fc1_Q4"), "bits") == 4


def test_int4_summary_says_which_linear_layers_stayed_8_bit_and_why(tmp_path):
    """A model whose only linear layer is also its last: keep_last=1 keeps it at 8 bits, and the printed
    recipe says so instead of a bare "recipe: int4"; a two-layer model reads 1 of 2 at 4 bits."""
    from click.testing import CliRunner

    from dlopt.cli import main

    rng = np.random.default_rng(0)
    onnx.save_model(gemm_model(), tmp_path / "head.onnx")
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((12, 64)).astype(np.float32))
    one = CliRunner().invoke(main, ["quantize", str(tmp_path / "head.onnx"), "-o", str(tmp_path / "head4.onnx"),
                                    "--precision", "int4", "--calibration", str(tmp_path / "x.npz")])
    assert one.exit_code == 0, one.output
    lines = one.stdout.splitlines()
    assert "recipe: int4" not in lines
    assert "recipe: int4 weight-only (gptq, blocks of 32, symmetric): 0 of 1 linear layer at 4 bits" in lines
    assert ("  - kept at 8 bits: head, the last linear layer (keep_last=1, the default: a language model's output "
            "head loses the most at 4 bits)") in lines
    assert any(line.startswith("  no linear layer is 4-bit, so this is not a 4-bit model") for line in lines)
    import json
    from importlib.resources import files

    jsonschema = pytest.importorskip("jsonschema")
    report = json.loads((tmp_path / "head4.quantize.json").read_text())
    assert report["layers"]["four_bit"] == 0 and report["layers"]["kept"][0]["bits"] == 8
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))

    onnx.save_model(lm_model(), tmp_path / "lm.onnx")
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, 1024, (12, 12)).astype(np.int64))
    two = CliRunner().invoke(main, ["quantize", str(tmp_path / "lm.onnx"), "-o", str(tmp_path / "lm4.onnx"),
                                    "--precision", "int4", "--calibration", str(tmp_path / "ids.npz")])
    assert two.exit_code == 0, two.output  # 17.6 dB against the 10 dB floor here
    assert "recipe: int4 weight-only (gptq, blocks of 32, symmetric): 1 of 2 linear layers at 4 bits, " \
           "1 embedding table at 4 bits" in two.stdout.splitlines()
    assert "  - kept at 8 bits: fc2, the last linear layer" in two.stdout
    assert "not a 4-bit model" not in two.stdout


def test_positive_scale_grid_puts_a_positive_extreme_on_7_and_a_negative_one_on_minus_8():
    """positive_scale (XNNPACK's 4-bit kernels refuse a negative scale): scale max(-min/8, max/7) >= 0, so
    each block's extreme lands exactly on an end code and nothing is clipped; GPTQ on it keeps the sign."""
    from dlopt.optimize.int4 import gptq_blocks

    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[0, 5] = 9.0
    w[1, 40] = -9.0
    q, scale, zp = quantize_blocks(w, 32, symmetric=True, positive_scale=True)
    assert (zp == 8).all() and (scale > 0).all()
    deq = dequantize_blocks(q, scale, zp, 32)
    assert q[0, 5] == 15 and q[1, 40] == 0
    assert deq[0, 5] == pytest.approx(9.0, rel=1e-6) and deq[1, 40] == pytest.approx(-9.0, rel=1e-6)
    assert (np.abs(deq - w) <= 0.5 * np.repeat(scale, 32, axis=1) + 1e-6).all()
    x = rng.standard_normal((256, 128)) @ rng.standard_normal((128, 128)) * 0.3
    _, g_scale, g_zp = gptq_blocks(np.ascontiguousarray(w.T), 2 * x.T @ x / len(x), 32, True, positive_scale=True)
    assert (g_scale >= 0).all() and (g_zp == 8).all()
