"""Reproducible kernel choice (dlopt.optimize.kernel_decisions): the same static INT8 quantize gives the
same bytes under load and concurrently, decisions are cached per CPU and replayed from a report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from importlib.resources import files as files_of

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import dlopt.optimize.kernel_choice as kernel_choice
import dlopt.optimize.kernel_decisions as kernel_decisions
from dlopt.optimize.kernel_decisions import DecisionRule, judge

SIDE = 24


def _mobile_model() -> onnx.ModelProto:
    """image[b, 3, 24, 24] -> stem 3->16 -> Relu -> depthwise 3x3 -> Relu -> pointwise 16->32 -> Relu -> GAP ->
    Flatten -> Gemm 10: a node of every class the node forms choose between."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["image", "k0", "b0"], ["a0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "k1", "b1"], ["a1"], name="dwconv", pads=[1, 1, 1, 1], group=16),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2", "b2"], ["a2"], name="pwconv"),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "mobile", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [init("k0", 16, 3, 3, 3), init("b0", 16), init("k1", 16, 1, 3, 3), init("b1", 16), init("k2", 32, 16, 1, 1),
         init("b2", 32), init("wf", 10, 32), init("bf", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def files(tmp_path):
    """The model and its calibration images on disk."""
    model = tmp_path / "mobile.onnx"
    onnx.save(_mobile_model(), model)
    data = tmp_path / "images.npz"
    np.savez(data, image=np.random.default_rng(1).standard_normal((12, 3, SIDE, SIDE)).astype(np.float32))
    return model, data


QUANTIZE_SCRIPT = textwrap.dedent("""
    import sys
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file
    quantize_file(sys.argv[1], sys.argv[2], QuantizeConfig(mode="static", speed_check=False), sys.argv[3])
""")


def _quantize_processes(files, outputs: list[Path], cache: Path) -> list[subprocess.Popen]:
    model, data = files
    env = {**__import__("os").environ, "DLOPT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", QUANTIZE_SCRIPT, str(model), str(out), str(data)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in outputs]


def _wait(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()[-2000:]


def _report(path: Path) -> dict:
    return json.loads(path.with_name(path.name[:-5] + ".quantize.json").read_text())


def _decisions(report: dict) -> list[dict]:
    return (report.get("node_forms") or {}).get("decisions", []) + (report.get("kernel_choice") or {}).get(
        "decisions", [])


def test_the_same_quantize_twice_under_load_writes_the_same_bytes(files, tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another process loading the CPU
    try:
        outputs = [tmp_path / "first.onnx", tmp_path / "second.onnx"]
        for out in outputs:
            _wait(_quantize_processes(files, [out], tmp_path / "cache")[0])
    finally:
        busy.kill()
        busy.wait()
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    first, second = (_decisions(_report(p)) for p in outputs)
    assert len(first) >= 4 and {d["source"] for d in first} == {"timed"}  # one decision per node class at least
    assert {d["source"] for d in second} == {"cache"}
    assert [d["choice"] for d in first] == [d["choice"] for d in second]
    for d in first:  # each decision with its figures: medians, CI, rounds, margin, on thread CPU time
        f = d["figures"]
        assert f["clock"] == "thread CPU time" and f["rounds"] == 15 and f["margin"] in (1.15, 1.03)
        assert f["ci"][0] <= f["speedup"] <= f["ci"][1] and f["default_us"] > 0 and f["alternative_us"] > 0


def test_four_concurrent_quantizes_write_the_same_bytes_and_time_each_decision_once(files, tmp_path):
    outputs = [tmp_path / f"run{i}.onnx" for i in range(4)]
    for process in _quantize_processes(files, outputs, tmp_path / "cache"):
        _wait(process)
    assert len({p.read_bytes() for p in outputs}) == 1
    timed: dict[str, int] = {}
    for p in outputs:
        for d in _decisions(_report(p)):
            timed[d["signature_sha256"]] = timed.get(d["signature_sha256"], 0) + (d["source"] == "timed")
    # one process timed each decision under the key's lock; the other three waited and read its entry
    assert timed and set(timed.values()) == {1}


def _fake_per_round_timer(int8_slower: str):
    """A timer with per-round figures in which `int8_slower`'s INT8 form takes 4x its float form, every
    other node costs the same in both forms, and a model with that class in float is faster."""
    from kernel_costs import graph_cost

    rng = np.random.default_rng(0)
    return lambda models, feeds, **_: [
        graph_cost(m, {int8_slower: 4.0}, {}) * (1 + 0.01 * rng.standard_normal(15)) for m in models
    ]


def test_a_report_replays_on_another_cpu_without_timing(files, tmp_path, monkeypatch):
    from dlopt.cli import main

    model, data = files
    monkeypatch.setattr(kernel_choice, "time_models", _fake_per_round_timer("small-channel conv"))
    source = tmp_path / "here.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(source), "--calibration", str(data),
                                       "--mode", "static"])
    assert result.exit_code == 0, result.output
    report = _report(source)
    assert report["node_forms"]["float_nodes"] == ["stem"]  # a decision that changes the graph
    assert "(95% CI)" in result.output  # the quick speed check prints its CI

    # another machine: another CPU, an empty cache, and any timing fails the test
    monkeypatch.setattr(kernel_decisions, "cpu_identity", lambda: {"cpu_model": "Other CPU", "isa_flags": ["avx2"]})
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(tmp_path / "other-cache"))
    monkeypatch.setattr(kernel_choice, "time_models", lambda *a, **k: pytest.fail("timed while replaying"))
    monkeypatch.setattr(kernel_choice, "time_layernorm_forms", lambda *a, **k: pytest.fail("timed while replaying"))
    replayed = tmp_path / "there.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(replayed), "--calibration", str(data),
                                       "--mode", "static", "--node-forms", str(source.with_suffix(".quantize.json"))])
    assert result.exit_code == 0, result.output
    assert replayed.read_bytes() == source.read_bytes()
    decisions = _decisions(_report(replayed))
    assert decisions and {d["source"] for d in decisions} == {"replayed"}
    assert not (tmp_path / "other-cache").exists() or not any((tmp_path / "other-cache").iterdir())


