"""Decoder LMs as recipe stages: `export-lm` (a torch source -> an exported LM folder) and `int4-lm` (an
LM folder -> its 4-bit, mixed 4/8-bit folder), so that `dlopt run` and `dlopt optimize` chain, cache and
record them like any stage. Adapters only: the work is dlopt.optimize.export_lm.export_text_generation and
dlopt.optimize.quantize_lm.quantize_lm_folder, as `dlopt export --task text-generation` and
`dlopt quantize LM --precision int4` run them.

An LM artifact is a folder (ArtifactKind "lm": genai_config.json, model.onnx + model.onnx.data, the
tokenizer files and the stage's JSON report), hashed as a folder by dlopt.manifest.artifact_hash.

    [[stage]]
    kind = "export-lm"       # ExportLm's keys (decode_steps, atol, rtol); source: smollm2 or an HF folder
    [[stage]]
    kind = "int4-lm"         # QuantizeLm's keys (algorithm, block_size, max_size_mb, ...); the recipe's
    #                          calibration is its text, and its eval_data, when given, the held-out text
    #                          whose perplexity against the stage's input (FP32) is in the report
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlopt.errors import InputError
from dlopt.optimize.export_lm import ExportLm, export_text_generation
from dlopt.optimize.quantize_lm import REPORT_NAME, QuantizeLm, check_config, quantize_lm_folder
from dlopt.stage import Artifact, Check, StageContext, StageInput, StageResult, register_stage

EXPORT_REPORT = "export.json"


def _text_path(spec: Any, role: str) -> str | None:
    """A text source as a path: a file (or a dlopt.data.DataSpec naming one), or model:NAME, a reference
    LM's own text for `role` (smollm2: lee_background.cor, calibration after the held-out tokens); None
    when not given."""
    if spec is None:
        return None
    source = spec if isinstance(spec, str) else getattr(spec, "source", None)
    if isinstance(source, str) and source.startswith("model:"):
        from dlopt.models import get_reference_model

        return str(get_reference_model(source.split(":")[1]).text_file(role))
    if not isinstance(source, str):
        raise InputError(
            f"the LM stages read {role} as a UTF-8 text file, not {spec}",
            f'give {role} = "TEXT.txt" in the recipe (plain text like the model\'s inputs)',
        )
    return source


def _lm_folder_problem(folder, config, before) -> str | None:
    from dlopt.lm import is_lm_folder

    path = Path(folder) if isinstance(folder, (str, Path)) else None
    if path is None:
        return f"got a {type(folder).__name__}, not an LM folder"
    return None if is_lm_folder(path) else f"{path} is not an exported LM folder (genai_config.json, model.onnx)"


def _source_problem(source, config, before) -> str | None:
    return None if isinstance(source, (str, Path)) else f"got a {type(source).__name__}, not smollm2 or a folder"


@contextlib.contextmanager
def _own_files(folder: Path, near: Path) -> Iterator[Path]:
    """`folder`, or a copy of it when its files are hard links (dlopt run's private view of the cache):
    onnx.load refuses external data with several links ("a potential hardlink attack"). The copy lies in a
    hidden folder beside `near` (the cache: a dead process's is swept) and is removed afterwards."""
    if not any(p.is_file() and p.stat().st_nlink > 1 for p in folder.iterdir()):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=".lm-input-", dir=near) as work:
        copy = Path(work) / folder.name
        shutil.copytree(folder, copy)
        yield copy


# -- export-lm -----------------------------------------------------------------------------------------


def _validate_export(config: ExportLm) -> None:
    if config.precision != "fp32":
        raise InputError(
            f"export-lm writes fp32, not {config.precision!r}", 'quantize it in a later [[stage]] kind = "int4-lm"'
        )
    if config.decode_steps < 1:
        raise InputError(f"decode_steps must be at least 1, got {config.decode_steps}", "e.g. 8")


def _write_export(given: StageInput, config: ExportLm, context: StageContext) -> Artifact:
    """The recipe's source (smollm2 or a Hugging Face causal-LM folder) as the LM folder OUTPUT/lm."""

    result = export_lm_stage.apply(
        given.source, config, StageContext(output=context.folder() / "lm", after=context.after, log=context.log)
    )
    folder = Path(result.model)
    return Artifact.of(folder, result.report)


@register_stage(
    kind="export-lm",
    config=ExportLm,
    takes="torch",
    makes="lm",
    writer=_write_export,
    requires=(Check("smollm2 or a Hugging Face causal-LM folder", _source_problem),),
    ensures=(Check("an exported LM folder", _lm_folder_problem),),
    summary="a KV-cache decoder for onnxruntime-genai, verified against transformers",
    validate=_validate_export,
)
def export_lm_stage(source: str, config: ExportLm, context: StageContext) -> StageResult:
    exported = export_text_generation(source, context.folder(), config, log=context.log)
    report = exported.report
    return StageResult(exported.folder, {**report, "verification": {"passed": report["verification"]["passed"]}})


# -- int4-lm -------------------------------------------------------------------------------------------


def _write_int4(given: StageInput, config: QuantizeLm, context: StageContext) -> Artifact:
    """The stage before's LM folder at 4 bits (mixed 4/8 under max_size_mb) as OUTPUT/lm; the recipe's
    calibration is the text it calibrates on, its eval_data the held-out text it is scored on."""

    with _own_files(given.input_path(), context.folder().parent) as source:
        result = int4_lm_stage.apply(
            source,
            config,
            StageContext(
                data=_text_path(given.calibration, "calibration"),
                eval_data=_text_path(given.eval_data, "eval_data"),
                output=context.folder() / "lm",
                after=context.after,
                log=context.log,
            ),
        )
    folder = Path(result.model)
    return Artifact.of(folder, result.report)


@register_stage(
    kind="int4-lm",
    config=QuantizeLm,
    takes="lm",
    makes="lm",
    writer=_write_int4,
    requires=(Check("an exported LM folder", _lm_folder_problem),),
    ensures=(Check("an exported LM folder", _lm_folder_problem),),
    summary="4-bit weights (GPTQ or RTN, mixed 4/8-bit by measured perplexity effect) of an LM folder",
    validate=check_config,
    reads=("calibration", "eval_data"),  # the text it calibrates on, the held-out text it is scored on
)
def int4_lm_stage(folder: Path, config: QuantizeLm, context: StageContext) -> StageResult:
    from dlopt.lm import heldout_fidelity

    out = context.folder()
    report = quantize_lm_folder(folder, out, config, context.data, log=context.log)
    if context.eval_data is not None:
        # perplexity on text never calibrated on, against this stage's own input: what the recipe promises
        found = heldout_fidelity(out, folder, context.eval_data)
        report["held_out"] = {**found, "text": str(context.eval_data)}
        context.log(
            f"held-out text ({found['tokens']} tokens): perplexity {found['perplexity']:.3f} vs its input's "
            f"{found['fp32_perplexity']:.3f} ({(found['perplexity_ratio'] - 1) * 100:+.2f} %), next-token "
            f"agreement {found['next_token_agreement']:.3f}"
        )
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")  # before the folder is hashed
    return StageResult(out, report)


__all__ = ["EXPORT_REPORT", "export_lm_stage", "int4_lm_stage"]
