"""Inputs (dlopt.inputs, dlopt.images) and fidelity (dlopt.fidelity): shapes that the model runs on,
--input-shape, integer ranges read from the graph, image-folder calibration, and one set of metrics
shared by quantize and eval."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.errors import InputError
from dlopt.fidelity import compare_arrays, compare_runs, cosine, sqnr_db
from dlopt.inputs import graph_inputs, model_feeds, parse_input_shapes, resolve_shapes, value_ranges
from dlopt.sessions import cpu_session


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    return model


def two_path_model() -> onnx.ModelProto:
    """x[N, 3, H, W] -> MaxPool /32 (H/32) + Resize x2 of MaxPool /64 (2·floor(H/64)): an FPN-like sum
    of two downsampling paths, which runs only where H and W are multiples of 64 (at 224 it fails
    like PP-OCR's detector: 'broadcast ... 7 by 6')."""
    nodes = [helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[32, 32], strides=[32, 32]),
             helper.make_node("MaxPool", ["x"], ["b"], kernel_shape=[64, 64], strides=[64, 64]),
             helper.make_node("Resize", ["b", "", "scales"], ["b2"], mode="nearest"),
             helper.make_node("Add", ["a", "b2"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  [_init("scales", [1, 1, 2, 2])])


def fixed_height_model() -> onnx.ModelProto:
    """x[N, 3, H, W] + a [1, 3, 48, 1] bias: runs only at height 48 (a text recognizer's input)."""
    return _model([helper.make_node("Add", ["x", "bias"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  [_init("bias", np.ones((1, 3, 48, 1)))])


def byte_model() -> onnx.ModelProto:
    """Magika-like: int32 bytes[N, 16] one-hot encoded by Equal against a [1, 1, 257] table of 0..256,
    and int64 ids[N, T] looked up in a 50-row embedding (ids >= 50 make Gather fail)."""
    nodes = [helper.make_node("Unsqueeze", ["bytes", "axis2"], ["b3"]),
             helper.make_node("Equal", ["b3", "table"], ["hot"]),
             helper.make_node("Cast", ["hot"], ["hotf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["hotf", "axes1"], ["hist"], keepdims=0),
             helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes1"], ["y"], keepdims=0)]
    return _model(nodes, [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 16]),
                          helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
                  [helper.make_tensor_value_info("hist", TensorProto.FLOAT, None),
                   helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  [_init("axis2", [2], np.int64), _init("axes1", [1], np.int64),
                   _init("table", np.arange(257).reshape(1, 1, 257), np.int32),
                   _init("emb", np.random.default_rng(0).standard_normal((50, 4)))])


def conv_map_model(seed: int = 0, nhwc: bool = False, free_hw: bool = False) -> onnx.ModelProto:
    """image[N, 3, H, W] (or NHWC) -> Conv 8 -> Relu -> Conv 1 -> Sigmoid -> map[N, 1, H, W]: a tiny
    detector-like CNN whose output is a probability map."""
    rng = np.random.default_rng(seed)
    h, w = ("H", "W") if free_hw else (32, 32)
    nodes = [helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2])] if nhwc else []
    nodes += [helper.make_node("Conv", ["x" if nhwc else "image", "k1", "c1"], ["a1"], name="conv1", pads=[1] * 4),
              helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
              helper.make_node("Conv", ["r1", "k2", "c2"], ["a2"], name="conv2", pads=[1] * 4),
              helper.make_node("Sigmoid", ["a2"], ["map"], name="sigmoid")]
    shape = ["N", h, w, 3] if nhwc else ["N", 3, h, w]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("map", TensorProto.FLOAT, None)],
                  [_init("k1", rng.standard_normal((8, 3, 3, 3)) / 3), _init("c1", rng.standard_normal(8) * 0.1),
                   _init("k2", rng.standard_normal((1, 8, 3, 3)) / 4), _init("c2", [-0.5])])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos copied from scikit-image and scikit-learn into a folder (PNG and JPEG)."""
    skimage = pytest.importorskip("skimage")
    sklearn = pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("photos")
    data = Path(skimage.__file__).parent / "data"
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(data / name, folder / name)
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(Path(sklearn.__file__).parent / "datasets" / "images" / name, folder / name)
    return folder


# -- shapes -------------------------------------------------------------------------------------------
def test_free_image_dims_fall_back_to_a_size_the_model_runs_on():
    model = two_path_model()
    session = cpu_session(model)
    with pytest.raises(Exception, match="7 by 6|broadcast"):  # the first candidate, 224, fails
        session.run(None, {"x": np.zeros((1, 3, 224, 224), np.float32)})
    feeds = model_feeds(model, count=2)
    assert [f["x"].shape for f in feeds] == [(1, 3, 256, 256)] * 2
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])  # seeds differ per sample
    assert session.run(None, feeds[0])[0].shape == (1, 3, 8, 8)


def test_no_runnable_shape_is_an_input_error_asking_for_input_shape():
    with pytest.raises(InputError, match=r"runs on none of the synthetic input shapes tried for x \[N, 3, H, W\]"
                                         r".*input_shape=x=1x3xHxW") as e:
        model_feeds(fixed_height_model())
    # the CLI's spelling, with the input's real name and its declared sizes; no made-up 640x640
    assert "give the shape with --input-shape x=1x3xHxW (H, W: the sizes of your data)" in e.value.cli_text()
    assert "640x640" not in e.value.hint
    feeds = model_feeds(fixed_height_model(), overrides=parse_input_shapes(["x=2x3x48x100"]))
    assert feeds[0]["x"].shape == (2, 3, 48, 100)
    with pytest.raises(InputError, match=r"does not run on input_shape=x=2x3x40x100 \(.*broadcast"):
        model_feeds(fixed_height_model(), overrides=parse_input_shapes(["x=2x3x40x100"]))


def declared_height_model(width: int = 100) -> onnx.ModelProto:
    """x[?, 3, 48, ?] (height 48 declared, batch and width unnamed) + a [1, 3, 48, width] bias: runs only at
    that width, none of the image sizes dlopt tries."""
    return _model([helper.make_node("Add", ["x", "bias"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 48, None])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  [_init("bias", np.ones((1, 3, 48, width)))])


def test_the_shape_hint_of_a_48_high_input_names_it_and_keeps_its_height():
    with pytest.raises(InputError) as e:
        model_feeds(declared_height_model(), batch=4)
    hint = e.value.cli_text()
    assert "--input-shape x=4x3x48xW (W: the size of your data), or real data" in hint, hint
    assert "640" not in e.value.hint and "NAME" not in e.value.hint
    # the hint's shape, with the width filled in, is one the model runs on
    shape = hint.split("--input-shape x=")[1].split()[0].replace("W", "100")
    feeds = model_feeds(declared_height_model(), overrides=parse_input_shapes([f"x={shape}"]))
    assert feeds[0]["x"].shape == (4, 3, 48, 100)


def test_named_dims_are_shared_and_overrides_propagate():
    model = _model([helper.make_node("Add", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "T", 8]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "T", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    specs = graph_inputs(model)
    assert resolve_shapes(specs, seq_len=16) == {"a": (1, 16, 8), "b": (1, 16, 8)}
    assert resolve_shapes(specs, overrides={"a": (1, 40, 8)}) == {"a": (1, 40, 8), "b": (1, 40, 8)}


@pytest.mark.parametrize("texts, match", [
    (["x"], "is not NAME=DxDx"), (["x=1x3xax4"], "is not NAME=DxDx"), (["x=0x3"], "is not NAME=DxDx"),
    (["x=1x2", "x=1x3"], "of 'x' given twice"),
])
def test_bad_input_shape_text(texts, match):
    with pytest.raises(InputError, match=match):
        parse_input_shapes(texts)


@pytest.mark.parametrize("text, match", [
    ("y=1x3x64x64", "names 'y', which is not an input"), ("x=1x3x64", "has rank 3"),
    ("x=1x4x64x64", "axis 1 of .* is fixed at 3"),
])
def test_input_shape_must_fit_the_model(text, match):
    with pytest.raises(InputError, match=match):
        model_feeds(two_path_model(), overrides=parse_input_shapes([text]))


# -- values -------------------------------------------------------------------------------------------
def test_integer_inputs_get_the_range_the_graph_reads_them_with():
    model = byte_model()
    assert value_ranges(model) == {"bytes": (0, 257), "ids": (0, 50)}
    feeds = model_feeds(model, count=3)
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    raw = np.concatenate([f["bytes"].ravel() for f in feeds])
    assert ids.max() < 50 and raw.max() <= 256 and raw.max() > 200  # the whole byte range, not token ids < 1000
    hist, _ = cpu_session(model).run(None, feeds[0])
    assert hist.sum() == 16  # every byte value hits the table once


# -- fidelity: one rule -------------------------------------------------------------------------------
def test_cosine_is_per_sample_and_batching_does_not_change_it():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 1, 6, 5))
    out = ref + rng.standard_normal(ref.shape) * np.array([0.1, 0.5, 1.0, 2.0]).reshape(4, 1, 1, 1)
    whole = compare_arrays(out, ref)
    one_by_one = compare_runs([[r[None]] for r in ref], [[o[None]] for o in out], ["m"])["m"]
    expected = [float(np.dot(o.ravel(), r.ravel()) / np.linalg.norm(o) / np.linalg.norm(r)) for o, r in zip(out, ref)]
    assert whole.samples == one_by_one.samples == 4
    assert whole.cosine_mean == pytest.approx(np.mean(expected)) == pytest.approx(one_by_one.cosine_mean)
    assert whole.cosine_min == pytest.approx(min(expected))
    assert whole.sqnr_db == pytest.approx(one_by_one.sqnr_db) == pytest.approx(sqnr_db(out, ref))
    assert whole.max_abs_diff == pytest.approx(np.abs(out - ref).max())
    assert cosine(np.zeros((1, 3)), np.zeros((1, 3))) == 1.0 and cosine(np.ones((1, 3)), np.zeros((1, 3))) == 0.0


def test_top1_agreement_for_class_scores_not_for_embeddings():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((6, 8))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    confident = np.eye(8)[[0, 1, 2, 3, 4, 5]] * 0.999 + 0.001 / 8  # softmax rows: L2 norm ~1, all >= 0
    flipped = confident[[1, 0, 2, 3, 4, 5]]
    assert compare_arrays(embeddings * 1.01, embeddings).top1_agreement is None
    assert compare_arrays(flipped, confident).top1_agreement == pytest.approx(4 / 6)


def test_quantize_report_and_eval_agree_on_the_same_model_and_data(tmp_path):
    """The issue's 0.082 vs 0.209: quantize and eval now compute fidelity with one rule."""
    from dlopt.evaluate import EvalConfig, evaluate_data

    rng = np.random.default_rng(3)
    images = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", image=images)
    onnx.save(conv_map_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--mode", "static", "--per-tensor", "--calibration", str(tmp_path / "cal.npz"),
                                       "--node-forms", "int8",
                                       "--eval-data", str(tmp_path / "cal.npz")])  # fidelity on the same 8 samples
    assert result.exit_code == 0, result.output
    import json

    reported = json.loads((tmp_path / "q.quantize.json").read_text())["fidelity"]
    assert reported["samples"] == 8 and reported["data"] == "eval-data"
    entry = reported["outputs"]["map"]
    evaluated = evaluate_data(tmp_path / "q.onnx", tmp_path / "cal.npz",
                              EvalConfig(metrics=("cosine", "sqnr"), batch_size=3), reference=tmp_path / "m.onnx")
    assert evaluated.value("cosine") == pytest.approx(entry["cosine_mean"], abs=1e-6)
    assert evaluated.value("sqnr") == pytest.approx(entry["sqnr_db"], abs=1e-4)
    assert entry["samples"] == 8 and 0.9 < entry["cosine_mean"] < 1.0 and entry["sqnr_db"] > 15


@pytest.mark.parametrize("given_eval_data", [True, False])
def test_eval_samples_sets_how_many_held_out_samples_the_verdict_reads(tmp_path, given_eval_data):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "cal.npz", image=rng.standard_normal((40, 3, 32, 32)).astype(np.float32))
    onnx.save(conv_map_model(), tmp_path / "m.onnx")
    data = ["--eval-data", str(tmp_path / "cal.npz")] if given_eval_data else []
    reports = {}
    for count in ("5", "12"):
        out = tmp_path / f"q{count}.onnx"
        result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(out), "--mode", "static",
                                           "--per-tensor", "--node-forms", "int8", "--calibration",
                                           str(tmp_path / "cal.npz"), "--eval-samples", count, *data])
        assert result.exit_code == 0, result.output
        reports[count] = json.loads(out.with_suffix(".quantize.json").read_text())
    for count, report in reports.items():
        assert report["fidelity"]["samples"] == int(count)
        if not given_eval_data:  # the last N of the 40 calibration samples, not calibrated on
            assert report["holdout"]["held_out_indices"] == list(range(40 - int(count), 40))
    bad = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b.onnx"),
                                    "--eval-samples", "0"])
    assert bad.exit_code == 2 and "--eval-samples" in bad.output


