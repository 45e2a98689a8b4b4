"""Padding removal (dlopt.optimize.trim_padding): trimmed vs untrimmed outputs on padded inputs, FP32 and
INT8, pooled and per-token outputs, the fused Attention op, and auto's refusal when an output reads padding."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.errors import InputError
from dlopt.optimize.trim_padding import TrimPadding, plan, trim_padding, trim_padding_graph
from dlopt.sessions import cpu_session
from dlopt.stage import get_stage

VOCAB, HIDDEN, HEADS = 50, 16, 2


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _encoder(*, pooled: bool, masked_pooling: bool = True, fused_attention: bool = False, seed: int = 0,
             positions: int = 64, fixed_length: int | None = None):
    """A one-layer transformer-ish encoder: embedding, masked self-attention (MatMul/Softmax or
    com.microsoft Attention), a projection; out = masked mean [B, H] (pooled) or the states [B, T, H].
    `positions`: rows of the position-embedding table (longer inputs fail); `fixed_length`: a declared
    fixed sequence length of the inputs."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)  # noqa: E731
    emb = f32(VOCAB, HIDDEN)
    emb[0] = 3.0  # the padding token's embedding: large, so that an output reading padding moves a lot
    inits = [_init("emb", emb), _init("pos_emb", f32(positions, HIDDEN)), _init("w_out", f32(HIDDEN, HIDDEN)),
             _init("axis1", np.array([1], np.int64)), _init("one_f", np.array(1.0, np.float32)),
             _init("neg", np.array(-10000.0, np.float32)), _init("scale", np.array(HIDDEN ** -0.5, np.float32)),
             _init("zero_i", np.array(0, np.int64)), _init("one_i", np.array(1, np.int64)),
             _init("axes_last", np.array([-1], np.int64)), _init("eps", np.array(1e-9, np.float32))]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one_i"], ["T"]),
        helper.make_node("Range", ["zero_i", "T", "one_i"], ["pos"]),
        helper.make_node("Gather", ["pos_emb", "pos"], ["pos_vec"]),
        helper.make_node("Add", ["tok", "pos_vec"], ["x"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
    ]
    if fused_attention:
        inits += [_init("w_qkv", f32(HIDDEN, 3 * HIDDEN)), _init("b_qkv", np.zeros(3 * HIDDEN, np.float32)),
                  _init("mask_i32_dummy", np.zeros(1, np.int32))]
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mask_i32"], to=TensorProto.INT32),
                  helper.make_node("Attention", ["x", "w_qkv", "b_qkv", "mask_i32"], ["att"], domain="com.microsoft",
                                   num_heads=HEADS)]
    else:
        inits += [_init("wq", f32(HIDDEN, HIDDEN)), _init("wk", f32(HIDDEN, HIDDEN)), _init("wv", f32(HIDDEN, HIDDEN)),
                  _init("perm", np.array([0, 2, 1], np.int64))]
        nodes += [
            helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("MatMul", ["x", "wv"], ["v"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["scores_raw"]),
            helper.make_node("Mul", ["scores_raw", "scale"], ["scores"]),
            helper.make_node("Sub", ["one_f", "mask_f"], ["inv_mask"]),
            helper.make_node("Mul", ["inv_mask", "neg"], ["bias2"]),
            helper.make_node("Unsqueeze", ["bias2", "axis1"], ["bias"]),
            helper.make_node("Add", ["scores", "bias"], ["masked"]),
            helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "v"], ["att"]),
        ]
    nodes += [helper.make_node("MatMul", ["att", "w_out"], ["h0"]), helper.make_node("Tanh", ["h0"], ["h"])]
    out_name = "embedding" if pooled else "last_hidden_state"
    if pooled and masked_pooling:
        nodes += [helper.make_node("Unsqueeze", ["mask_f", "axes_last"], ["m3"]),
                  helper.make_node("Mul", ["h", "m3"], ["hm"]),
                  helper.make_node("ReduceSum", ["hm", "axis1"], ["s"], keepdims=0),
                  helper.make_node("ReduceSum", ["m3", "axis1"], ["c0"], keepdims=0),
                  helper.make_node("Max", ["c0", "eps"], ["c"]),
                  helper.make_node("Div", ["s", "c"], [out_name])]
    elif pooled:  # the mean over every position, padding included: depends on the padding
        nodes += [helper.make_node("ReduceMean", ["h"], [out_name], axes=[1], keepdims=0)]
    else:
        nodes += [helper.make_node("Identity", ["h"], [out_name])]
    seq = fixed_length or "seq"
    shape_out = ["batch", HIDDEN] if pooled else ["batch", seq, HIDDEN]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape_out)], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if fused_attention else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _samples(n: int = 6, seed: int = 1, width: int = 24) -> list[dict[str, np.ndarray]]:
    """Sentences of 3..12 real tokens, right-padded with 0 to `width` (one per sample, batch 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 13))
        ids = np.zeros((1, width), np.int64)
        ids[0, :length] = rng.integers(1, VOCAB, length)
        mask = (ids != 0).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _padded_batch(seed: int = 7) -> dict[str, np.ndarray]:
    """A batch of 4 mixed lengths padded to 40: the inputs the trimmed model must match the source on."""
    rows = _samples(4, seed=seed, width=40)
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _run(model, feeds):
    session = cpu_session(model)
    return [np.asarray(o) for o in session.run(None, feeds)]


def _int8(model, tmp_path, form: str):
    """ORT's own INT8: dynamic (QOperator MatMulInteger) or static QDQ calibrated on padded samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    if form == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})  # the fused Attention's output type
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(_samples(8, seed=3))

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"])
    return onnx.load(dst)


