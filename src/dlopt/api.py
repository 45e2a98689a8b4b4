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
    from dlopt.optimize.export import ExportConfig, ModelSource, export, load_source

    config = config or ExportConfig()
    out = check_output_path(output)  # fail before minutes of work, not after
    report_path = check_output_path(report_path_for(out, "export"))
    if not isinstance(source, ModelSource):
        guard_outputs([guard_source_spec(source)], [out, report_path])
        log(f"loading {source}")
        source = load_source(source)
    exporter = config.exporter or source.exporter or "dynamo"
    why = "" if config.exporter or not source.exporter else " (the model's preferred exporter)"
    log(f"exporting {source.name} with the {exporter} exporter{why}, opset {config.opset}")
    result = export(source, config, log=log)
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = result.report | {"output": str(out), "bytes": model_tmp.stat().st_size}
        outputs.stage(report_path).write_text(json_text(report))
    return WrittenModel(out, report_path, report)


def quantize_model(model_path: str | os.PathLike, output: str | os.PathLike, config=None, calibration=None, *,
                   eval_data=None, log: Callable[[str], None] = lambda message: None):
    """Quantize MODEL.onnx to `output` (INT8/INT4/FP16 per config, a QuantizeConfig); writes the model
    and `NAME.quantize.json` atomically. See dlopt.optimize.quantize.quantize_file."""
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file

    return quantize_file(model_path, output, config or QuantizeConfig(), calibration, eval_data=eval_data, log=log)


__all__ = ["WrittenModel", "export_model", "quantize_model", "report_path_for"]


def optimize_model(model: str, output: str | os.PathLike, config=None, *, executor: str = "local",
                   address: str | None = None, workers: int | None = None, cache_dir: str | os.PathLike | None = None,
                   report_path: str | os.PathLike | None = None, log: Callable[[str], None] = lambda message: None):
    """Search candidate recipes for MODEL (a reference model name, a torch source, or an .onnx) on
    config.target (an OptimizeConfig), write the best candidate within the accuracy budget as a
    verified bundle at `output` and, with `report_path`, a self-contained HTML report. Candidate
    transforms and scoring run on `executor` ("local" process pool or "ray"); every stage output and
    evaluation is cached in the stage cache (`cache_dir`, else $DLOPT_CACHE_DIR, else the default).
    Returns dlopt.search.OptimizeResult (its `result` dict follows schemas/optimize.schema.json)."""
    from dlopt.executor import make_executor
    from dlopt.search import OptimizeConfig, optimize
    from dlopt.stagecache import StageCache, default_cache_dir

    cache = StageCache(cache_dir or default_cache_dir())
    runner = make_executor(executor, address=address, workers=workers)
    try:
        return optimize(model, output, config or OptimizeConfig(), executor=runner, cache=cache,
                        report_path=report_path, log=log)
    finally:
        runner.close()


__all__ += ["optimize_model"]