def test_decisions_are_cached_per_cpu_reused_and_listed(files, tmp_path, monkeypatch):
    from dlopt.cli import main
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    model, data = files
    config = QuantizeConfig(mode="static", speed_check=False)
    first = quantize_file(model, tmp_path / "a.onnx", config, data)
    assert {d["source"] for d in _decisions(first.report)} == {"timed"}
    schema = json.loads(files_of("dlopt").joinpath("schemas/quantize.schema.json").read_text())
    jsonschema.validate(json.loads(first.report_path.read_text()), schema)
    listing = CliRunner().invoke(main, ["cache", "ls"])
    assert listing.exit_code == 0 and listing.output.count("kernel-decision") == len(_decisions(first.report))
    assert "node class depthwise conv: int8 or float" in listing.output

    monkeypatch.setattr(kernel_choice, "time_models", lambda *a, **k: pytest.fail("timed again"))
    second = quantize_file(model, tmp_path / "b.onnx", config, data)
    assert {d["source"] for d in _decisions(second.report)} == {"cache"}
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert "from the decision cache" in second.report["node_forms"]["decision"]

    # another CPU model is another key: timed there, not taken from this CPU's entries
    monkeypatch.setattr(kernel_decisions, "cpu_identity", lambda: {"cpu_model": "Other CPU", "isa_flags": []})
    calls = []
    monkeypatch.setattr(kernel_choice, "time_models", lambda models, feeds, **_: calls.append(1) or [
        np.full(15, 10.0), np.full(15, 10.0)])
    third = quantize_file(model, tmp_path / "c.onnx", config, data)
    assert calls and {d["source"] for d in _decisions(third.report)} == {"timed"}


