"""dlopt gate: the sequential decision on synthetic samples of known distributions (seeded, no timing),
the exit codes, JUnit XML and Markdown reports, stored baselines and the cross-machine refusal, and
bad input."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.gate import (
    MIN_SAMPLE_S,
    GateCheck,
    GateConfig,
    GateResult,
    LatencyOutcome,
    Look,
    Repeated,
    format_markdown,
    judge,
    junit_xml,
    look_confidence,
    look_schedule,
    metric_drop,
    overall_verdict,
    runs_per_sample,
    sequential_test,
    write_outputs,
)
from dlopt.stats import Interval, ratio_ci

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "dlopt" / "schemas" / "baseline.schema.json"


# --------------------------------------------------------------------------- the decision, on known distributions


def simulate(true_ratio: float, seed: int, *, noise: float = 0.03, phase: float = 0.0, budget: float = 20.0,
             round_s: float = 0.1, looks: int = 8, confidence: float = 0.95, n_boot: int = 2000) -> LatencyOutcome:
    """The gate's sequential test on lognormal latencies: baseline ~ 10 ms * exp(N(0, noise)), candidate
    the same times `true_ratio`, both times a per-round machine factor exp(N(0, phase)) that they share
    (interleaving). Time is simulated: each round takes `round_s`."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    clock = [0.0]

    def add_round():
        machine = np.exp(rng.normal(0, phase))
        a.append(0.010 * machine * np.exp(rng.normal(0, noise)))
        b.append(0.010 * true_ratio * machine * np.exp(rng.normal(0, noise)))
        clock[0] += round_s

    return sequential_test(add_round, lambda: len(a),
                           lambda level: ratio_ci(a, b, confidence=level, n_boot=n_boot, seed=seed),
                           limit=1.05, budget_s=budget, looks=looks, confidence=confidence, now=lambda: clock[0])


def test_look_schedule_is_geometric_fixed_in_advance_and_ends_at_the_budget():
    times = look_schedule(64.0, 8, 1 / 32)
    assert len(times) == 8 and times[0] == pytest.approx(2.0) and times[-1] == pytest.approx(64.0)
    ratios = np.array(times[1:]) / np.array(times[:-1])
    assert np.allclose(ratios, ratios[0])
    assert look_schedule(10.0, 1) == (10.0,)


def test_each_look_is_bonferroni_corrected():
    assert look_confidence(0.95, 8) == pytest.approx(1 - 0.05 / 8)
    assert look_confidence(0.95, 1) == pytest.approx(0.95)


@pytest.mark.parametrize("low, high, verdict", [
    (0.98, 1.04, "pass"), (0.90, 1.05, "pass"), (1.051, 1.2, "fail"), (1.05, 1.2, "undecided"),
    (1.00, 1.06, "undecided"), (0.5, 3.0, "undecided"),
])
def test_judge_compares_the_interval_bounds_with_the_limit(low, high, verdict):
    interval = Interval(estimate=(low + high) / 2, low=low, high=high, confidence=0.99, n=50, method="test")
    assert judge(interval, 1.05) == verdict


@pytest.mark.parametrize("true_ratio, verdict", [(1.00, "pass"), (0.80, "pass"), (1.10, "fail"), (1.30, "fail")])
def test_clear_cases_are_decided_right_and_early(true_ratio, verdict):
    outcome = simulate(true_ratio, seed=1)
    assert outcome.verdict == verdict
    assert outcome.seconds < 20.0 / 2  # well before the budget
    assert outcome.looks[-1].verdict == verdict
    assert outcome.interval.contains(true_ratio) or abs(outcome.interval.estimate - true_ratio) < 0.02


def test_false_alarm_and_detection_rates_on_known_distributions():
    no_change = [simulate(1.00, seed).verdict for seed in range(40)]
    slower = [simulate(1.10, seed).verdict for seed in range(40)]
    assert no_change.count("fail") == 0 and no_change.count("pass") >= 38
    assert slower.count("fail") >= 38 and slower.count("pass") == 0


