"""`dlopt package`: turn an ONNX model into a verified, self-describing bundle for a target.

A bundle is a folder:
    model.ort | model.onnx         the model in the target's form (ORT format for mobile)
    required_operators.config      mobile: operators (and types, optionally) for a minimal ORT build
    coverage.json                  mobile: NNAPI / CoreML coverage and advice
    samples.npz                    inputs and the *source* model's outputs on them
    model.xnnpack-<precision>.pte  with --torch-source: ExecuTorch programs for the XNNPACK backend
    README.md                      a model card
    manifest.json                  every file's sha256 and bytes, versions, configs, hashes, metrics
    manifest.sig                   with a signing key: Ed25519 signature of manifest.json's bytes

It is built in a temporary folder beside the destination and renamed into place only after the
packaged model has loaded and matched the source ONNX model on the samples: a failed check or a
crash leaves no bundle (and an existing one untouched). The input model is never modified.

The package, by concern (package() itself is here: it runs them in order):
    config.py   PackageConfig and its checks, PackageResult
    bundle.py   the bundle folder: destination checks, atomic replacement, recovery after a kill
    build.py    the model in the target's form (ORT format for mobile)
    checks.py   samples, the source's outputs, verification of every artifact (dlopt verify re-runs it)
    pte.py      ExecuTorch .pte programs from a torch source (lowered by dlopt.optimize.pt2e)
    measure.py  the recommended session and its latency
    record.py   the manifest's content: tensors, files, stage reports, calibration
    card.py     the model card (README.md) and the printed summary
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, VerificationError
from dlopt.fileio import finite_for_json, guard_outputs, guard_source_spec, json_text, load_onnx
from dlopt.manifest import MANIFEST_NAME, SAMPLES_NAME, SIGNATURE_NAME, file_entries
from dlopt.package.build import build_model, copy_onnx, parse_fix_shapes, save_onnx
from dlopt.package.bundle import check_bundle_path, finalize_bundle, is_bundle
from dlopt.package.card import model_card, summary_table
from dlopt.package.checks import (
    check_failure_text,
    check_output,
    compare,
    read_samples,
    run_onnx,
    sample_inputs,
    verify_outputs,
    write_samples,
)
from dlopt.package.config import (
    PACKAGE_TARGETS,
    PTE_PRECISIONS,
    Log,
    PackageConfig,
    PackageResult,
    builds,
    validate_config,
)
from dlopt.package.measure import bundle_latency, length_sorting_latency, recommended_session
from dlopt.package.pte import build_pte, load_torch_source
from dlopt.package.record import build_manifest, calibration_record, coverage_summary, file_roles, stage_reports


def _relaxed_outputs(model, label: str):
    """(`model` with the output declarations relaxed that its graph does not confirm, what was relaxed),
    or (None, ()) where there is nothing to relax (see dlopt.sessions): the shipped model must run
    where the user's application reuses its output buffers, as ONNX Runtime's IO binding does."""
    import onnx

    from dlopt.sessions import note_once, relax_declared_outputs

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    found = relax_declared_outputs(copy)
    for r in found:
        if r.inferred is not None:
            note_once(f"{label}: {r.note()}")
    return (copy, found) if found else (None, ())


def package(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    config: PackageConfig = PackageConfig(),
    *,
    data: Mapping[str, np.ndarray] | None = None,
    sign_key: str | os.PathLike | None = None,
    lineage: Sequence[Mapping[str, Any]] | None = None,
    data_spec: Any = None,
    log: Log = lambda message: None,
) -> PackageResult:
    """Build a verified bundle for `config.target` from the ONNX model at `model_path` in `output`.

    `data` ({input name: array}, first axis = batch, or a dlopt.data.SampleArrays) replaces generated sample
    inputs; `data_spec` (a dlopt.data.DataSpec) is what they were read with, recorded. `sign_key`
    (an Ed25519 private key PEM, `dlopt keygen`) signs the manifest. `lineage` (from `dlopt run`: each
    stage that made the model, with its config, input and output sha256 and cache key) is recorded in it.
    Raises InputError for bad input, VerificationError (nothing written) when the packaged model does not
    match the source."""
    validate_config(config)
    private_key = None
    if sign_key is not None:  # read the key before any long work; its path is not recorded anywhere
        from dlopt.signing import load_private_key

        private_key = load_private_key(sign_key)
    source_path = Path(model_path)
    from dlopt.data import as_spec

    calibration_spec = as_spec(config.calibration)
    calibration_path = calibration_spec.source if calibration_spec is not None and calibration_spec.is_path else None
    guard_outputs([source_path, calibration_path, guard_source_spec(config.torch_source)], [output])
    out = check_bundle_path(Path(output), config.overwrite)
    if sign_key is not None and Path(out).resolve() in Path(sign_key).resolve().parents:
        raise InputError(
            f"the signing key {sign_key} lies inside the bundle folder {out}",
            "keep keys outside bundles: the bundle is replaced, and the key would be lost or shipped",
        )
    source = load_onnx(source_path)
    from dlopt.targets.mobile import external_data_files

    name = config.name or (source_path.name[:-5] if source_path.name.endswith(".onnx") else source_path.stem)
    fixed = dict(parse_fix_shapes(config.fix_shapes))
    model = source
    if fixed:
        from dlopt.targets.mobile import fix_shapes

        model = fix_shapes(source, fixed)
        log(f"fixed input shapes: {', '.join(f'{k}={list(v)}' for k, v in fixed.items())}")
    calibration = calibration_record(config.calibration, source_path)
    stage_configs = stage_reports(source_path)
    if calibration is None:
        calibration = next(
            (
                r["calibration"]
                for r in stage_configs.values()
                if isinstance(r.get("calibration"), dict) and "sha256" in r["calibration"]
            ),
            None,
        )
    lm_only = [p for p in config.pte_precisions if p not in PTE_PRECISIONS]
    if lm_only:
        raise InputError(f".pte precision {lm_only[0]} is for LM folders", f"choose from {', '.join(PTE_PRECISIONS)}")
    torch_source = load_torch_source(config) if config.torch_source else None  # fail early on a bad source
    if data is None and calibration_spec is not None and (calibration_spec.layout or calibration_spec.values):
        # generated samples put the batch on axis 0 and know no constants: the declared data does
        from dlopt.data import data_arrays

        data, data_spec = data_arrays(calibration_spec, source_path, samples=config.samples), calibration_spec
        log(f"sample inputs: {config.samples} sample(s) of {calibration_spec} as its data spec declares it")

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="dlopt-package-") as work_dir:
            work = Path(work_dir)
            prepared = work / "prepared.onnx"
            relaxed, relaxed_outputs = _relaxed_outputs(model, source_path.name)
            if fixed or relaxed is not None:
                save_onnx(relaxed if relaxed is not None else model, prepared)
            else:
                copy_onnx(source_path, prepared, external_data_files(source))
            built = build_model(prepared, staging, config, log)
            feeds_list = sample_inputs(prepared, config, data)
            expected = run_onnx(prepared, feeds_list)
            if relaxed_outputs:
                from dlopt.sessions import produced_notes

                produced_notes(relaxed_outputs, expected[0], source_path.name)
            write_samples(staging / SAMPLES_NAME, feeds_list, expected)
            log(f"verifying {built['file']} against {source_path.name} on {len(feeds_list)} sample(s)")
            checks = verify_outputs(
                staging / built["file"],
                built["session_config"],
                feeds_list,
                expected,
                {"atol": config.atol, "rtol": config.rtol},
                artifact=built["file"],
            )
            coverage = None
            if builds(config, "ort") and config.coverage:  # NNAPI / CoreML take ORT-format models
                from dlopt.targets.mobile import coverage_report

                log("checking NNAPI and CoreML coverage")
                sample_shapes = {k: list(v.shape) for k, v in feeds_list[0].items()}
                report = coverage_report(model, sample_shapes=sample_shapes, model_label=str(source_path))
                (staging / "coverage.json").write_text(json_text(report))  # staging is private: no temp needed
                coverage = coverage_summary(report)
            artifacts, pte_checks, pte_programs = [], [], []
            if torch_source is not None:
                artifacts, pte_checks, pte_programs = build_pte(
                    torch_source, staging, config, feeds_list, expected, log, source_path
                )
            checks += pte_checks
            failed = [c for c in checks if not c["passed"]]
            if failed:
                raise VerificationError(
                    "the packaged artifacts do not match the source ONNX model: "
                    + "; ".join(f"{c['artifact']} {c['output']}: {check_failure_text(c)}" for c in failed),
                    "nothing was written; loosen {atol=TOL}/{rtol=TOL} (ORT model) or the int8 .pte SQNR floor (an "
                    "int8 .pte against an int8 MODEL compares two different quantizations) only if the difference is "
                    "expected",
                )
            metrics = (
                bundle_latency(staging / built["file"], built, config, feeds_list[0], pte_programs, log)
                if config.measure_s > 0
                else {}
            )
            sorting = (
                length_sorting_latency(staging / built["file"], built, config, model, data, source_path, log)
                if config.measure_s > 0
                else None
            )
        manifest = build_manifest(
            name=name,
            config=config,
            source_path=source_path,
            source=source,
            model=model,
            built=built,
            fixed=fixed,
            calibration=calibration,
            stage_configs=stage_configs,
            checks=checks,
            samples=len(feeds_list),
            coverage=coverage,
            metrics=metrics,
            artifacts=artifacts,
            staging=staging,
        )
        specs = {
            role: spec.record()
            for role, spec in (("calibration", calibration_spec), ("data", as_spec(data_spec)))
            if spec is not None
        }
        manifest["data_spec"] = specs or None
        if sorting is not None:
            manifest["length_sorting"] = sorting
        if lineage is not None:  # before signing: the signature covers it
            manifest["lineage"] = [dict(step) for step in lineage]
        if private_key is not None:
            from dlopt.signing import signer_record

            manifest["signature"] = signer_record(private_key)
        (staging / "README.md").write_text(model_card(manifest, coverage_report_path=staging / "coverage.json"))
        manifest["files"] = file_entries(staging, file_roles(staging, built, artifacts))
        manifest = finite_for_json(manifest)
        manifest_bytes = json_text(manifest).encode()
        (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        if private_key is not None:
            from dlopt.signing import sign

            (staging / SIGNATURE_NAME).write_bytes(sign(manifest_bytes, private_key))
            log(f"signed the manifest with key {manifest['signature']['key_fingerprint'][:16]}…")
        finalize_bundle(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackageResult(bundle=out, manifest=manifest)


__all__ = [
    "PACKAGE_TARGETS",
    "PackageConfig",
    "PackageResult",
    "check_output",
    "compare",
    "model_card",
    "package",
    "read_samples",
    "summary_table",
    "validate_config",
    "verify_outputs",
    "check_bundle_path",
    "finalize_bundle",
    "is_bundle",
    "Log",
    "PTE_PRECISIONS",
    "recommended_session",
]
