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


def prune_model(source: str, output_dir: str | os.PathLike, config=None, *, bench_seconds: float | None = 15.0,
                batch: int = 1, seq_len: int = 128, log: Callable[[str], None] = lambda message: None):
    """Load SOURCE (a reference model or a factory), prune it (a dlopt.optimize.prune.Prune config) and
    write OUT/pruned.pt + a verified OUT/pruned.onnx + OUT/prune.json; returns a TorchStageArtifacts.

    Structured: the dense model is exported too (OUT/dense.onnx) and the latency ratio measured
    (`bench_seconds`, one thread, interleaved; None skips it). Unstructured: sparsity and gzip sizes,
    and no latency ratio (there is no speedup to claim). The files are renamed into place together at
    the end: a failed or interrupted run leaves the folder as it was (and removes it when it made it)."""
    from dlopt.errors import InputError
    from dlopt.fileio import output_folder
    from dlopt.optimize.prune import Prune, check_config

    config = config or Prune()
    check_config(config)
    if bench_seconds is not None and bench_seconds <= 0:
        raise InputError(f"the benchmark time must be positive, got {bench_seconds}",
                         "give a positive time, or none to skip the benchmark")
    out_dir = Path(output_dir)
    guard_outputs([guard_source_spec(source)], [out_dir])
    with output_folder(out_dir) as out_dir, staged_outputs() as outputs:
        return _prune_into(source, out_dir, outputs, config, bench_seconds=bench_seconds, batch=batch,
                           seq_len=seq_len, log=log)


def _prune_into(spec: str, out_dir: Path, outputs, config, *, bench_seconds: float | None, batch: int, seq_len: int,
                log: Callable[[str], None]):
    import dataclasses
    import gzip

    from dlopt.optimize.export import load_source
    from dlopt.optimize.prune import STAGE as PRUNE
    from dlopt.optimize.prune import save_checkpoint
    from dlopt.report import format_table
    from dlopt.stage import StageContext, TorchStageArtifacts

    log(f"loading {spec}")
    source = load_source(spec)
    gradients = _gradient_batches(spec, source) if config.importance == "taylor" else None
    log(f"pruning ({config.structure}, ratio {config.ratio}, {config.importance} importance)")
    result = PRUNE.apply(source, config, StageContext(data=gradients, log=log))
    pruned = result.model.module
    report = dict(result.report)
    log("exporting the pruned model (verified against torch)")
    onnx_path = out_dir / "pruned.onnx"
    onnx_tmp = stage_onnx(_exported(dataclasses.replace(result.model, name=f"{source.name} (pruned)"), log),
                          onnx_path, outputs)
    checkpoint = save_checkpoint(out_dir / "pruned.pt", pruned, spec, report, outputs=outputs)
    r = report
    rows = [["parameters", r["parameters_before"], r["parameters_after"],
             f"{r['parameters_after'] / r['parameters_before']:.3f}x"],
            ["MACs (Linear/Conv)", r["macs_before"], r["macs_after"], f"{r['macs_after'] / r['macs_before']:.3f}x"]]
    dense_path = dense_tmp = None
    if bench_seconds is not None or config.structure == "unstructured":  # else no comparison needs it
        dense_path = out_dir / "dense.onnx"
        log("exporting the unpruned model for comparison")
        dense_tmp = stage_onnx(_exported(source, log), dense_path, outputs)
        rows.append(["ONNX MB", dense_tmp.stat().st_size / 1e6, onnx_tmp.stat().st_size / 1e6,
                     f"{onnx_tmp.stat().st_size / dense_tmp.stat().st_size:.3f}x"])
    notes: list[str] = []
    if config.structure == "unstructured":
        dense_gz = len(gzip.compress(dense_tmp.read_bytes(), compresslevel=6, mtime=0))
        sparse_gz_bytes = gzip.compress(onnx_tmp.read_bytes(), compresslevel=6, mtime=0)
        outputs.stage(out_dir / "pruned.onnx.gz").write_bytes(sparse_gz_bytes)
        report["onnx_gzip_bytes_before"], report["onnx_gzip_bytes_after"] = dense_gz, len(sparse_gz_bytes)
        rows += [["sparsity (pruned layers)", 0.0, r["sparsity_pruned_layers"], ""],
                 ["ONNX gzip MB", dense_gz / 1e6, len(sparse_gz_bytes) / 1e6,
                  f"{len(sparse_gz_bytes) / dense_gz:.3f}x"]]
        notes.append("no speedup: unstructured pruning keeps every tensor's shape; the zeros are stored and "
                     "multiplied, so it runs at the dense model's speed. It only compresses better (pruned.onnx.gz).")
    else:
        heads = r.get("attention_heads") or {}
        if heads:
            before = sum(h["before"] for h in heads.values())
            after = sum(h["after"] for h in heads.values())
            rows.append(["attention heads", before, after, f"{after / before:.3f}x"])
        if bench_seconds is not None:
            log(f"measuring latency, one thread, interleaved ({bench_seconds:g} s)")
            speed = measure_speedup(dense_tmp, onnx_tmp, budget_s=bench_seconds, batch=batch, seq_len=seq_len)
            report["latency"] = speed
            rows.append([f"latency (1 thread) ms, batch {speed['batch']}", speed["baseline_ms"], speed["ms"],
                         f"{speed['speedup']:.2f}x faster [{speed['speedup_low']:.2f}, {speed['speedup_high']:.2f}]"])
        notes.append("accuracy is not restored yet: fine-tune with "
                     f"`dlopt distill --teacher {spec} --student {checkpoint}`")
    report |= {"source": spec, "checkpoint": str(checkpoint), "onnx": str(onnx_path),
               "dense_onnx": str(dense_path) if dense_path else None}
    report_path = out_dir / "prune.json"
    outputs.stage(report_path).write_text(json_text(report))
    table = format_table(["", "before", "after", "change"], rows)
    return TorchStageArtifacts(checkpoint, onnx_path, report_path, report, table, tuple(notes))


