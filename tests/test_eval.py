"""dlopt eval: metrics on tiny known cases, data + reference evaluation, reference-model evaluators, CLI."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.evaluate import EvalConfig, evaluate_data, evaluate_reference_model, top1
from dlopt.fidelity import cosine, mse, sqnr_db


def _scale_model(path, factor: float, noise: float = 0.0, batch: int | str = "n"):
    """y = factor * x (+ a fixed perturbation): a 'quantized' copy of the identity with known error."""
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [factor])),
             helper.make_node("Mul", ["x", "k"], ["m"])]
    if noise:
        nodes += [helper.make_node("Constant", [], ["e"],
                                   value=helper.make_tensor("e", TensorProto.FLOAT, [4], [noise, -noise, 0, 0])),
                  helper.make_node("Add", ["m", "e"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["y"]))
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture()
def files(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    labels = x.argmax(axis=1)
    labels[:10] = (labels[:10] + 1) % 4  # 30 of 40 labels right for the identity
    data = tmp_path / "val.npz"
    np.savez(data, x=x, labels=labels)
    return {"x": x, "data": data, "ref": _scale_model(tmp_path / "ref.onnx", 1.0),
            "same": _scale_model(tmp_path / "same.onnx", 1.0), "noisy": _scale_model(tmp_path / "noisy.onnx", 1.0, 0.5),
            "neg": _scale_model(tmp_path / "neg.onnx", -1.0)}


def test_top1_known_cases():
    assert top1(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5
    assert top1(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0, 1], [1, 0]])) == 1.0  # agreement with scores
    with pytest.raises(InputError, match="3 labels for 2 samples"):
        top1(np.zeros((2, 2)), np.zeros(3))


def test_cosine_known_cases():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 5.0]])) == pytest.approx(0.0)
    assert cosine(np.array([[1.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert cosine(np.zeros((1, 3)), np.zeros((1, 3))) == 1.0


def test_sqnr_and_mse_known_cases():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(np.array([3.0, 4.5]), ref) == pytest.approx(20.0)  # |ref| = 5, |noise| = 0.5
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(np.array([3.0, 4.05]), ref) == pytest.approx(40.0)
    assert mse(np.array([3.0, 4.5]), ref) == pytest.approx(0.125)
    with pytest.raises(InputError, match="differs from the reference"):
        mse(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("metric, direction", [("pang_lee_accuracy", True), ("perplexity", False), ("mse", False),
                                               ("lee50_pearson", True), ("top1_agreement", True), ("latency", None)])
def test_metric_direction_from_its_name(metric, direction):
    from dlopt.evaluate import higher_is_better

    assert higher_is_better(metric) is direction


def test_on_data_with_labels_and_a_reference(files):
    config = EvalConfig(metrics=("top1", "sqnr", "cosine", "mse"), batch_size=16)
    result = evaluate_data(files["noisy"], files["data"], config, reference=files["ref"])
    assert result.samples == 40
    top = next(r for r in result.rows if r.metric == "top1")
    assert top.reference == pytest.approx(30 / 40)  # the identity gets 30 of 40
    noise = np.tile([0.5, -0.5, 0, 0], (40, 1))
    assert result.value("sqnr") == pytest.approx(sqnr_db(files["x"] + noise, files["x"]), rel=1e-5)
    assert result.value("mse") == pytest.approx(0.125, rel=1e-5)
    assert 0.5 < result.value("cosine") < 1.0
    assert 0.0 < result.value("top1_agreement") < 1.0


def test_a_fixed_batch_1_model_runs_on_every_sample_of_the_data(files, tmp_path):
    # 40 samples through a model whose batch axis is fixed at 1: run one at a time, not refused for the shape
    fixed = _scale_model(tmp_path / "fixed.onnx", 1.0, 0.5, batch=1)
    result = evaluate_data(fixed, files["data"], EvalConfig(metrics=("top1", "cosine")), reference=files["ref"])
    noisy = evaluate_data(files["noisy"], files["data"], EvalConfig(metrics=("top1", "cosine")), reference=files["ref"])
    assert result.samples == 40
    assert result.value("cosine") == pytest.approx(noisy.value("cosine"), abs=1e-9) and result.value("cosine") < 0.999
    assert result.value("top1") == pytest.approx(noisy.value("top1"))


def test_identical_model_is_perfect_and_negated_model_is_not(files):
    config = EvalConfig(metrics=("top1", "sqnr", "cosine"))
    same = evaluate_data(files["same"], files["data"], config, reference=files["ref"])
    assert same.value("sqnr") == float("inf") and same.value("cosine") == pytest.approx(1.0)
    assert same.value("top1_agreement") == 1.0
    neg = evaluate_data(files["neg"], files["data"], config, reference=files["ref"])
    assert neg.value("cosine") == pytest.approx(-1.0) and neg.value("top1_agreement") == 0.0


def test_expected_output_stored_in_the_data(files, tmp_path):
    data = tmp_path / "with_expected.npz"
    np.savez(data, x=files["x"], y=files["x"] * 1.0)
    result = evaluate_data(files["same"], data, EvalConfig(metrics=("mse",)))
    assert result.value("mse") == 0.0


@pytest.mark.parametrize("metric, match", [("top1", "top1 needs labels"), ("sqnr", "compares with a reference")])
def test_metrics_without_what_they_compare_with(files, tmp_path, metric, match):
    data = tmp_path / "bare.npz"
    np.savez(data, x=files["x"])
    with pytest.raises(InputError, match=match):
        evaluate_data(files["same"], data, EvalConfig(metrics=(metric,)))


class _FakeReference:
    """A reference model whose evaluator really runs the model: mean of its output on fixed inputs."""

    def evaluate(self, runner):
        out = runner({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
        return {"mean_output": float(np.mean(out["y"]))}


def test_reference_model_evaluator_runs_model_and_reference(files, monkeypatch):
    import dlopt.models

    monkeypatch.setattr(dlopt.models, "get_reference_model", lambda name: _FakeReference())
    result = evaluate_reference_model(files["neg"], "fake", reference=files["ref"])
    row = result.rows[0]
    assert (row.metric, row.value, row.reference) == ("mean_output", -3.5, 3.5)
    assert row.delta == -7.0


def test_table_says_which_way_a_delta_goes(files):
    from dlopt.evaluate import EvalResult, MetricRow, format_eval

    result = EvalResult(model="int8.onnx", reference="fp32.onnx", source="x", samples=None, runs_on="cpu",
                        rows=(MetricRow("pang_lee_accuracy", 0.725, 0.735), MetricRow("perplexity", 30.0, 33.0)))
    lines = format_eval(result).splitlines()
    assert "-0.01 worse" in lines[2] and "-3 better" in lines[3]


def test_reference_model_evaluator_with_a_model_that_does_not_fit(files, monkeypatch):
    import dlopt.models

    class _TokenEvaluator:
        def evaluate(self, runner):
            return {"m": float(np.mean(runner({"input_ids": np.zeros((1, 4), np.int64)})["y"]))}

    monkeypatch.setattr(dlopt.models, "get_reference_model", lambda name: _TokenEvaluator())
    with pytest.raises(InputError, match=r"needs input\(s\) \['x'\], which the tokens evaluator does not provide"):
        evaluate_reference_model(files["same"], "tokens")


def test_cli_eval_prints_metrics_beside_the_reference(files, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(files["noisy"]), "--data", str(files["data"]), "--metric",
                                       "top1,sqnr", "--reference", str(files["ref"]), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "noisy.onnx" in result.output and "ref.onnx" in result.output and "top1_agreement" in result.output
    data = json.loads(out.read_text())
    assert data["schema"] == "dlopt.eval" and {m["metric"] for m in data["metrics"]} == {"top1", "top1_agreement",
                                                                                          "sqnr"}


@pytest.mark.parametrize("args, message", [
    (["{m}"], "give either --data FILE.npz or --model NAME"),
    (["{m}", "--data", "{d}", "--model", "minilm"], "give either"),
    (["{m}", "--data", "{d}", "--metric", "f1"], "unknown metric 'f1'"),
    (["{m}", "--model", "resnet"], "unknown reference model 'resnet'"),
    (["{m}", "--model", "minilm", "--metric", "top1"], "--metric applies to --data"),
    (["missing.onnx", "--data", "{d}"], "missing.onnx does not exist"),
    (["{m}", "--data", "missing.npz"], "missing.npz does not exist"),
    (["{m}", "--data", "{d}", "--output", "z"], "has no output 'z'"),
    (["{m}", "--data", "{d}", "--target", "cuda"], "not available here"),
])
def test_cli_eval_bad_input_exits_2(files, args, message):
    import dlopt.targets

    if message == "not available here" and dlopt.targets.get_target("cuda").is_available()[0]:
        pytest.skip("this machine has CUDA")
    subs = {"m": str(files["same"]), "d": str(files["data"])}
    result = CliRunner().invoke(main, ["eval", *[a.format(**subs) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.heavy
def test_minilm_real_evaluator_on_an_exported_model(tmp_path):
    pytest.importorskip("dlopt.models.minilm")
    from dlopt.api import export_model

    path = tmp_path / "minilm.onnx"
    export_model("minilm", path)
    result = evaluate_reference_model(path, "minilm")
    assert result.value("pang_lee_accuracy") > 0.65
