"""Calibration data sources, their checks against the model, and streaming statistics."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.errors import InputError
from dlopt.data import CalibrationData
from dlopt.data import load_data
from dlopt.optimize.quantize import calibrate


def two_input_model() -> onnx.ModelProto:
    """ids int64 [batch, seq], x float [batch, seq, 8] -> MatMul(x, w) + Cast(ids)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["idf", "axes"], ["idu"]),
             helper.make_node("Add", ["h", "idu"], ["y"], name="add")]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "k")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "k"], ["y"], name="conv")], "img",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_npz_samples_are_split_on_the_first_axis_and_reiterable(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (5, 6))
    x = rng.standard_normal((5, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", ids=ids, x=x)
    data = load_data(tmp_path / "c.npz", two_input_model())
    samples = list(data)
    assert len(data) == 5 and len(samples) == 5
    assert samples[2]["x"].shape == (1, 6, 8) and np.array_equal(samples[2]["ids"], ids[2:3])
    again = list(data)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(samples, again))
    assert len(load_data(tmp_path / "c.npz", two_input_model(), limit=3)) == 3
    assert len(list(load_data(tmp_path / "c.npz", two_input_model(), limit=3))) == 3


def test_folder_of_npz_with_varying_lengths_and_folder_of_npy(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "var"
    folder.mkdir()
    for i, length in enumerate((3, 9, 5)):
        np.savez(folder / f"{i:03d}.npz", ids=rng.integers(0, 9, (1, length)),
                 x=rng.standard_normal((1, length, 8)).astype(np.float32))
    data = load_data(folder, two_input_model())
    assert [f["x"].shape[1] for f in data] == [3, 9, 5]
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    np.save(npy / "b.npy", rng.standard_normal((3, 3, 8, 8)).astype(np.float32))
    images = load_data(npy, image_model())
    assert [f["image"].shape for f in images] == [(1, 3, 8, 8)] * 5


def test_integer_arrays_are_cast_to_the_input_type(tmp_path):
    np.savez(tmp_path / "c.npz", ids=np.ones((2, 4), np.int32), x=np.ones((2, 4, 8), np.float64))
    sample = next(iter(load_data(tmp_path / "c.npz", two_input_model())))
    assert sample["ids"].dtype == np.int64 and sample["x"].dtype == np.float32


def _write(tmp_path, name, **arrays):
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


BAD = [
    (lambda d: _write(d, "n.npz", ids=np.ones((2, 4), np.int64)), two_input_model,
     r"missing \['x'\], unknown \[\]"),
    (lambda d: _write(d, "u.npz", ids=np.ones((2, 4), np.int64), x=np.ones((2, 4, 8), np.float32),
                      extra=np.ones((2, 1))), two_input_model, r"unknown \['extra'\]"),
    (lambda d: _write(d, "r.npz", ids=np.ones((2, 4), np.int64), x=np.ones((2, 8), np.float32)), two_input_model,
     "'x' has shape \\[1, 8\\], the model expects rank 3"),
    (lambda d: _write(d, "s.npz", ids=np.ones((2, 4), np.int64), x=np.ones((2, 4, 5), np.float32)),
     two_input_model, "axis 2 must be 8"),
    (lambda d: _write(d, "c.npz", ids=np.ones((3, 4), np.int64), x=np.ones((2, 4, 8), np.float32)),
     two_input_model, "different sample counts"),
    (lambda d: _write(d, "t.npz", ids=np.ones((2, 4), np.float32), x=np.ones((2, 4, 8), np.float32)),
     two_input_model, "'ids' is float32, the model expects int64"),
    (lambda d: d / "missing.npz", two_input_model, "does not exist"),
    (lambda d: (d / "bad.npz").write_bytes(b"garbage") and d / "bad.npz", two_input_model, "not a readable .npz"),
    (lambda d: (d / "empty").mkdir() or d / "empty", two_input_model, "holds no .npz, .npy or image files"),
    (lambda d: (d / "one").mkdir() or np.save(d / "one" / "a.npy", np.ones((2, 4))) or d / "one", two_input_model,
     "model has 2 inputs"),
    (lambda d: "model:no-such-model", two_input_model, "unknown reference model 'no-such-model'"),
]


@pytest.mark.parametrize("make, model, message", BAD)
def test_bad_calibration_data(tmp_path, make, model, message):
    with pytest.raises(InputError, match=message):
        load_data(make(tmp_path), model())


def _peak_python_bytes(n: int, method: str) -> int:
    model = two_input_model()
    rng = np.random.default_rng(0)
    feeds = ({"ids": rng.integers(0, 9, (1, 256)), "x": rng.standard_normal((1, 256, 8)).astype(np.float32)}
             for _ in range(n))  # ~16 KB of activations per sample: 5 MB for 300 if they were kept
    data = CalibrationData(lambda: feeds, source="generated", count=n)
    tracemalloc.start()
    try:
        calibrate(model, data, method=method)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_memory_does_not_grow_with_the_sample_count(method):
    # ORT's calibrators hold every sample's activations; streamed, 10x the samples costs about the same
    _peak_python_bytes(2, method)  # first use imports and caches; not what is measured
    small, large = _peak_python_bytes(30, method), _peak_python_bytes(300, method)
    assert large < 1.3 * small, (small, large)


def test_calibration_ranges_cover_every_sample():
    model = two_input_model()
    feeds = [{"ids": np.zeros((1, n), np.int64), "x": np.full((1, n, 8), float(n), np.float32)} for n in (2, 7, 4)]
    ranges, count = calibrate(model, CalibrationData.from_feeds(feeds), method="minmax")
    assert count == 3
    low, high = ranges["x"].range_value
    assert np.asarray(low).item() == pytest.approx(2.0) and np.asarray(high).item() == pytest.approx(7.0)
