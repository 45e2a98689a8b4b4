"""ExecuTorch programs in a mobile bundle (--torch-source): the torch source loaded, lowered to .pte
with dlopt.optimize.pt2e (lower_to_pte) for each
precision, calibrated and checked against the ONNX model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.package.checks import load_calibration, output_checks
from dlopt.package.config import Log, PackageConfig


def load_torch_source(config: PackageConfig):
    """The torch source of --torch-source, loaded (ExecuTorch required)."""
    from dlopt.targets.xnnpack import require_executorch

    require_executorch()
    from dlopt.sources import load_source

    if config.torch_source is None:
        raise ValueError("the package config names no torch source to lower")
    return load_source(config.torch_source)


def build_pte(source, staging: Path, config: PackageConfig, feeds_list, expected, log: Log, model_path: Path):
    """Lower `source` to a .pte per precision in `staging`, each checked against `expected`:
    (artifacts, checks, programs)."""
    from dlopt.optimize.pt2e import lower_to_pte
    from dlopt.targets.xnnpack import PteProgram

    artifacts, checks, programs = [], [], []
    input_names = list(feeds_list[0])
    calibration = _pte_calibration(source, config, feeds_list, model_path)
    for precision in config.pte_precisions:
        file_name = f"model.xnnpack-{precision}.pte"
        log(f"lowering {source.name} to ExecuTorch ({precision}, XNNPACK backend)")
        started = time.perf_counter()
        lowering: dict[str, Any] = {}
        # int8-dynamic quantizes the linear layers only, activations per run: transformers, whose
        # static per-tensor activations measured -1.4 dB on MiniLM (25.8 dB dynamic)
        data = lower_to_pte(
            source.module,
            feeds_list[0],
            input_names=input_names,
            precision="fp32" if precision == "fp32" else "int8",
            calibration=calibration if precision == "int8" else None,
            int8_activations="dynamic" if precision == "int8-dynamic" else "static",
            weight_rounding=config.pte_weight_rounding,
            bias_correction=config.pte_bias_correction,
            report=lowering,
        )
        lower_s = time.perf_counter() - started
        (staging / file_name).write_bytes(data)
        # one thread: the latency is compared with ORT's on one thread (see bundle_latency)
        program = PteProgram(staging / file_name, input_names, threads=1)
        got = [program.run(feeds) for feeds in feeds_list]
        output_names = list(expected[0])
        got_named = [dict(zip(output_names, outs)) for outs in got]
        floor = config.pte_fp32_min_sqnr_db if precision == "fp32" else config.pte_int8_min_sqnr_db
        checks += output_checks(file_name, got_named, expected, {"min_sqnr_db": floor})
        artifacts.append(
            {
                "file": file_name,
                "runtime": f"executorch {_executorch_version()}",
                "backend": "xnnpack",
                "precision": precision,
                "input_names": input_names,
                "torch_source": config.torch_source,
                "lower_s": round(lower_s, 2),
                "calibration_samples": len(calibration) if precision == "int8" else None,
                "weight_rounding": config.pte_weight_rounding if precision == "int8" else None,
                "bias_correction": config.pte_bias_correction if precision == "int8" else None,
                "weight_refinement": lowering.get("weight_refinement"),
            }
        )
        programs.append((f"xnnpack-{precision}", program))
    return artifacts, checks, programs


def _pte_calibration(source, config: PackageConfig, feeds_list, model_path: Path) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for an int8 .pte: --calibration if given, else the reference model's own set
    (at the samples' shapes where it has a sequence axis), else the samples."""
    if "int8" not in config.pte_precisions:
        return []
    from dlopt.models import REFERENCE_MODELS

    shapes = {k: v.shape for k, v in feeds_list[0].items()}
    spec = config.calibration or (f"model:{config.torch_source}" if config.torch_source in REFERENCE_MODELS else None)
    if spec is None:
        return [dict(f) for f in feeds_list]
    feeds = []
    for sample in load_calibration(spec, model_path, limit=config.pte_calibration_samples):
        fitted = _fit_to_shapes(sample, shapes)
        if fitted is not None:
            feeds.append(fitted)
    return feeds or [dict(f) for f in feeds_list]


def _fit_to_shapes(sample: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]):
    """A calibration sample cut or padded (with the last value: a pad token, a zero mask) to the
    .pte's static shapes; None when it cannot be made to fit (another rank, or missing inputs)."""
    fitted = {}
    for name, shape in shapes.items():
        if name not in sample or np.ndim(sample[name]) != len(shape):
            return None
        value = np.asarray(sample[name])
        for axis, size in enumerate(shape):
            if value.shape[axis] > size:
                value = np.take(value, range(size), axis=axis)
            elif value.shape[axis] < size:
                pad = [(0, 0)] * value.ndim
                pad[axis] = (0, size - value.shape[axis])
                value = np.pad(value, pad, mode="constant")
        fitted[name] = np.ascontiguousarray(value)
    return fitted


def _executorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        return "unknown"
