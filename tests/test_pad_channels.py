"""Stem conv input channels padded to 4 for ORT's symmetric int8 conv kernel (dlopt.optimize.pad_channels):
where it applies, that the padded model computes the same outputs, that the timed choice decides (with fake
timers: never the host's speed), and that quantize reports and replays it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dlopt.optimize.kernel_choice as kernel_choice
from dlopt.optimize.kernel_decisions import DecisionStore
from dlopt.optimize.pad_channels import choose_channel_padding, find_pad_sites, pad_input_channels

SIDE = 24


def _stem_model(out_channels: int = 16) -> onnx.ModelProto:
    """image[b, 3, 24, 24] -> stem 3x3 3->C (stride 2) -> Clip 0..6 -> pointwise C->32 -> GAP -> Flatten."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["image", "k0", "b0"], ["a0"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Clip", ["a0", "lo", "hi"], ["r0"], name="relu6"),
             helper.make_node("Conv", ["r0", "k1", "b1"], ["a1"], name="pwconv"),
             helper.make_node("GlobalAveragePool", ["a1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["features"], name="flatten")]
    graph = helper.make_graph(
        nodes, "stem", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
        [init("k0", out_channels, 3, 3, 3), init("b0", out_channels), init("k1", 32, out_channels, 1, 1), init("b1", 32),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n: int = 12) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)


def _static_int8(tmp_path, model: onnx.ModelProto) -> onnx.ModelProto:
    """The model statically quantized with every node INT8 and no timing (node forms int8: no padding)."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    src, out, data = tmp_path / "m.onnx", tmp_path / "m.int8.onnx", tmp_path / "images.npz"
    onnx.save(model, src)
    np.savez(data, image=_images())
    quantize_file(src, out, QuantizeConfig(mode="static", node_forms="int8", speed_check=False), str(data))
    return onnx.load(out)


def _timer(padded_speedup: float):
    """Per-round figures (15 rounds) in which a model with a Pad takes 1/padded_speedup of the time."""
    rng = np.random.default_rng(0)

    def timer(models, feeds, **_):
        return [(1.0 / padded_speedup if any(n.op_type == "Pad" for n in m.graph.node) else 1.0)
                * 1000 * (1 + 0.005 * rng.standard_normal(15)) for m in models]
    return timer


def weights_by_name(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_the_stem_of_a_static_int8_model_is_found_and_padded_exactly(tmp_path):
    from dlopt.sessions import cpu_session

    qdq = _static_int8(tmp_path, _stem_model())
    sites = find_pad_sites(qdq)
    assert [(s.conv, s.graph_input, s.channels) for s in sites] == [("stem", "image", 3)]  # not the 16-channel pwconv
    padded = pad_input_channels(qdq, sites)
    onnx.checker.check_model(padded)
    ops = [n.op_type for n in padded.graph.node]
    # on the 8-bit tensor between QuantizeLinear and DequantizeLinear, its constant the input's zero point
    assert ops.count("Pad") == 1
    pad = next(n for n in padded.graph.node if n.op_type == "Pad")
    quantize = next(n for n in padded.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    readers = [n.op_type for n in padded.graph.node if pad.output[0] in n.input]
    assert pad.input[0] == quantize.output[0] and readers == ["DequantizeLinear"]
    assert ops.index("QuantizeLinear") < ops.index("Pad")  # in topological order
    value = numpy_helper.to_array(weights_by_name(padded)[pad.input[2]])
    assert value.dtype == numpy_helper.to_array(weights_by_name(padded)[quantize.input[2]]).dtype
    assert value == numpy_helper.to_array(weights_by_name(padded)[quantize.input[2]])
    weights = {t.name: t for t in padded.graph.initializer}
    assert list(weights[sites[0].weight].dims) == [16, 4, 3, 3]
    assert not np.any(numpy_helper.to_array(weights[sites[0].weight])[:, 3])  # the added channel's weights are 0
    x = _images(4)
    before = cpu_session(qdq).run(None, {"image": x})[0]
    after = cpu_session(padded).run(None, {"image": x})[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)  # the same integer arithmetic
    assert [i.name for i in padded.graph.input] == ["image"] and padded.graph.output == qdq.graph.output


def test_convs_the_symmetric_kernel_would_not_take_are_left_alone(tmp_path):
    qdq = _static_int8(tmp_path, _stem_model(out_channels=8))  # fewer than 16 output channels
    assert find_pad_sites(qdq) == []
    result = choose_channel_padding(qdq, {"image": _images(1)}, timer=_timer(2.0),
                                    store=DecisionStore(cache_dir=tmp_path / "cache"))
    assert result.model is qdq and not result.report["applied"] and "nothing to pad" in result.report["decision"]


@pytest.mark.parametrize("speedup, applied", [(1.10, True), (1.0, False), (0.9, False)])
def test_padding_is_kept_only_when_it_times_faster(tmp_path, speedup, applied):
    qdq = _static_int8(tmp_path, _stem_model())
    result = choose_channel_padding(qdq, {"image": _images(1)}, timer=_timer(speedup),
                                    store=DecisionStore(cache_dir=tmp_path / "cache"))
    report = result.report
    assert report["applied"] is applied and report["max_abs_diff"] <= 1e-5
    assert ("Pad" in {n.op_type for n in result.model.graph.node}) is applied
    (record,) = report["decisions"]
    assert record["source"] == "timed" and record["choice"] == ("padded" if applied else "as is")
    assert record["figures"]["rounds"] == 15 and record["figures"]["margin"] == 1.03


def test_a_cached_decision_is_reused_for_the_same_padded_form_only(tmp_path, monkeypatch):
    import dlopt.optimize.pad_channels as pad_channels

    qdq = _static_int8(tmp_path, _stem_model())
    store = DecisionStore(cache_dir=tmp_path / "cache")
    sources = []
    for form in (pad_channels.PADDED_FORM, pad_channels.PADDED_FORM, "another padded form"):
        monkeypatch.setattr(pad_channels, "PADDED_FORM", form)
        result = choose_channel_padding(qdq, {"image": _images(1)}, timer=_timer(1.10), store=store)
        sources.append(result.report["decisions"][0]["source"])
    # timed, then read from the cache, then timed again: a decision about another form of the padding
    assert sources[0] == "timed" and sources[1] != "timed" and sources[2] == "timed", sources


def test_quantize_reports_the_padding_and_a_report_replays_it(tmp_path, monkeypatch):
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    src, data = tmp_path / "m.onnx", tmp_path / "images.npz"
    onnx.save(_stem_model(), src)
    np.savez(data, image=_images())
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(tmp_path / "cache"))
    # every node class as fast in INT8 as in float (no node kept float for speed); the padded model faster
    monkeypatch.setattr(kernel_choice, "time_models", _timer(1.10))
    first = tmp_path / "first.onnx"
    quantize_file(src, first, QuantizeConfig(mode="static", speed_check=False), str(data))
    report = json.loads(first.with_name("first.quantize.json").read_text())
    padding = report["node_forms"]["channel_padding"]
    assert padding["applied"] and [s["conv"] for s in padding["sites"]] == ["stem"]
    assert "Pad" in report["ops_after"]
    assert report["fidelity"]["outputs"]["features"]["sqnr_db"] > 20  # padding is exact: INT8's own noise only
    recorded = [d for d in report["node_forms"]["decisions"] if d["question"].startswith("stem conv")]
    assert [d["choice"] for d in recorded] == ["padded"]

    # replayed on another machine: no timing, the same decision and bytes
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(tmp_path / "other-cache"))
    monkeypatch.setattr(kernel_choice, "time_models", lambda *a, **k: pytest.fail("timed while replaying"))
    second = tmp_path / "second.onnx"
    quantize_file(src, second, QuantizeConfig(mode="static", speed_check=False,
                                              node_forms=str(first.with_name("first.quantize.json"))), str(data))
    assert second.read_bytes() == first.read_bytes()