def _exported(source, log: Callable[[str], None]):
    """A torch ModelSource as a verified ONNX model (the export stage, default config)."""
    from dlopt.optimize.export import STAGE as EXPORT
    from dlopt.optimize.export import Export
    from dlopt.stage import StageContext

    return EXPORT.apply(source, Export(), StageContext(log=log)).model


def _gradient_batches(spec: str, source, n: int = 8):
    """(inputs, None) batches for taylor importance: the reference model's calibration data, else the example."""
    import numpy as np
    import torch

    from dlopt.models import REFERENCE_MODELS

    if spec in REFERENCE_MODELS:
        samples = list(REFERENCE_MODELS[spec].calibration_data(n))
        names = samples[0].keys()
        stacked = {k: torch.from_numpy(np.concatenate([s[k] for s in samples])) for k in names}
        return [(stacked, None)]
    return [(dict(source.example_inputs), None)]


def measure_speedup(baseline_onnx: Path, onnx_path: Path, *, budget_s: float, batch: int = 1,
                    seq_len: int = 128) -> dict[str, float]:
    """Latency of `onnx_path` against `baseline_onnx`, one thread, interleaved (dlopt.bench)."""
    from dlopt.bench import BenchConfig, benchmark

    result = benchmark([baseline_onnx, onnx_path], BenchConfig(threads=1, batch_sizes=(batch,), seq_len=seq_len,
                                                               budget_s=budget_s))
    run = result.batches[0]
    ratio = run.models[1].ratios[result.clock]
    return {"clock": result.clock, "batch": run.batch, "rounds": run.rounds,
            "baseline_ms": run.models[0].summaries[result.clock].median * 1e3,
            "ms": run.models[1].summaries[result.clock].median * 1e3,
            "speedup": 1.0 / ratio.estimate, "speedup_low": 1.0 / ratio.high, "speedup_high": 1.0 / ratio.low}


def distill_model(teacher_spec: str, student_path: str | os.PathLike, data_spec: str, output_dir: str | os.PathLike,
                  *, epochs: int = 3, temperature: float = 4.0, alpha: float = 0.7, loss: str | None = None,
                  lr: float | None = None, batch_size: int = 64, max_samples: int | None = None,
                  val_fraction: float = 0.1, patience: int | None = 2,
                  hidden_layers: tuple[tuple[str, str], ...] = (), hidden_weight: float = 0.0,
                  seed: int = 0, device: str = "cpu", resume: bool = False,
                  bench_seconds: float | None = 15.0, show_progress: bool = True,
                  student_source: str | None = None, log: Callable[[str], None] = lambda message: None):
    """Distill TEACHER into the checkpoint STUDENT on DATA (an .npz, or "reference": the teacher reference
    model's own training data); writes OUT/distilled.pt, a verified OUT/distilled.onnx and OUT/distill.json,
    renamed into place together at the end (the training state, OUT/distill_state.pt, is saved after every
    epoch: `resume` continues it); returns a TorchStageArtifacts. With `bench_seconds`, the latency against
    the teacher (one thread, interleaved).

    The student is rebuilt from the source its checkpoint records, which is imported only if its file
    still has the recorded sha256, or from `student_source` when the user names one."""
    from dlopt.errors import InputError
    from dlopt.fileio import output_folder
    from dlopt.optimize.distill import Distill, check_config
    from dlopt.optimize.prune import checked_source, read_checkpoint

    embedding_teacher = teacher_spec == "minilm"
    config = Distill(epochs=epochs, temperature=temperature, alpha=alpha,
                     loss=loss or ("cosine" if embedding_teacher else "kl"),
                     lr=lr or (3e-4 if embedding_teacher else 1e-3), batch_size=batch_size,
                     hidden_layers=hidden_layers, hidden_weight=hidden_weight, patience=patience, seed=seed,
                     device=device, freeze=("bert.embeddings",) if embedding_teacher else ())
    check_config(config)
    student_path, out_dir = Path(student_path), Path(output_dir)
    checkpoint = read_checkpoint(student_path)  # fail on a bad checkpoint before loading models
    source_spec = student_source or checked_source(checkpoint, student_path)
    if data_spec != "reference" and not Path(data_spec).is_file():
        raise InputError(f"data file {data_spec} does not exist", "give an .npz file or 'reference'")
    guard_outputs([guard_source_spec(teacher_spec), student_path, guard_source_spec(source_spec),
                   None if data_spec == "reference" else data_spec], [out_dir])
    with output_folder(out_dir) as out_dir, staged_outputs() as outputs:
        return _distill_into(teacher_spec, checkpoint, source_spec, student_path, data_spec, out_dir, outputs, config,
                             max_samples=max_samples, val_fraction=val_fraction, seed=seed, resume=resume,
                             bench_seconds=bench_seconds, show_progress=show_progress, log=log)


