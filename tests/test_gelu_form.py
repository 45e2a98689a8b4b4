"""GELU's tanh form in place of its erf form (dlopt.optimize.gelu_form): the rewrite's ops and outputs, the
fidelity check that refuses it, and the timed decision given, replayed or asked for."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dlopt.optimize.gelu_form import GeluFormConfig, choose_gelu_form, find_gelu_sites, tanh_form
from dlopt.optimize.kernel_decisions import DecisionStore
from dlopt.sessions import cpu_session

HIDDEN, FFN = 16, 64


def _mlp(seed: int = 0, scale: float = 0.3):
    """x [B, T, H] -> MatMul -> BiasGelu -> MatMul -> y: a feed-forward block with the erf-form GELU."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((HIDDEN, FFN)) * scale).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(FFN) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((FFN, HIDDEN)) * 0.2).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("BiasGelu", ["h", "b1"], ["a"], domain="com.microsoft"),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "t", HIDDEN])  # noqa: E731
    graph = helper.make_graph(nodes, "mlp", [io("x")], [io("y")], inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8
    )


def _feeds(count: int = 4, scale: float = 1.0):
    rng = np.random.default_rng(7)
    return [{"x": (rng.standard_normal((2, 5, HIDDEN)) * scale).astype(np.float32)} for _ in range(count)]


class _Given(DecisionStore):
    """A store whose decision is given (no timing, no cache): the tanh form times `speedup` faster."""

    def __init__(self, speedup: float):
        self.speedup, self.asked = speedup, []
        self.replay = None

    def decide(self, question, signature, rule, *, default, alternative, measure):
        self.asked.append((question, dict(signature)))
        wins = self.speedup >= rule.margin
        return {"question": question, "default": default, "alternative": alternative, "source": "given",
                "choice": alternative if wins else default, "why": f"given {self.speedup}x"}


def test_tanh_form_computes_gelu_of_x_plus_bias_within_the_approximation():
    model = _mlp()
    rewritten, count = tanh_form(model)
    assert count == 1 and [n.op_type for n in rewritten.graph.node] == ["MatMul", "FastGelu", "MatMul"]
    assert find_gelu_sites(model) and not find_gelu_sites(rewritten)  # the input is not modified
    for feeds in _feeds():
        exact = cpu_session(model).run(None, feeds)[0]
        tanh = cpu_session(rewritten).run(None, feeds)[0]
        # tanh vs erf GELU differ by < 2e-4 per element; through w2 (|w| ~ 0.2, 64 inputs) well under 1e-3
        np.testing.assert_allclose(tanh, exact, atol=1e-3)
        assert np.abs(tanh - exact).max() > 0  # a different function, not a renamed node


def test_auto_writes_the_tanh_form_when_faster_and_fidelity_holds():
    model = _mlp()
    store = _Given(1.4)
    result = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=_feeds(), store=store)
    assert result.report["rewritten"] == 1 and "FastGelu" in {n.op_type for n in result.model.graph.node}
    assert store.asked == [("gelu form", {"op": "BiasGelu", "width": FFN, "rows": 128, "dtype": "float32"})]
    cos = result.report["fidelity"]["mean_cosine"]["y"]
    assert cos["exact"] == 1.0 and cos["tanh"] >= 1.0 - 1e-4


def test_auto_keeps_the_erf_form_when_not_faster_or_without_held_out_inputs():
    model = _mlp()
    slow = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=_feeds(), store=_Given(1.05))
    assert slow.model is model and slow.report["rewritten"] == 0 and "kept the erf form" in slow.report["decision"]
    blind = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=None, store=_Given(1.4))
    assert blind.model is model and "no held-out inputs" in blind.report["decision"]


def test_the_fidelity_check_refuses_a_tanh_form_that_costs_cosine():
    """With no cosine drop allowed at all and inputs large enough that the two forms differ visibly, the
    check refuses; the same inputs pass the default allowance."""
    model = _mlp(scale=3.0)
    feeds = _feeds(scale=3.0)
    strict = choose_gelu_form(model, GeluFormConfig(form="tanh", max_cosine_drop=0.0), reference=model, feeds=feeds)
    cos = strict.report["fidelity"]["mean_cosine"]["y"]
    assert cos["exact"] == 1.0 and cos["tanh"] <= 1.0
    assert strict.model is model and "lowers the mean cosine" in strict.report["decision"]
    lenient = choose_gelu_form(model, GeluFormConfig(form="tanh"), reference=model, feeds=feeds)
    assert lenient.report["rewritten"] == 1


def test_exact_asked_and_nothing_to_choose():
    model = _mlp()
    assert choose_gelu_form(model, GeluFormConfig(form="exact")).model is model
    model.graph.node[1].op_type, model.graph.node[1].domain = "Relu", ""
    del model.graph.node[1].input[1:]
    assert choose_gelu_form(model).report["sites"] == 0


def test_a_replayed_decision_is_used_without_timing(tmp_path):
    """A report's decision (by signature) is replayed: the tanh form without timing here."""
    model = _mlp()
    timed = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=_feeds(), store=_Given(1.4))
    record = dict(timed.report["decisions"][0])
    from dlopt.optimize.kernel_decisions import DecisionRule

    config = GeluFormConfig()
    rule = DecisionRule(margin=config.min_gain, rounds=config.rounds, runs_per_round=config.runs_per_round)
    probe = DecisionStore(replay={}, replay_source="r.json", cache_dir=tmp_path)
    sha = probe.decide("gelu form", {"op": "BiasGelu", "width": FFN, "rows": 128, "dtype": "float32"}, rule,
                       default="erf", alternative="tanh", measure=lambda: (_ for _ in ()).throw(AssertionError))
    record["signature_sha256"] = sha["signature_sha256"]
    store = DecisionStore(replay={sha["signature_sha256"]: record}, replay_source="r.json", cache_dir=tmp_path)
    replayed = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=_feeds(), store=store)
    assert replayed.report["decisions"][0]["source"] == "replayed" and replayed.report["rewritten"] == 1


def test_a_quantize_report_replays_its_gelu_decision(tmp_path):
    """load_replay (--node-forms FILE.quantize.json) reads the gelu_form section's decisions too."""
    import json

    from dlopt.optimize.kernel_decisions import load_replay

    model = _mlp()
    timed = choose_gelu_form(model, GeluFormConfig(), reference=model, feeds=_feeds(), store=_Given(1.4))
    record = dict(timed.report["decisions"][0], signature_sha256="abc")
    path = tmp_path / "m.quantize.json"
    path.write_text(json.dumps({"kernel_choice": {"decisions": []}, "gelu_form": {"decisions": [record]}}))
    assert load_replay(path)["abc"]["choice"] == "tanh"


def test_a_gelu_between_dequantize_and_quantize_is_left_alone():
    """Static QDQ: DequantizeLinear -> BiasGelu -> QuantizeLinear is ORT's to handle, not rewritten."""
    model = _mlp()
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                          numpy_helper.from_array(np.array(128, np.uint8), "z")])
    gelu = g.node[1]
    g.node.insert(1, helper.make_node("QuantizeLinear", ["h", "s", "z"], ["h_q"]))
    g.node.insert(2, helper.make_node("DequantizeLinear", ["h_q", "s", "z"], ["h_dq"]))
    gelu.input[0] = "h_dq"
    assert find_gelu_sites(model) == []
    assert choose_gelu_form(model, GeluFormConfig(form="tanh"), reference=model, feeds=_feeds()).model is model