def _assert_equivalent(model, trimmed, *, per_token: bool):
    feeds = _padded_batch()
    ref, got = _run(model, feeds), _run(trimmed, feeds)
    assert [o.shape for o in got] == [o.shape for o in ref]  # interface and output shapes unchanged
    r, y = ref[0], got[0]
    if per_token:
        real = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(y[real], r[real], rtol=1e-4, atol=1e-5)
        longest = int(real.sum(axis=1).max())
        assert np.all(y[:, longest:] == 0) and np.any(y[:, :longest] != 0)  # padded back with zeros
    else:
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-token"])
def test_fp32_trimmed_equals_untrimmed(pooled):
    model = _encoder(pooled=pooled)
    result = trim_padding(model, TrimPadding(), _samples())
    assert result.report["applied"], result.report.get("reason")
    assert result.report["sliced_inputs"] == ["input_ids", "attention_mask"]
    assert result.report["padded_back_outputs"] == ([] if pooled else ["last_hidden_state"])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Slice") == 2 and ops.count("Pad") == (0 if pooled else 1)
    assert [i.name for i in result.model.graph.input] == ["input_ids", "attention_mask"]
    _assert_equivalent(model, result.model, per_token=not pooled)
    assert plan(result.model).reason == "the model is trimmed already"


@pytest.mark.parametrize("form", ["dynamic", "qdq"])
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-token"])
def test_int8_trimmed_keeps_fidelity(pooled, form, tmp_path):
    """INT8 (ORT's dynamic QOperator and static QDQ): padding-independence is judged on the float source,
    and the trimmed INT8 model must stay as close to it as the untrimmed one (dynamic INT8 takes its
    ranges over the real tokens only once trimmed, so it is not bit-equal to itself untrimmed)."""
    model = _encoder(pooled=pooled)
    quantized = _int8(model, tmp_path, form)
    ops = {n.op_type for n in quantized.graph.node}
    assert ops & ({"MatMulInteger", "DynamicQuantizeMatMul"} if form == "dynamic" else {"DequantizeLinear"})
    result = trim_padding(quantized, TrimPadding(), _samples(), reference=model)
    assert result.report["applied"], result.report.get("reason")
    eq = result.report["equivalence"]
    for name, figures in eq["fidelity_trimmed"].items():
        assert figures["mean_cosine"] >= eq["fidelity_untrimmed"][name]["mean_cosine"] - 0.001
        assert figures["mean_cosine"] > 0.99
    feeds = _padded_batch()
    ref, untrimmed, got = _run(model, feeds)[0], _run(quantized, feeds)[0], _run(result.model, feeds)[0]
    assert got.shape == ref.shape
    if not pooled:
        real = feeds["attention_mask"].astype(bool)
        ref, untrimmed, got = ref[real], untrimmed[real], got[real]
    cos = lambda y: np.sum(ref * y, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(y, axis=-1))  # noqa: E731
    assert cos(got).mean() >= cos(untrimmed).mean() - 0.002
    if form == "qdq":  # static ranges: each real position computes what it did untrimmed
        np.testing.assert_allclose(got, untrimmed, atol=1e-4 * float(np.abs(untrimmed).max()))