@pytest.mark.parametrize("default, alternative, wins", [
    (np.full(15, 100.0), np.full(15, 100.0), False),  # a tie: the default
    (np.full(15, 110.0), np.full(15, 100.0), False),  # faster, but below the margin
    (np.full(15, 200.0), np.full(15, 100.0), True),  # 2x, every round
    # 1.3x in the median but half the rounds the other way round: the CI reaches below 1x
    (np.array([130.0] * 8 + [70.0] * 7), np.full(15, 100.0), False),
])
def test_the_rule_keeps_the_default_unless_the_alternative_is_surely_faster(default, alternative, wins):
    figures = judge(default, alternative, DecisionRule(margin=1.15))
    assert figures["alternative_wins"] is wins
    assert figures["ci"][0] <= figures["speedup"] <= figures["ci"][1] and figures["rounds"] == 15


# 1.3x in the median, but 5 of 15 rounds the other way round: the CI of one look reaches below 1x (45 such
# rounds would clear it); 7 of 15 the other way round: no number of looks clears it
UNCERTAIN = (np.array([130.0] * 10 + [70.0] * 5), np.full(15, 100.0))
SPLIT = (np.array([130.0] * 8 + [70.0] * 7), np.full(15, 100.0))


@pytest.mark.parametrize("batches, looks, choice", [
    ([(np.full(15, 100.0), np.full(15, 100.0))], 1, "int8"),  # a tie ends at the first look
    ([(np.full(15, 110.0), np.full(15, 100.0))], 1, "int8"),  # below the margin: no second look
    ([UNCERTAIN, (np.full(15, 130.0), np.full(15, 100.0))], 2, "float"),  # promising, then sure: pooled, wins
    ([SPLIT, SPLIT, SPLIT, SPLIT], 3, "int8"),  # still uncertain after 3 looks: the default
])
def test_a_promising_uncertain_decision_takes_more_rounds(tmp_path, batches, looks, choice):
    from dlopt.optimize.kernel_decisions import DecisionStore

    given = iter(batches)
    calls = []

    def measure():
        calls.append(1)
        return next(given)

    record = DecisionStore(cache_dir=tmp_path / "cache").decide(
        "node class depthwise conv: int8 or float", {"class": "depthwise conv"}, DecisionRule(margin=1.15),
        default="int8", alternative="float", measure=measure)
    figures = record["figures"]
    assert len(calls) == figures["looks"] == looks and figures["rounds"] == 15 * looks
    assert record["choice"] == choice and figures["alternative_wins"] is (choice == "float")


def test_a_report_that_cannot_be_replayed_is_an_input_error(files, tmp_path):
    from dlopt.cli import main

    model, data = files
    (tmp_path / "plain.json").write_text(json.dumps({"schema": "something else"}))
    for report, message in [(tmp_path / "missing.quantize.json", "cannot read the report to replay"),
                            (tmp_path / "plain.json", "records no kernel decisions")]:
        result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "out.onnx"), "--calibration",
                                           str(data), "--mode", "static", "--node-forms", str(report)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out.onnx").exists()


def test_a_decision_missing_from_the_replayed_report_takes_the_default(tmp_path, monkeypatch):
    from dlopt.data import CalibrationData
    from dlopt.optimize.quantize import QuantizeConfig, quantize, quantize_text

    report = tmp_path / "empty.quantize.json"
    report.write_text(json.dumps({"node_forms": {"decisions": []}, "kernel_choice": None}))
    monkeypatch.setattr(kernel_choice, "time_models", lambda *a, **k: pytest.fail("timed while replaying"))
    images = np.random.default_rng(1).standard_normal((12, 3, SIDE, SIDE)).astype(np.float32)
    result = quantize(_mobile_model(), QuantizeConfig(mode="static", speed_check=False, node_forms=str(report)),
                      CalibrationData.from_arrays({"image": images}, source="images"))
    forms = result.report["node_forms"]
    assert {d["source"] for d in forms["decisions"]} == {"default"} and not forms["kept"]
    assert {t["choice"] for t in forms["classes"].values()} == {"int8"}
    assert "decided" in quantize_text(result.report)
