"""The public Python API: everything the CLI does, as functions. The CLI only parses and prints."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.fileio import check_output_path, guard_outputs, guard_source_spec, json_text, stage_onnx, staged_outputs


@dataclass(frozen=True)
class WrittenModel:
    model_path: Path
    report_path: Path
    report: dict[str, Any]


def report_path_for(model_path: str | os.PathLike, stage: str) -> Path:
    """Where a stage's JSON report goes: beside the model, `NAME.<stage>.json`."""
    path = Path(model_path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.{stage}.json")


def export_model(source, output: str | os.PathLike, config=None,
                 log: Callable[[str], None] = lambda message: None) -> WrittenModel:
    """Export SOURCE (a reference model name, "file.py:build", "pkg.module:build" or a ModelSource) to
    ONNX at `output`, verified against torch; writes the model and its JSON report atomically.

    Raises VerificationError (and writes nothing) when outputs differ, unless config.allow_mismatch."""
    from dlopt.optimize.export import STAGE, Export, ModelSource, load_source
    from dlopt.stage import StageContext

    config = config or Export()
    out = check_output_path(output)  # fail before minutes of work, not after
    report_path = check_output_path(report_path_for(out, "export"))
    if not isinstance(source, ModelSource):
        guard_outputs([guard_source_spec(source)], [out, report_path])
        log(f"loading {source}")
        source = load_source(source)
    exporter = config.exporter or source.exporter or "dynamo"
    why = "" if config.exporter or not source.exporter else " (the model's preferred exporter)"
    log(f"exporting {source.name} with the {exporter} exporter{why}, opset {config.opset}")
    result = STAGE.apply(source, config, StageContext(log=log))
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = result.report | {"output": str(out), "bytes": model_tmp.stat().st_size}
        outputs.stage(report_path).write_text(json_text(report))
    return WrittenModel(out, report_path, report)


def quantize_model(model_path: str | os.PathLike, output: str | os.PathLike, config=None, calibration=None, *,
                   eval_data=None, after: tuple[str, ...] = (), log: Callable[[str], None] = lambda message: None):
    """Quantize MODEL.onnx to `output` with a scheme config (Int8Dynamic, Int8Static, Int8WeightOnly,
    Int4WeightOnly, Fp16 from dlopt.optimize.quantize) or a QuantizeConfig request (precision, mode auto:
    the scheme is chosen for the model, target and CPU, and recorded in the report); writes the model
    and `NAME.quantize.json` atomically. `after`: the stages that made MODEL, named in errors. See
    dlopt.optimize.quantize.quantize_file."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    return quantize_file(model_path, output, config or QuantizeConfig(), calibration, eval_data=eval_data,
                         after=after, log=log)


__all__ = ["WrittenModel", "export_model", "quantize_model", "report_path_for"]