def test_fused_attention_takes_the_shorter_sequence():
    model = _encoder(pooled=True, fused_attention=True)
    trimmed, p = trim_padding_graph(model)
    assert p.token_inputs == ("input_ids", "attention_mask")
    _assert_equivalent(model, trimmed, per_token=False)


def test_auto_refuses_an_output_that_depends_on_padding():
    model = _encoder(pooled=True, masked_pooling=False)
    result = trim_padding(model, TrimPadding(), _samples())
    assert not result.report["applied"]
    assert "depend on the padding" in result.report["reason"] and "embedding" in result.report["reason"]
    assert result.model is model
    assert result.report["equivalence"]["outputs"]["embedding"]["mean_cosine"] < 0.999
    forced = trim_padding(model, TrimPadding(mode="on"), _samples())
    assert forced.report["applied"]  # on: the user's call, the figures still reported


def test_not_applicable_and_off():
    model = _encoder(pooled=True)
    assert trim_padding(model, TrimPadding(mode="off"), _samples()).report == {
        "config": trim_padding(model, TrimPadding(mode="off")).report["config"], "applied": False, "reason": "off"}
    no_data = trim_padding(model, TrimPadding())
    assert not no_data.report["applied"] and "no held-out inputs" in no_data.report["reason"]
    model.graph.input[1].name = "segment"  # no attention-mask input any more
    for node in model.graph.node:
        node.input[:] = ["segment" if i == "attention_mask" else i for i in node.input]
    assert "no attention-mask input" in plan(model).reason
    with pytest.raises(InputError, match="trim-padding on"):
        trim_padding(model, TrimPadding(mode="on"), _samples())


def test_all_padding_batch_runs_on_one_position():
    model = _encoder(pooled=False)
    trimmed, _ = trim_padding_graph(model)
    feeds = {"input_ids": np.zeros((2, 10), np.int64), "attention_mask": np.zeros((2, 10), np.int64)}
    (out,) = _run(trimmed, feeds)
    assert out.shape == (2, 10, HIDDEN) and np.all(out[:, 1:] == 0)


def test_stage_registry_runs_it():
    stage = get_stage("trim-padding")
    from dlopt.stage import StageContext

    result = stage.apply(_encoder(pooled=True), TrimPadding(), StageContext(eval_data=_samples()))
    assert result.report["applied"]


def test_length_sorting_counts_the_tokens_a_trimmed_model_computes():
    from dlopt.bench import length_sorting

    lengths = [2, 9, 3, 8]  # batches of 2 as given: (2, 9), (3, 8) -> 9, 8; sorted: (2, 3), (8, 9) -> 3, 9
    mask = np.array([[1] * n + [0] * (10 - n) for n in lengths], np.int64)
    figures = length_sorting({"input_ids": mask * 5, "attention_mask": mask}, 2)
    assert figures == {"padded_length": 10, "mean_real_length": 5.5, "tokens_as_given": 8.5, "tokens_sorted": 6.0}
    assert length_sorting({"attention_mask": mask}, 1) is None
    assert length_sorting({"attention_mask": np.ones((4, 10), np.int64)}, 2) is None  # one length: nothing to sort