# -- --input-shape through the verbs ------------------------------------------------------------------
def test_quantize_input_shape_cli_and_api(tmp_path):
    from dlopt.optimize.quantize import QuantizeConfig, quantize

    onnx.save(fixed_height_model(), tmp_path / "m.onnx")
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--precision", "fp16"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 2 and "--input-shape" in failed.output and "x [N, 3, H, W]" in failed.output
    assert "Traceback" not in failed.output
    ok = CliRunner().invoke(main, [*args, "--input-shape", "x=1x3x48x20"])
    assert ok.exit_code == 0, ok.output
    api = quantize(fixed_height_model(), QuantizeConfig(precision="fp16", input_shapes=("x=2x3x48x7",)))
    assert api.report["fidelity"]["input_shapes"] == {"x": [2, 3, 48, 7]}
    bad = CliRunner().invoke(main, [*args, "--input-shape", "x=1x3x48"])
    assert bad.exit_code == 2 and "has rank 3" in bad.output


def test_bench_input_shape_and_runnable_default(tmp_path):
    from dlopt.bench import BenchConfig, benchmark

    onnx.save(two_path_model(), tmp_path / "m.onnx")
    result = benchmark([tmp_path / "m.onnx"], BenchConfig(rounds=3, min_rounds=2, budget_s=5))
    assert dict(result.batches[0].input_shapes) == {"x": (1, 3, 256, 256)}
    shaped = benchmark([tmp_path / "m.onnx"], BenchConfig(rounds=3, min_rounds=2, input_shapes=("x=1x3x128x192",)))
    assert dict(shaped.batches[0].input_shapes) == {"x": (1, 3, 128, 192)}
    cli = CliRunner().invoke(main, ["bench", str(tmp_path / "m.onnx"), "--rounds", "3", "--no-progress",
                                    "--input-shape", "x=1x3x100x64"])
    assert cli.exit_code == 2 and "does not run on --input-shape x=1x3x100x64 (Add node" in cli.output


