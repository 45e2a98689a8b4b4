"""Streamed calibration: each sample folded into ORT's own collectors before the next is read."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sized
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.data import Feeds, progress_bar
from dlopt.errors import InputError
from dlopt.optimize.quantize.schemes import Method
from dlopt.quiet import quiet_libraries


# -- calibration (streamed) ---------------------------------------------------------------------------
def ort_quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[name]


def ort_calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]


class _OneSample:
    """An ORT CalibrationDataReader over exactly one sample."""

    def __init__(self, feeds: Feeds):
        self._feeds: Feeds | None = feeds

    def get_next(self):
        feeds, self._feeds = self._feeds, None
        return feeds


def calibrate(
    model,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    method: Method = "minmax",
    op_types: Iterable[str] | None = None,
    symmetric: bool = False,
    percentile: float = 99.999,
    progress: bool = False,
):
    """Activation ranges of `model` over `data`, as ORT's TensorsData, one sample in memory at a time."""
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator

    extra: dict[str, Any] = {"symmetric": symmetric}
    if method == "percentile":
        extra.update(percentile=percentile, num_bins=2048)
    elif method == "entropy":
        # ORT's KL search is pure-Python loops, O(bins^2): 512 bins cost ~4.5 s per tensor, 256 ~0.7 s
        extra.update(num_bins=256, num_quantized_bins=128)
    total = len(data) if isinstance(data, Sized) else None
    with tempfile.TemporaryDirectory(prefix="dlopt-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 1)
        # ORT's histogram collectors print to stdout on every call; dlopt keeps stdout for results
        with quiet_libraries():
            calibrator = create_calibrator(
                path,
                list(op_types) if op_types else None,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=ort_calibration_method(method),
                extra_options=extra,
            )
            count = 0
            with progress_bar(total, f"calibrating ({method})", progress) as advance:
                for feeds in data:
                    calibrator.collect_data(_OneSample(dict(feeds)))
                    count += 1
                    advance()
            if count == 0:
                raise InputError("calibration data holds no samples", "give at least one sample")
            ranges = calibrator.compute_data()
    for name in ranges:
        bounds = getattr(ranges[name], "range_value", None)
        if bounds is not None and not np.isfinite(np.asarray(bounds, dtype=np.float64)).all():
            source = getattr(data, "source", "the calibration data")
            raise InputError(
                f"the model's tensor {name!r} is NaN or infinite on the calibration data {source}",
                "check the model and the data; keep the node that makes it in float "
                "({exclude_nodes=NAMES}) or use {mode=dynamic}",
            )
    return ranges, count