def _same_source(a: str, b: str) -> bool:
    from dlopt.errors import InputError
    from dlopt.optimize.prune import pinned_source

    if a == b:
        return True
    try:
        return pinned_source(a)[0] == pinned_source(b)[0]
    except (InputError, OSError):
        return False


def _distill_into(teacher_spec: str, checkpoint, source_spec: str, student_path: Path, data_spec: str, out_dir: Path,
                  outputs, config, *, max_samples: int | None, val_fraction: float, seed: int, resume: bool,
                  bench_seconds: float | None, show_progress: bool, log: Callable[[str], None]):
    import copy
    import dataclasses

    from dlopt.optimize.distill import STAGE as DISTILL
    from dlopt.optimize.distill import load_npz_data, reference_training_data, split_validation
    from dlopt.optimize.export import load_source
    from dlopt.optimize.prune import rebuild, save_checkpoint
    from dlopt.report import format_table
    from dlopt.stage import StageContext, TorchStageArtifacts

    log(f"loading the teacher {teacher_spec}")
    teacher = load_source(teacher_spec)
    log(f"rebuilding the student from {student_path} (source {source_spec})")
    student_source = dataclasses.replace(teacher, module=copy.deepcopy(teacher.module)) \
        if _same_source(source_spec, teacher_spec) else load_source(source_spec)
    student = dataclasses.replace(student_source, module=rebuild(checkpoint, student_source.module,
                                                                 student_source.example_inputs))
    data = reference_training_data(teacher_spec, max_samples) if data_spec == "reference" else \
        load_npz_data(Path(data_spec), teacher.example_inputs, max_samples)
    train, val = split_validation(data, val_fraction, seed)
    log(f"distilling on {len(train)} samples ({'labeled' if train.labels is not None else 'unlabeled'}), "
        f"{len(val) if val is not None else 0} held out for early stopping")
    result = DISTILL.apply(student, config, StageContext(data=train, eval_data=val, teacher=teacher, output=out_dir,
                                                         resume=resume, progress=show_progress, log=log))
    report = dict(result.report)
    log("exporting the student (verified against torch)")
    onnx_path = out_dir / "distilled.onnx"
    onnx_tmp = stage_onnx(_exported(dataclasses.replace(result.model, name=f"{source_spec} (distilled)"), log),
                          onnx_path, outputs)
    saved = save_checkpoint(out_dir / "distilled.pt", result.model.module, source_spec,
                            {"pruning_history": checkpoint.pruning_history,
                             "module_attributes": checkpoint.module_attributes,
                             "prune": checkpoint.report, "distill": {k: v for k, v in report.items()}},
                            outputs=outputs)
    notes = []
    if bench_seconds is not None:
        teacher_path = out_dir / "teacher.onnx"
        log("exporting the teacher for the latency comparison")
        teacher_tmp = stage_onnx(_exported(teacher, log), teacher_path, outputs)
        log(f"measuring latency against the teacher, one thread, interleaved ({bench_seconds:g} s)")
        speed = measure_speedup(teacher_tmp, onnx_tmp, budget_s=bench_seconds)
        report["latency"] = speed
        notes.append(f"latency (1 thread, batch {speed['batch']}): teacher {speed['baseline_ms']:.3f} ms, student "
                     f"{speed['ms']:.3f} ms: {speed['speedup']:.2f}x faster [{speed['speedup_low']:.2f}, "
                     f"{speed['speedup_high']:.2f}]")
    if report["stopped_early"]:
        notes.append(f"stopped early after epoch {report['epochs_run']}; kept epoch {report['best_epoch']}")
    report |= {"teacher": teacher_spec, "student_checkpoint": str(student_path), "student_source": source_spec,
               "data": data_spec, "checkpoint": str(saved), "onnx": str(onnx_path)}
    report_path = out_dir / "distill.json"
    outputs.stage(report_path).write_text(json_text(report))
    rows = [[h["epoch"], h["train_loss"], h.get("eval_metric") or "", h.get("eval_value"), h["seconds"]]
            for h in report["history"]]
    table = format_table(["epoch", "train loss", "eval metric", "value", "seconds"], rows)
    return TorchStageArtifacts(saved, onnx_path, report_path, report, table, tuple(notes))


__all__ = ["WrittenModel", "distill_model", "export_model", "measure_speedup", "prune_model", "quantize_model",
           "report_path_for"]