# -- images -------------------------------------------------------------------------------------------
def test_image_preprocessing_formula(tmp_path):
    from PIL import Image

    from dlopt.images import ImagePreprocess, image_target, load_image

    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    config = ImagePreprocess(size=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr=True)
    target = image_target(conv_map_model(free_hw=True), config, "test")
    assert (target.layout, target.size, target.channels) == ("nchw", (2, 2), 3)
    got = load_image(tmp_path / "p.png", target, config)
    expected = ((pixels[..., ::-1].astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    nhwc = image_target(conv_map_model(nhwc=True, free_hw=True), ImagePreprocess(size=(2, 2)), "test")
    assert nhwc.layout == "nhwc"
    np.testing.assert_allclose(load_image(tmp_path / "p.png", nhwc, ImagePreprocess()), pixels[None] / 255.0,
                               atol=1e-6)


def test_image_folder_calibration_quantizes_a_cnn(tmp_path, photos):
    import json

    onnx.save(conv_map_model(), tmp_path / "m.onnx")
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--mode", "static",
            "--calibration", str(photos), "--image-mean", "0.5,0.5,0.5", "--image-std", "0.5", "--node-forms", "int8",
            "--metric", "sqnr"]  # a random conv's sigmoid map: judged by its SQNR, not as a text map
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.quantize.json").read_text())
    images = report["calibration"]["images"]
    assert report["calibration"]["samples"] == 6
    assert (images["input"], images["layout"], images["size"], images["channels"]) == ("image", "nchw", [32, 32], 3)
    assert images["preprocess"]["fields"]["mean"] == [0.5, 0.5, 0.5]
    # the last 3 photos are held out: calibrated on 3, fidelity measured on the other 3
    assert report["fidelity"]["data"] == "held-out" and report["fidelity"]["samples"] == 3
    assert report["holdout"]["held_out_indices"] == [3, 4, 5] and report["holdout"]["calibration_samples"] == 3
    assert report["fidelity"]["outputs"]["map"]["sqnr_db"] >= 20
    assert any(k.startswith("QDQ:Conv") or k == "QLinearConv" for k in report["quantized_nodes"])


@pytest.mark.parametrize("model, extra, match", [
    (conv_map_model(free_hw=True), [], "free height/width.*--image-size"),
    (conv_map_model(), ["--image-size", "64x64"], "does not fit input 'image'"),
    (conv_map_model(), ["--image-std", "0,1,1"], "has a zero"),
    (conv_map_model(), ["--image-layout", "chw"], "unknown image layout"),
    (byte_model(), [], "with one input"),
])
def test_image_calibration_errors(tmp_path, photos, model, extra, match):
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--mode", "static", "--calibration", str(photos), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    import re

    assert re.search(match, result.output, re.S), result.output


def test_unreadable_image_names_the_file(tmp_path, photos):
    folder = tmp_path / "imgs"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    onnx.save(conv_map_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--mode", "static", "--calibration", str(folder)])
    assert result.exit_code == 2 and "broken.jpg cannot be read" in result.output
    assert not (tmp_path / "q.onnx").exists()


def test_package_records_an_image_folder_read_for_the_models_input(tmp_path, photos):
    import json

    onnx.save(conv_map_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["package", str(tmp_path / "m.onnx"), "--target", "cpu", "-o",
                                       str(tmp_path / "bundle"), "--calibration", str(photos), "--measure", "0"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["calibration"]
    assert record["samples"] == 6 and record["files"] == 6 and len(record["sha256"]) == 64