def test_at_the_threshold_wrong_fails_stay_rare_and_most_runs_are_inconclusive():
    # True ratio exactly at the limit: "fail" is a wrong decision here. With 8 looks at a naive 95 %
    # each it would happen far more often than 2.5 %; the corrected looks keep it rare.
    verdicts = [simulate(1.05, seed, budget=6.0).verdict for seed in range(40)]
    assert verdicts.count("fail") <= 2
    assert verdicts.count("inconclusive") >= 28


def test_machine_phases_shared_by_a_round_cancel_in_the_ratio():
    # 30 % swings of the whole machine from round to round, 2 % noise of each run: the per-round
    # ratio still decides as fast as on a quiet machine.
    assert simulate(1.00, seed=3, noise=0.02, phase=0.3).verdict == "pass"
    assert simulate(1.10, seed=3, noise=0.02, phase=0.3).verdict == "fail"


def test_a_budget_too_small_for_three_rounds_is_inconclusive_and_says_why():
    outcome = simulate(1.00, seed=0, budget=1.0, round_s=0.6)
    assert outcome.verdict == "inconclusive" and outcome.interval is None
    assert "raise the time budget" in outcome.reason


class _WarmedSampler:
    models = 2

    def __init__(self, *latencies):
        self.latencies = latencies

    def warmup_samples(self, index, clock):
        return np.array([1.0] * 5 + [self.latencies[index]] * 5)  # the first runs were slow


@pytest.mark.parametrize("latencies, runs", [((0.050, 0.060), 1), ((0.004, 0.004), 2), ((0.0001, 0.0004), 50),
                                             ((1e-7, 1e-6), 1000)])
def test_fast_models_are_timed_in_groups_of_runs(latencies, runs):
    assert runs_per_sample(_WarmedSampler(*latencies), "cpu", MIN_SAMPLE_S) == runs
    calls = []
    Repeated(lambda: calls.append(1), runs)()
    assert len(calls) == runs


def _check(verdict: str, name: str = "latency") -> GateCheck:
    return GateCheck(name=name, verdict=verdict, baseline=10.0, candidate=11.0, change="x1.100 [1.08, 1.12]",
                 limit="<= x1.050", detail="synthetic", seconds=1.5)


@pytest.mark.parametrize("verdicts, policy, expected", [
    (["pass", "pass"], "exit-3", ("pass", 0)),
    (["pass", "fail"], "exit-3", ("fail", 1)),
    (["inconclusive", "fail"], "pass", ("fail", 1)),
    (["inconclusive", "pass"], "exit-3", ("inconclusive", 3)),
    (["inconclusive"], "fail", ("inconclusive", 1)),
    (["inconclusive"], "pass", ("inconclusive", 0)),
])
def test_exit_codes_follow_the_checks_and_the_inconclusive_policy(verdicts, policy, expected):
    assert overall_verdict([_check(v, f"c{i}") for i, v in enumerate(verdicts)], policy) == expected


@pytest.mark.parametrize("metric, base, cand, drop", [
    ("top1", 0.90, 0.85, 0.05), ("cosine", 1.0, 0.99, 0.01), ("mse", 0.01, 0.03, 0.02),
    ("perplexity", 33.0, 34.5, 1.5), ("pang_lee_accuracy", 0.735, 0.74, -0.005),
])
def test_metric_drop_knows_which_way_is_better(metric, base, cand, drop):
    assert metric_drop(metric, base, cand) == pytest.approx(drop)


# --------------------------------------------------------------------------- reports