def test_int4_matmulnbits_graph_is_trimmed():
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _encoder(pooled=False)
    quantizer = MatMulNBitsQuantizer(model, block_size=16, is_symmetric=True)
    quantizer.process()
    int4 = quantizer.model.model
    assert any(n.op_type == "MatMulNBits" for n in int4.graph.node)
    result = trim_padding(int4, TrimPadding(), _samples(), reference=model)
    assert result.report["applied"], result.report.get("reason")
    feeds = _padded_batch()
    real = feeds["attention_mask"].astype(bool)
    want, got = _run(int4, feeds)[0], _run(result.model, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], rtol=1e-3, atol=1e-4)  # weight-only: per-token arithmetic


def test_quantize_applies_it_and_reports_why():
    """dlopt's quantize: trim-padding auto on the quantized model, checked against the float source."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize

    model = _encoder(pooled=True)
    data = _samples(12, seed=5)
    result = quantize(model, QuantizeConfig(mode="dynamic", speed_check=False, layernorm_form="unfused"), data)
    report = result.report["trim_padding"]
    assert report["applied"], report.get("reason")
    assert report["equivalence"]["judged_on"].startswith("the float model")
    assert [n.op_type for n in result.model.graph.node].count("Slice") == 2
    off = quantize(model, QuantizeConfig(mode="dynamic", speed_check=False, layernorm_form="unfused",
                                         trim_padding="off"), data)
    assert off.report["trim_padding"] == {"config": off.report["trim_padding"]["config"], "applied": False,
                                          "reason": "off"}
    assert "Slice" not in {n.op_type for n in off.model.graph.node}


def test_quantize_with_trim_padding_on_refuses_a_model_without_a_mask_at_once(tmp_path):
    from click.testing import CliRunner

    from dlopt.cli import main

    model = _encoder(pooled=True)
    model.graph.input[1].name = "segment"
    for node in model.graph.node:
        node.input[:] = ["segment" if i == "attention_mask" else i for i in node.input]
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--trim-padding", "on"])
    assert result.exit_code == 2, result.output
    assert "--trim-padding on: no attention-mask input" in result.output


@pytest.mark.parametrize("shape", ["position-table", "fixed-length"])
def test_auto_leaves_a_model_that_cannot_run_padded_further_untrimmed(shape):
    """The check pads held-out rows 32 positions beyond the longest real one (12 here, so 44): a
    24-row position table, or inputs declared [batch, 24], cannot run on that. auto says why; on refuses."""
    model = _encoder(pooled=True, **({"positions": 24} if shape == "position-table" else {"fixed_length": 24}))
    samples = _samples()
    assert _run(model, samples[0])[0].shape == (1, HIDDEN)  # the model runs on its own 24 positions
    result = trim_padding(model, TrimPadding(), samples)
    assert not result.report["applied"] and result.model is model
    reason = result.report["reason"]
    assert reason.startswith("the model does not run on inputs padded to 44 tokens (32 beyond the longest real "
                             "length), which the equivalence check needs: ") and "\n" not in reason
    refusal = "--trim-padding on: model graph .encoder.: the model does not run on inputs padded to 44"
    with pytest.raises(InputError, match=refusal):
        trim_padding(model, TrimPadding(mode="on"), samples)


def test_quantize_cli_with_a_position_table_too_short_for_the_check(tmp_path):
    """Through `dlopt quantize`: auto is a decision recorded in the report (exit 0), on an input error
    in one line (exit 2), not an internal error."""
    import json

    from click.testing import CliRunner

    from dlopt.cli import main

    onnx.save(_encoder(pooled=True, positions=24), tmp_path / "m.onnx")
    samples = _samples(12, seed=5)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    args = ["quantize", str(tmp_path / "m.onnx"), "--calibration", str(tmp_path / "calib.npz"), "--mode", "dynamic"]
    auto = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "q.onnx"), "--trim-padding", "auto"])
    assert auto.exit_code == 0, auto.output
    report = json.loads((tmp_path / "q.quantize.json").read_text())["trim_padding"]
    assert not report["applied"]
    assert re.match(r"the model does not run on inputs padded to \d+ tokens \(32 beyond", report["reason"])
    on = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "q_on.onnx"), "--trim-padding", "on"])
    assert on.exit_code == 2, on.output
    error = [line for line in on.output.splitlines() if "--trim-padding on" in line]
    assert len(error) == 1 and re.search(r"does not run on inputs padded to \d+ tokens", error[0]), on.output
    assert "Traceback" not in on.output and not (tmp_path / "q_on.onnx").exists()


# -- packing: only the real tokens of all rows, as one sequence -------------------------------------------
def _switch_ops(model) -> tuple[list[str], list[str], list[str]]:
    """Op types of a packed model: outside its If, in the branch for batches with no padding once sliced
    (then: sliced) and in the packed branch (else)."""
    switch = [n for n in model.graph.node if n.op_type == "If"]
    assert len(switch) == 1, [n.op_type for n in model.graph.node]
    branches = {a.name: a.g for a in switch[0].attribute}
    return ([n.op_type for n in model.graph.node], [n.op_type for n in branches["then_branch"].node],
            [n.op_type for n in branches["else_branch"].node])


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-token"])
def test_fused_attention_is_packed_and_equals_untrimmed(pooled):
    model = _encoder(pooled=pooled, fused_attention=True)
    result = trim_padding(model, TrimPadding(), _samples())
    assert result.report["applied"] and result.report["form"] == "pack", result.report
    assert result.report["packing"]["attention_nodes"] == 1
    assert result.report["packing"]["unpadded_batches"] == "sliced"
    outer, sliced_ops, ops = _switch_ops(result.model)
    assert "Attention" not in ops and ops.count("MultiHeadAttention") == 1 and "NonZero" in ops
    assert ops.count("ScatterND") == 1  # one tensor leaves the packed layers: the pooled states or the output
    assert sliced_ops.count("Attention") == 1 and "NonZero" not in sliced_ops
    assert outer.count("Slice") == 2 and "Attention" not in outer  # the trim prefix, shared by both branches
    _assert_equivalent(model, result.model, per_token=not pooled)
    sliced = trim_padding(model, TrimPadding(form="slice"), _samples())
    assert sliced.report["form"] == "slice" and "NonZero" not in {n.op_type for n in sliced.model.graph.node}


def test_packed_per_token_layers_run_on_two_dimensional_rows():
    from dlopt.optimize.trim_padding import pack_tokens_graph, sliced_name

    model = _encoder(pooled=False, fused_attention=True)
    sliced, p = trim_padding_graph(model)
    packed, pp = pack_tokens_graph(sliced, sliced_name(p.mask))
    # the per-token layers run packed up to the output, which is scattered back before slicing pads it back
    assert pp.start == "x" and pp.unpacked == ("trim_padding/last_hidden_state_trimmed",)
    _assert_equivalent(model, packed, per_token=True)
    feeds = _padded_batch()
    real = int(feeds["attention_mask"].sum())
    probe = onnx.ModelProto()
    probe.CopyFrom(packed)
    probe.graph.output.append(helper.make_empty_tensor_value_info("h"))  # the Tanh's output, packed
    h = _run(probe, feeds)[1]
    assert h.shape == (real, HIDDEN)  # [T, H]: only the real tokens were computed


def test_packed_model_runs_unpadded_batches_sliced_and_padded_ones_packed():
    """The If after the trim prefix: a batch with no padding once sliced (one sentence; rows of equal
    length) gives exactly the sliced model's outputs, a batch with padding left exactly the packed one's."""
    from dlopt.optimize.trim_padding import pack_tokens_graph, sliced_name, switch_graph

    model = _encoder(pooled=False, fused_attention=True)
    sliced, p = trim_padding_graph(model)
    packed, _ = pack_tokens_graph(sliced, sliced_name(p.mask))
    switch = switch_graph(sliced, packed, p)
    onnx.checker.check_model(switch)
    assert {t.name for t in switch.graph.initializer} == {t.name for t in packed.graph.initializer}
    padded = _padded_batch()
    rows = padded["attention_mask"].sum(axis=1)
    assert rows.min() < rows.max()  # padding is left once sliced to the longest
    one = {k: v[:1] for k, v in padded.items()}
    equal = {k: np.repeat(v[:1], 3, axis=0) for k, v in one.items()}
    for feeds, same_as in ((one, sliced), (equal, sliced), (padded, packed)):
        (got,), (expected,) = _run(switch, feeds), _run(same_as, feeds)
        assert got.shape == feeds["input_ids"].shape + (HIDDEN,)
        np.testing.assert_array_equal(got, expected)
    _assert_equivalent(model, switch, per_token=True)
    from dlopt.graphfacts import op_counts

    counts = op_counts(switch)  # both branches counted: what the file holds
    assert counts["If"] == 1 and counts["Attention"] == 1 and counts["MultiHeadAttention"] == 1, counts


def test_packing_an_all_padding_batch_runs():
    model = _encoder(pooled=False, fused_attention=True)
    result = trim_padding(model, TrimPadding(mode="on", form="pack"))
    feeds = {"input_ids": np.zeros((2, 10), np.int64), "attention_mask": np.zeros((2, 10), np.int64)}
    (out,) = _run(result.model, feeds)
    assert out.shape == (2, 10, HIDDEN) and np.all(out[1] == 0) and np.all(out[0, 1:] == 0)


def test_unfused_attention_is_sliced_and_says_why_not_packed():
    result = trim_padding(_encoder(pooled=True), TrimPadding(), _samples())
    assert result.report["form"] == "slice"
    assert "no fused attention op" in result.report["pack_reason"]
    with pytest.raises(InputError, match="form pack"):
        trim_padding(_encoder(pooled=True), TrimPadding(mode="on", form="pack"), _samples())
    refused = trim_padding(_encoder(pooled=True), TrimPadding(form="pack"), _samples())
    assert not refused.report["applied"] and "cannot be packed" in refused.report["reason"]


def test_dynamic_int8_qattention_is_packed_and_keeps_fidelity(tmp_path):
    model = _encoder(pooled=True, fused_attention=True)
    quantized = _int8(model, tmp_path, "dynamic")
    assert "QAttention" in {n.op_type for n in quantized.graph.node}
    result = trim_padding(quantized, TrimPadding(), _samples(), reference=model)
    assert result.report["applied"] and result.report["form"] == "pack", result.report
    _, sliced_ops, packed_ops = _switch_ops(result.model)
    assert "QAttention" not in packed_ops and {"MatMulIntegerToFloat", "MultiHeadAttention"} <= set(packed_ops)
    assert "QAttention" in sliced_ops
    eq = result.report["equivalence"]
    assert eq["fidelity_trimmed"] is eq["fidelity_pack"]
    assert eq["fidelity_pack"]["embedding"]["mean_cosine"] >= eq["fidelity_untrimmed"]["embedding"]["mean_cosine"] - 0.001
    feeds = _padded_batch()
    ref, untrimmed, got = _run(model, feeds)[0], _run(quantized, feeds)[0], _run(result.model, feeds)[0]
    assert got.shape == ref.shape
    cos = lambda y: np.sum(ref * y, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(y, axis=-1))  # noqa: E731
    assert cos(got).mean() >= cos(untrimmed).mean() - 0.002 and cos(got).min() > 0.98


def test_a_token_mixing_op_between_attention_layers_is_not_packed():
    """A tensor that mixes tokens (a max over the sequence) between two attention layers: packed rows cannot
    stand in for it, so the plan says why and auto slices instead."""
    from dlopt.optimize.normalize import topological_sort
    from dlopt.optimize.trim_padding import pack_plan

    model = _encoder(pooled=True, fused_attention=True)
    g = model.graph
    first = next(n for n in g.node if n.op_type == "Attention")
    for node in g.node:
        node.input[:] = ["att2" if i == "att" else i for i in node.input]
    g.node.extend([helper.make_node("ReduceMax", ["att"], ["att_max"], axes=[1], keepdims=1),
                   helper.make_node("Add", ["att", "att_max"], ["mixed"]),
                   helper.make_node("Attention", ["mixed", *first.input[1:]], ["att2"], domain="com.microsoft",
                                    num_heads=HEADS)])
    topological_sort(g)
    sliced, _ = trim_padding_graph(model)
    assert "not every attention op is reached" in pack_plan(sliced).reason
    result = trim_padding(model, TrimPadding(), _samples())
    assert result.report.get("form") != "pack" and "not every attention op" in result.report["pack_reason"]
