"""quantize_file: a model file in, the quantized model and its JSON report out (atomically); a result
below its floor is kept under a marked name, never at the output path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlopt.data import CalibrationData, DataSpec
from dlopt.errors import InputError, VerificationError
from dlopt.optimize.quantize.heldout import fidelity_sample_count
from dlopt.optimize.quantize.schemes import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, SCHEME_KINDS, QuantizeConfig, Scheme
from dlopt.stage import Artifact, Stage, StageContext, StageInput, get_stage


# -- files ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeOutcome:
    model_path: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_met(self) -> bool:
        budget = self.report.get("budget")
        return budget is None or bool(budget["met"])

    @property
    def passed(self) -> bool:
        """The fidelity floor held on the held-out samples and the budget, if any, was met."""
        return bool(self.report["verdict"]["passed"])


def failed_path(output: Path) -> Path:
    """Where a result below its floor is kept: OUT.failed.onnx beside OUT, never OUT itself."""
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.failed.onnx")


def stage_of(config: Scheme | QuantizeConfig) -> Stage:
    """The registered stage of a scheme config or of the QuantizeConfig front door (found by kind in
    dlopt.stage's registry: the stages module imports this one)."""
    kind = "quantize" if type(config) is QuantizeConfig else SCHEME_KINDS.get(type(config))
    if kind is None:
        raise InputError(
            f"quantize takes a scheme config or a QuantizeConfig, not {type(config).__name__}",
            f"use one of {', '.join(c.__name__ for c in (QuantizeConfig, *SCHEME_KINDS))}",
        )
    return get_stage(kind)


def quantize_file(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    config: Scheme | QuantizeConfig = QuantizeConfig(),
    calibration: str | os.PathLike | DataSpec | CalibrationData | None = None,
    *,
    eval_data: str | os.PathLike | DataSpec | CalibrationData | None = None,
    progress: bool = False,
    after: tuple[str, ...] = (),
    log=lambda message: None,
) -> QuantizeOutcome:
    """Quantize MODEL.onnx to OUTPUT (atomically) and write the JSON report beside it,
    `OUTPUT-stem.quantize.json`. `eval_data` (same formats as `calibration`) is where fidelity is
    measured; without it, the last samples of `calibration` are held out for that. Both are read by
    dlopt.data (a source text, or a DataSpec with its layout, values and image pre-processing); the
    report records the specs (`data_spec`).

    A result that fails its verdict (an output below the fidelity floor, a budget not met) is not
    written to OUTPUT: it is kept as OUTPUT-stem.failed.onnx with OUTPUT-stem.failed.quantize.json,
    and the outcome says so (`passed` False); the CLI then exits 1. `after`: the kinds of the stages
    that made MODEL (a recipe's), named in errors."""
    from dlopt.data import as_spec, load_data
    from dlopt.fileio import (
        check_output_path,
        guard_outputs,
        json_text,
        load_onnx,
        report_path_for,
        stage_onnx,
        staged_outputs,
    )
    from dlopt.tables import environment

    stage = stage_of(config)
    stage.check_config(config)
    src, out = Path(model_path), check_output_path(output)
    report_path = check_output_path(report_path_for(out, "quantize"))
    failed = failed_path(out)
    failed_report = report_path_for(failed, "quantize")

    def named_path(spec):  # the data's file or folder, or a reader's .py file: never written over
        spec = None if isinstance(spec, CalibrationData) else as_spec(spec)
        if spec is None or not (spec.is_path or (spec.is_reader and ".py:" in spec.source)):
            return None
        return spec.source.rpartition(":")[0] if spec.is_reader else spec.source

    guard_outputs([src, named_path(calibration), named_path(eval_data)], [out, report_path, failed, failed_report])
    model = load_onnx(src)
    data = load_data(calibration, model, limit=config.calibration_samples, image=config.image)
    held = (
        load_data(eval_data, model, limit=fidelity_sample_count(model, config), image=config.image)
        if eval_data is not None
        else None
    )
    specs = {role: d.spec.record() for role, d in (("calibration", data), ("eval_data", held)) if d is not None}
    context = StageContext(data=data, eval_data=held, after=after, progress=progress, log=log)
    result = stage.apply(model, config, context)
    if not result.report["verdict"]["passed"]:  # kept under a marked name, never at OUTPUT
        out, report_path = failed, failed_report
    # The model and its report are renamed into place together: never a new model beside an old report.
    with staged_outputs() as outputs:
        model_tmp = stage_onnx(result.model, out, outputs)
        report = {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "input": str(src),
            "output": str(out),
            "calibration": data.describe() if data else None,
            "data_spec": specs or None,
            **result.report,
            "bytes_written": model_tmp.stat().st_size,
            "environment": environment(),
        }
        outputs.stage(report_path).write_text(json_text(report))
    return QuantizeOutcome(out, report_path, report)


def keep_failed(outcome: QuantizeOutcome, out: Path) -> QuantizeOutcome:
    """Copy a failed result's model and report out of its staging folder (dlopt run's cache) to OUT.failed.onnx."""
    import dataclasses
    import shutil

    from dlopt.fileio import report_path_for, staged_outputs

    kept = failed_path(out)
    with staged_outputs() as outputs:
        shutil.copyfile(outcome.model_path, outputs.stage(kept))
        shutil.copyfile(outcome.report_path, outputs.stage(report_path_for(kept, "quantize")))
    return dataclasses.replace(outcome, model_path=kept, report_path=report_path_for(kept, "quantize"))


def write_quantized(given: StageInput, config: Scheme | QuantizeConfig, context: StageContext) -> Artifact:
    """The stage before's model quantized as OUTPUT/model.onnx with its report (quantize_file). A result that
    fails its verdict is kept beside `given.keep_failed` (as `dlopt quantize` keeps it; never cached) and
    raised as quantize_failure's VerificationError."""

    outcome = quantize_file(
        given.input_path(),
        context.folder() / "model.onnx",
        config,
        given.calibration,
        eval_data=given.eval_data,
        after=context.after,
        log=context.log,
    )
    if not outcome.passed:
        raise quantize_failure(keep_failed(outcome, given.keep_failed) if given.keep_failed is not None else outcome)
    return Artifact.of(outcome.model_path, outcome.report)


def quantize_failure(outcome: QuantizeOutcome) -> VerificationError:
    """The error the CLI raises for an outcome that did not pass (exit 1)."""
    v = outcome.report["verdict"]
    checks = "; ".join(f"{f['check']} {_fmt(f['measured'])} (needs {f['required']})" for f in v["failures"])
    # On generated inputs a model can fail a floor it meets on real data (PP-OCRv4 det, weight-only INT8:
    # -4.8 dB on noise images, 24.8 dB on held-out photos), so then the first thing to do is give real samples.
    hint = (
        "measured on generated inputs, not real data: give real samples with {eval_data=DATA} (or "
        "{calibration=DATA}), then "
        if v["data"] == "synthetic"
        else ""
    )
    return VerificationError(
        f"the quantized model failed verification on {v['samples']} {v['data']} samples: {checks}; "
        f"the best effort was kept as {outcome.model_path}, nothing was written to the output path",
        hint + "keep nodes in float ({exclude_nodes=NAMES} / {exclude_ops=TYPES}), use per-channel weights, give "
        "more or more representative {calibration=DATA}, or lower the fidelity floor (min SQNR) knowingly",
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