def _result(verdicts: dict[str, str], policy: str = "exit-3") -> GateResult:
    checks = tuple(_check(v, name) for name, v in verdicts.items())
    verdict, code = overall_verdict(checks, policy)
    interval = Interval(estimate=1.1, low=1.08, high=1.12, confidence=0.99375, n=40, method="test")
    outcome = LatencyOutcome(verdict=verdicts.get("latency", "pass"), limit=1.05, interval=interval,
                             looks=(Look(seconds=3.0, rounds=40, interval=interval, verdict="fail"),), rounds=40,
                             seconds=3.0, look_confidence=0.99375, reason="synthetic reason")
    return GateResult(config=GateConfig(on_inconclusive=policy), mode="interleaved", baseline="base.onnx",
                      candidate="cand.onnx", checks=checks, verdict=verdict, exit_code=code, latency=outcome,
                      clock="cpu", threads=1, batch=1, warmup={"rounds": 10, "seconds": 1.0, "settled": True},
                      machine={"cpu_model": "Test CPU", "logical_cores": 2, "onnxruntime": "1.0"},
                      cross_machine=(), notes=("clock: cpu",), seconds=4.2)


@pytest.mark.parametrize("verdicts, policy, counts, tags", [
    ({"latency": "fail", "size": "pass"}, "exit-3", (2, 1, 0, 0), {"latency": "failure", "size": None}),
    ({"latency": "inconclusive", "accuracy: top1": "pass"}, "exit-3", (2, 0, 1, 0),
     {"latency": "error", "accuracy: top1": None}),
    ({"latency": "inconclusive"}, "fail", (1, 1, 0, 0), {"latency": "failure"}),
    ({"latency": "inconclusive"}, "pass", (1, 0, 0, 1), {"latency": "skipped"}),
    ({"latency": "pass"}, "exit-3", (1, 0, 0, 0), {"latency": None}),
])
def test_junit_xml_parses_with_one_testcase_per_check(verdicts, policy, counts, tags):
    root = ET.fromstring(junit_xml(_result(verdicts, policy)))
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert tuple(int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")) == counts
    assert tuple(int(root.get(k)) for k in ("tests", "failures", "errors", "skipped")) == counts
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == set(verdicts)
    for name, tag in tags.items():
        outcome = [e.tag for e in cases[name] if e.tag in ("failure", "error", "skipped")]
        assert outcome == ([] if tag is None else [tag])
        if tag is not None:
            assert name in cases[name].find(tag).get("message")
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["candidate"] == "cand.onnx"
    assert properties["exit_code"] == str(_result(verdicts, policy).exit_code)


def test_markdown_report_is_a_valid_table_with_one_row_per_check():
    from markdown_it import MarkdownIt

    result = _result({"latency": "fail", "size": "pass", "accuracy: top1": "pass"})
    text = format_markdown(result)
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    types = [t.type for t in tokens]
    assert types.count("table_open") == 1
    assert types.count("th_open") == 6
    assert types.count("tr_open") == 1 + 3  # header + one per check
    assert types[0] == "heading_open" and "FAIL (exit 1)" in tokens[1].content
    cells = [t.content for i, t in enumerate(tokens) if t.type == "inline" and tokens[i - 1].type == "td_open"]
    assert cells[:2] == ["latency", "FAIL"] and "x1.100 [1.08, 1.12]" in cells


def test_github_step_summary_is_appended_and_summary_file_written(tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    result = _result({"latency": "pass"})
    write_outputs(result, github_summary=str(summary))
    write_outputs(result, github_summary=str(summary))
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("### dlopt gate: PASS (exit 0)") == 2
    junit, report, js = tmp_path / "gate.xml", tmp_path / "gate.md", tmp_path / "gate.json"
    written = write_outputs(result, summary=report, junit=junit, json_path=js, github_summary=str(summary))
    assert set(written) == {report, junit, js}
    assert summary.read_text() == text  # --summary replaces the step summary
    assert json.loads(js.read_text())["checks"][0]["verdict"] == "pass"
    ET.parse(junit)


# --------------------------------------------------------------------------- end to end on small real models


def _chain(path: Path, layers: int, width: int, seed: int = 0, dead_weight: int = 0) -> Path:
    """x [batch, width] -> `layers` MatMuls; `dead_weight` adds an unused initializer of that many floats
    (a bigger file that runs no slower: ONNX Runtime drops it)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    if dead_weight:
        inits.append(numpy_helper.from_array(np.ones(dead_weight, np.float32), "unused"))
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate_models")
    return {
        "base": _chain(d / "base.onnx", 4, 256),
        "same": _chain(d / "same.onnx", 4, 256, seed=1),  # same work, other weights
        "double": _chain(d / "double.onnx", 8, 256),  # twice the work
        "fat": _chain(d / "fat.onnx", 4, 256, dead_weight=300_000),  # +1.2 MB, same work
        "slow": _chain(d / "slow.onnx", 8, 1024),  # ~ms per run: a tiny budget fits under 3 rounds
    }


def gate(*args: str):
    return CliRunner().invoke(main, ["gate", "--no-progress", *args], catch_exceptions=False)


def test_same_work_passes_and_double_work_fails_with_reports(models, tmp_path):
    # 10 %, not the default 5 %: where two sessions' buffers land in memory moves a ~0.04 ms model by up to
    # 7 % from session to session (0.94-1.07 for these two on an Intel Xeon under load; docs/ci-gate.md), a
    # floor the statistics cannot see; equal work must still pass above that floor and double work fail
    ok = gate("--baseline", str(models["base"]), "--candidate", str(models["same"]), "--batch", "8",
              "--budget", "20s", "--max-slowdown", "10%")
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("PASS (exit 0)")
    junit, js = tmp_path / "gate.xml", tmp_path / "gate.json"
    bad = gate("--baseline", str(models["base"]), "--candidate", str(models["double"]), "--batch", "8",
               "--budget", "20s", "--junit", str(junit), "--json", str(js))
    assert bad.exit_code == 1, bad.output
    assert bad.output.startswith("FAIL (exit 1)")
    report = json.loads(js.read_text())
    assert report["verdict"] == "fail" and report["latency"]["interval"]["low"] > 1.05
    # twice the MatMuls: about 2x, more where the 8 weights (2 MB) spill out of a core's L2 and the 4 (1 MB) do
    # not (2.8x on an Intel Xeon with 2 MB of L2)
    assert 1.6 < report["latency"]["interval"]["estimate"] < 4
    assert report["latency"]["seconds"] < 20 and report["latency"]["looks"][-1]["verdict"] == "fail"
    assert any("back-to-back runs" in note for note in report["notes"])  # ~0.1 ms runs, timed in groups
    case = ET.parse(junit).getroot().find("testsuite/testcase[@name='latency']")
    assert case.find("failure").get("type") == "regression"


def test_latency_on_inputs_from_a_data_file(models, tmp_path):
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32))
    report = tmp_path / "gate.json"
    result = gate("--baseline", str(models["base"]), "--candidate", str(models["double"]), "--data", str(data),
                  "--budget", "20s", "--json", str(report))
    assert result.exit_code == 1, result.output
    assert json.loads(report.read_text())["latency"]["interval"]["low"] > 1.05
    missing = gate("--baseline", str(models["base"]), "--candidate", str(models["same"]), "--data",
                   str(tmp_path / "none.npz"))
    assert missing.exit_code == 2 and "none.npz does not exist" in missing.output


@pytest.mark.parametrize("policy, code", [(None, 3), ("fail", 1), ("pass", 0)])
def test_inconclusive_follows_the_policy(models, tmp_path, policy, code):
    summary = tmp_path / "summary.md"
    args = ["--baseline", str(models["slow"]), "--candidate", str(models["slow"]), "--batch", "16",
            "--budget", "1ms", "--summary", str(summary)]
    result = gate(*args, *(["--on-inconclusive", policy] if policy else []))
    assert result.exit_code == code, result.output
    assert result.output.startswith(f"INCONCLUSIVE (exit {code})")
    assert "raise the time budget" in result.output
    assert f"INCONCLUSIVE (exit {code})" in summary.read_text()


def test_size_gate_fails_a_bigger_model_that_is_not_slower(models):
    result = gate("--baseline", str(models["base"]), "--candidate", str(models["fat"]), "--max-size-growth", "10%",
                  "--max-slowdown", "50%", "--batch", "8", "--budget", "20s")
    assert result.exit_code == 1, result.output
    size_row = next(line for line in result.output.splitlines() if line.startswith("size"))
    assert "FAIL" in size_row and "+114" in size_row  # 1.05 MB -> 2.25 MB
    latency_row = next(line for line in result.output.splitlines() if line.startswith("latency"))
    assert "PASS" in latency_row


def _classifier(path: Path, weights: np.ndarray) -> Path:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "clf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_accuracy_gate_on_data_catches_a_damaged_model(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4))
    x = rng.standard_normal((200, 16)).astype(np.float32)
    labels = (x @ w).argmax(axis=1)  # the baseline is right on every sample
    data = tmp_path / "val.npz"
    np.savez(data, x=x, labels=labels)
    base = _classifier(tmp_path / "base.onnx", w)
    close = _classifier(tmp_path / "close.onnx", w * (1 + 1e-6))
    w_damaged = w + rng.standard_normal((16, 4)) * 0.8
    damaged = _classifier(tmp_path / "damaged.onnx", w_damaged)
    damaged_top1 = float(np.mean((x @ w_damaged.astype(np.float32)).argmax(axis=1) == labels))
    assert damaged_top1 < 0.95  # the damage is real
    common = ["--eval-data", str(data), "--metric", "top1", "--max-accuracy-drop", "0.02", "--max-slowdown", "50%",
              "--batch", "4", "--budget", "20s"]
    good = gate("--baseline", str(base), "--candidate", str(close), *common)
    assert good.exit_code == 0, good.output
    report = tmp_path / "gate.json"
    bad = gate("--baseline", str(base), "--candidate", str(damaged), *common, "--json", str(report))
    assert bad.exit_code == 1, bad.output
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert set(checks) == {"latency", "accuracy: top1", "accuracy: top1_agreement"}
    top1 = checks["accuracy: top1"]
    assert top1["verdict"] == "fail" and top1["baseline"] == pytest.approx(1.0)
    assert top1["candidate"] == pytest.approx(damaged_top1, abs=1e-6)
    agreement = checks["accuracy: top1_agreement"]  # against the baseline's argmax, which is the label here
    assert agreement["baseline"] == 1.0 and agreement["candidate"] == pytest.approx(damaged_top1, abs=1e-6)
    # a limit for one metric only: the others are neither gated nor listed
    common = [c for c in common if c not in ("--max-accuracy-drop", "0.02")]
    one = gate("--baseline", str(base), "--candidate", str(damaged), *common, "--max-accuracy-drop",
               f"top1_agreement={1 - damaged_top1 + 0.01:.4f}", "--json", str(report))
    assert one.exit_code == 0, one.output
    assert [c["name"] for c in json.loads(report.read_text())["checks"]] == ["latency", "accuracy: top1_agreement"]
    unknown = gate("--baseline", str(base), "--candidate", str(damaged), *common, "--max-accuracy-drop", "f1=0.1")
    assert unknown.exit_code == 2 and "reports no metric f1" in unknown.output


@pytest.mark.parametrize("values, expected", [
    (("0.01",), (0.01, ())), (("top1=0.005", "0.02"), (0.02, (("top1", 0.005),))),
    (("a=1", "b=2"), (None, (("a", 1.0), ("b", 2.0)))),
])
def test_accuracy_limits_parse_as_a_default_and_per_metric(values, expected):
    from dlopt.cli.gate import parse_accuracy_drops

    assert parse_accuracy_drops(values) == expected


# --------------------------------------------------------------------------- stored baselines


@pytest.fixture(scope="session")
def stored(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("baseline") / "base.json"
    result = CliRunner().invoke(main, ["bench", str(models["base"]), "--batch", "8", "--budget", "3s",
                                       "--no-progress", "--save-baseline", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def test_saved_baseline_follows_its_schema_and_gates(models, stored):
    jsonschema = pytest.importorskip("jsonschema")
    document = json.loads(stored.read_text())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert document["fingerprint"]["threads"] == 1 and document["measurement"]["clock"] == "cpu"
    assert document["batches"][0]["input_shapes"] == {"x": [8, 256]}
    # a stored baseline is compared across time (see docs/ci-gate.md): a much wider limit than the
    # interleaved tests use; twice the work must still fail at the default one
    result = gate("--baseline", str(stored), "--candidate", str(models["base"]), "--budget", "20s",
                  "--max-slowdown", "60%")
    assert result.exit_code == 0, result.output
    assert "stored baseline" in result.output and "batch 8" in result.output
    slower = gate("--baseline", str(stored), "--candidate", str(models["double"]), "--budget", "20s")
    assert slower.exit_code == 1, slower.output


def test_another_machines_baseline_is_refused_unless_allowed(models, stored, tmp_path):
    document = json.loads(stored.read_text())
    document["fingerprint"]["cpu_model"] = "Some Other CPU @ 9.9GHz"
    document["fingerprint"]["onnxruntime"] = "0.1.0"
    other = tmp_path / "other_machine.json"
    other.write_text(json.dumps(document))
    refused = gate("--baseline", str(other), "--candidate", str(models["base"]), "--budget", "5s")
    assert refused.exit_code == 2
    assert "another machine" in refused.output and "Some Other CPU" in refused.output
    assert "re-measure the baseline model" in refused.output and "--allow-cross-machine" in refused.output
    assert "Traceback" not in refused.output
    # allowed: it measures, and labels the comparison (a wide limit: the latency verdict is not the point,
    # and a 0.1 ms model's CPU time drifts between two measurements minutes apart on a busy machine)
    allowed = gate("--baseline", str(other), "--candidate", str(models["base"]), "--budget", "20s",
                   "--max-slowdown", "100%", "--allow-cross-machine")
    assert allowed.exit_code == 0, allowed.output
    assert "CROSS-MACHINE" in allowed.output


def _edit(document: dict, path: str, value) -> dict:
    keys = path.split(".")
    target = document
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return document


@pytest.mark.parametrize("make, message", [
    (lambda d, p: p.parent / "missing.json", "does not exist"),
    (lambda d, p: _write(p, "{not json"), "is not valid JSON"),
    (lambda d, p: _write(p, json.dumps([1, 2])), "is not a dlopt baseline"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "schema", "dlopt.bench"))), "is a `dlopt bench --json` result"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "schema", "something.else"))), "is not a dlopt baseline"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "schema_version", 99))), "schema version 99"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "batches", KeyError))), "missing or malformed field"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "batches", []))), "holds no measurements"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "batches.0.samples_ms.cpu", [1.0, -2.0, 3.0]))),
     "not 3 or more positive numbers"),
    (lambda d, p: _write(p, json.dumps(_edit(d, "measurement.clock", "sundial"))), "no samples for its own clock"),
])
def test_a_bad_baseline_file_exits_2_with_a_clear_message(models, stored, tmp_path, make, message):
    path = make(json.loads(stored.read_text()), tmp_path / "bad.json")
    result = gate("--baseline", str(path), "--candidate", str(models["base"]))
    assert result.exit_code == 2, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("error: ") and message in first and str(path) in first
    assert "Traceback" not in result.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("extra, message", [
    (["--max-slowdown", "5"], "ambiguous"),
    (["--max-slowdown", "fast"], "cannot read --max-slowdown"),
    (["--max-accuracy-drop", "0.01"], "needs an evaluator"),
    (["--max-accuracy-drop", "top1=0.01"], "needs an evaluator"),
    (["--eval-data", "x.npz"], "without --max-accuracy-drop"),
    (["--metric", "top1"], "--metric applies to --eval-data"),
    (["--eval", "no-such-model", "--max-accuracy-drop", "0.01"], "unknown reference model"),
    (["--eval-data", "x.npz", "--metric", "sqnr", "--max-accuracy-drop", "1"], "sqnr has no 'drop'"),
    (["--budget", "soon"], "as a duration"),
    (["--eval-data", "x.npz", "--max-accuracy-drop", "lots"], "cannot read --max-accuracy-drop"),
    (["--eval-data", "x.npz", "--max-accuracy-drop", "0.1", "--max-accuracy-drop", "0.2"], "given twice"),
    (["--eval-data", "x.npz", "--max-accuracy-drop", "top1=-0.1"], "must not be negative"),
    (["--looks", "0"], "Invalid value for '--looks': value must be >= 1, not 0"),
    (["--target", "tpu"], "unknown target"),
])
def test_usage_errors_exit_2_with_a_message(models, extra, message):
    result = gate("--baseline", str(models["base"]), "--candidate", str(models["same"]), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_stored_baseline_settings_must_match(models, stored, tmp_path):
    narrow = _chain(tmp_path / "narrow.onnx", 2, 64)  # its input x is [batch, 64], the baseline's [8, 256]
    shapes = gate("--baseline", str(stored), "--candidate", str(narrow))
    assert shapes.exit_code == 2 and "differ from the baseline's x[8, 256]" in shapes.output
    seq = gate("--baseline", str(stored), "--candidate", str(models["base"]), "--seq-len", "64")
    assert seq.exit_code == 2 and "seq-len 128" in seq.output
    batch = gate("--baseline", str(stored), "--candidate", str(models["base"]), "--batch", "3")
    assert batch.exit_code == 2 and "no measurements at batch 3" in batch.output
    target = gate("--baseline", str(stored), "--candidate", str(models["base"]), "--target", "cuda")
    assert target.exit_code == 2 and "measured on target 'cpu'" in target.output


def test_accuracy_gate_needs_the_baseline_model_not_a_stored_file(models, stored, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 256), np.float32), labels=np.zeros(4, np.int64))
    result = gate("--baseline", str(stored), "--candidate", str(models["base"]), "--eval-data", str(data),
                  "--max-accuracy-drop", "0.01")
    assert result.exit_code == 2 and "needs the baseline model" in result.output


def test_a_missing_candidate_is_an_input_error(models, tmp_path):
    from dlopt.gate import run_gate

    with pytest.raises(InputError, match="does not exist"):
        run_gate(models["base"], tmp_path / "nope.onnx", GateConfig(budget_s=1))


@pytest.mark.parametrize("changes, api, cli", [
    (dict(max_slowdown=-0.1), "e.g. max_slowdown=0.05 (5%)", "e.g. --max-slowdown 0.05 (5%)"),
    (dict(max_accuracy_drop=-1.0), "e.g. max_accuracy_drop=0.01", "e.g. --max-accuracy-drop 0.01"),
    (dict(max_size_growth=-2.0), "e.g. max_size_growth=0.1 (10%)", "e.g. --max-size-growth 0.1 (10%)"),
    (dict(confidence=0.2), "e.g. confidence=0.95", "e.g. --confidence 0.95"),
    (dict(looks=0), "e.g. looks=8", "e.g. --looks 8"),
])
def test_config_errors_name_keyword_arguments_for_api_users_and_flags_on_the_cli(changes, api, cli):
    from dlopt.gate import GateConfig, validate_config

    with pytest.raises(InputError) as e:
        validate_config(GateConfig(**changes))
    assert api in str(e.value) and "--" not in str(e.value)
    assert cli in e.value.cli_text()
