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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import dlopt
from dlopt.errors import InputError, VerificationError
from dlopt.fileio import finite_for_json, guard_outputs, guard_source_spec, json_text, load_onnx
from dlopt.manifest import (MANIFEST_NAME, SAMPLES_NAME, SCHEMA_NAME, SCHEMA_VERSION, SIGNATURE_NAME, file_entries,
                            sha256_file)
from dlopt.report import environment, format_markdown_table, format_table
from dlopt.stage import config_to_dict
from dlopt.targets import target_names

# The targets `dlopt package` builds a bundle for: those that declare package formats.
PACKAGE_TARGETS = tuple(target_names(package=True))
PTE_PRECISIONS = ("fp32", "int8", "int8-dynamic")  # int8-dynamic: linear layers, activations per run
Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class PackageConfig:
    target: str = "mobile"  # one of PACKAGE_TARGETS: mobile | cpu | cuda
    intended_ep: str | None = None  # mobile: cpu | xnnpack | nnapi | coreml (picks the ORT optimization style)
    fix_shapes: tuple[str, ...] = ()  # "input_ids=1x128": make dynamic input shapes static
    type_reduction: bool = False  # mobile: list kernel types in the operators config too
    coverage: bool = True  # mobile: NNAPI / CoreML coverage report
    samples: int = 2  # verification samples stored in the bundle
    batch: int = 1
    seq_len: int = 16  # size of dynamic axes other than the batch in generated samples
    input_shapes: tuple[str, ...] = ()  # NAME=DxD...: shapes of generated samples (--input-shape)
    atol: float = 1e-4  # packaged model vs source ONNX (a lossless conversion)
    rtol: float = 1e-3
    seed: int = 0
    measure_s: float = 2.0  # latency measurement per target after packaging; 0 skips it
    threads: int | None = None  # None: the target's own (phone-like for mobile), 1 otherwise
    torch_source: str | None = None  # reference model or factory: lower it to ExecuTorch .pte (XNNPACK)
    pte_precisions: tuple[str, ...] = ("fp32",)
    pte_fp32_min_sqnr_db: float = 60.0  # .pte vs source ONNX: a float lowering must agree to this floor
    pte_int8_min_sqnr_db: float = 15.0  # ... an int8 one (a lossy quantization) to this one
    calibration: str | None = None  # calibration data of the model (npz, folder, model:NAME): hashed into the manifest
    pte_calibration_samples: int = 32  # samples for the int8 .pte's calibration
    pte_weight_rounding: str = "gptq"  # int8 .pte weights: gptq (on the calibration data) | nearest (stock)
    pte_bias_correction: bool = True  # int8 .pte: fold each conv/linear's mean rounding shift into its bias
    name: str | None = None  # model name in the manifest and model card (default: the file's stem)
    overwrite: bool = False  # replace an existing bundle folder


@dataclass(frozen=True)
class PackageResult:
    bundle: Path
    manifest: dict[str, Any]


def validate_config(config: PackageConfig) -> None:
    from dlopt.inputs import parse_input_shapes
    from dlopt.targets.mobile import INTENDED_EPS, parse_fix_shape

    packagable = target_names(package=True)
    if config.target not in packagable:
        raise InputError(f"unknown package target {config.target!r}", f"choose one of {', '.join(packagable)}")
    if config.intended_ep is not None:
        if config.target != "mobile":
            raise InputError(f"an intended EP is for {{target=mobile}}, not {config.target}", "drop {intended_ep=EP}")
        if config.intended_ep not in INTENDED_EPS:
            raise InputError(f"unknown intended EP {config.intended_ep!r}", f"choose one of {', '.join(INTENDED_EPS)}")
    for text in config.fix_shapes:
        parse_fix_shape(text)
    parse_input_shapes(config.input_shapes)
    if config.samples < 1:
        raise InputError(f"samples must be at least 1, got {config.samples}", "pass {samples=1} or more")
    if config.batch < 1 or config.seq_len < 1:
        raise InputError("batch and sequence length must be at least 1", "pass positive sizes")
    if config.atol < 0 or config.rtol < 0:
        raise InputError("tolerances must be non-negative", "pass {atol=TOL} and {rtol=TOL} >= 0")
    if config.threads is not None and config.threads < 1:
        raise InputError(f"threads must be at least 1, got {config.threads}", "pass {threads=1} or more")
    if config.measure_s < 0:
        raise InputError(f"measure time must be non-negative, got {config.measure_s}", "pass 0 to skip measuring")
    bad = [p for p in config.pte_precisions if p not in PTE_PRECISIONS]
    if bad:
        raise InputError(f"unknown .pte precision(s) {bad}", f"choose from {', '.join(PTE_PRECISIONS)}")
    from dlopt.optimize.pt2e import WEIGHT_ROUNDINGS

    if config.pte_weight_rounding not in WEIGHT_ROUNDINGS:
        raise InputError(f"unknown .pte weight rounding {config.pte_weight_rounding!r}",
                         f"choose {' or '.join(WEIGHT_ROUNDINGS)}")
    if config.torch_source is not None and config.target != "mobile":
        raise InputError("a torch source (ExecuTorch/XNNPACK programs) is for {target=mobile}",
                         "use {target=mobile}, or drop {torch_source=SOURCE}")


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------

def package(model_path: str | os.PathLike, output: str | os.PathLike, config: PackageConfig = PackageConfig(), *,
            data: Mapping[str, np.ndarray] | None = None, sign_key: str | os.PathLike | None = None,
            lineage: Sequence[Mapping[str, Any]] | None = None, log: Log = lambda message: None) -> PackageResult:
    """Build a verified bundle for `config.target` from the ONNX model at `model_path` in `output`.

    `data` ({input name: array}, first axis = batch) replaces generated sample inputs. `sign_key`
    (an Ed25519 private key PEM, `dlopt keygen`) signs the manifest. `lineage` (from `dlopt run`: each
    stage that made the model, with its config, input and output sha256 and cache key) is recorded in it. Raises InputError for bad input,
    VerificationError (nothing written) when the packaged model does not match the source."""
    validate_config(config)
    private_key = None
    if sign_key is not None:  # read the key before any long work; its path is not recorded anywhere
        from dlopt.signing import load_private_key

        private_key = load_private_key(sign_key)
    source_path = Path(model_path)
    calibration_path = config.calibration if config.calibration and not config.calibration.startswith("model:") \
        else None
    guard_outputs([source_path, calibration_path, guard_source_spec(config.torch_source)], [output])
    out = check_bundle_path(Path(output), config.overwrite)
    if sign_key is not None and Path(out).resolve() in Path(sign_key).resolve().parents:
        raise InputError(f"the signing key {sign_key} lies inside the bundle folder {out}",
                         "keep keys outside bundles: the bundle is replaced, and the key would be lost or shipped")
    source = load_onnx(source_path)
    from dlopt.targets.mobile import external_data_files

    name = config.name or (source_path.name[:-5] if source_path.name.endswith(".onnx") else source_path.stem)
    fixed = dict(_parse_fix_shapes(config.fix_shapes))
    model = source
    if fixed:
        from dlopt.targets.mobile import fix_shapes

        model = fix_shapes(source, fixed)
        log(f"fixed input shapes: {', '.join(f'{k}={list(v)}' for k, v in fixed.items())}")
    calibration = _calibration_record(config.calibration, source_path)
    stage_configs = _stage_reports(source_path)
    if calibration is None:
        calibration = next((r["calibration"] for r in stage_configs.values()
                            if isinstance(r.get("calibration"), dict) and "sha256" in r["calibration"]), None)
    torch_source = _load_torch_source(config) if config.torch_source else None  # fail early on a bad source

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="dlopt-package-") as work_dir:
            work = Path(work_dir)
            prepared = work / "prepared.onnx"
            if fixed:
                _save_model(model, prepared)
            else:
                _copy_onnx(source_path, prepared, external_data_files(source))
            built = _build_model(prepared, staging, config, log)
            feeds_list = _sample_inputs(prepared, config, data)
            expected = _run_onnx(prepared, feeds_list)
            _write_samples(staging / SAMPLES_NAME, feeds_list, expected)
            log(f"verifying {built['file']} against {source_path.name} on {len(feeds_list)} sample(s)")
            checks = verify_outputs(staging / built["file"], built["session_config"], feeds_list, expected,
                                    {"atol": config.atol, "rtol": config.rtol}, artifact=built["file"])
            coverage = None
            if config.target == "mobile" and config.coverage:
                from dlopt.targets.mobile import coverage_report

                log("checking NNAPI and CoreML coverage")
                sample_shapes = {k: list(v.shape) for k, v in feeds_list[0].items()}
                report = coverage_report(model, sample_shapes=sample_shapes, model_label=str(source_path))
                (staging / "coverage.json").write_text(json_text(report))  # staging is private: no temp needed
                coverage = _coverage_summary(report)
            artifacts, pte_checks, pte_programs = [], [], []
            if torch_source is not None:
                artifacts, pte_checks, pte_programs = _build_pte(torch_source, staging, config, feeds_list, expected,
                                                                 log, source_path)
            checks += pte_checks
            failed = [c for c in checks if not c["passed"]]
            if failed:
                raise VerificationError(
                    "the packaged artifacts do not match the source ONNX model: "
                    + "; ".join(f"{c['artifact']} {c['output']}: {_check_text(c)}" for c in failed),
                    "nothing was written; loosen {atol=TOL}/{rtol=TOL} (ORT model) or the int8 .pte SQNR floor (an "
                    "int8 .pte against an int8 MODEL compares two different quantizations) only if the difference is "
                    "expected")
            metrics = _measure(staging / built["file"], built, config, feeds_list[0], pte_programs, log) \
                if config.measure_s > 0 else {}
        manifest = _manifest(name=name, config=config, source_path=source_path, source=source, model=model,
                             built=built, fixed=fixed, calibration=calibration, stage_configs=stage_configs,
                             checks=checks, samples=len(feeds_list), coverage=coverage, metrics=metrics,
                             artifacts=artifacts, staging=staging)
        if lineage is not None:  # before signing: the signature covers it
            manifest["lineage"] = [dict(step) for step in lineage]
        if private_key is not None:
            from dlopt.signing import signer_record

            manifest["signature"] = signer_record(private_key)
        (staging / "README.md").write_text(model_card(manifest, coverage_report_path=staging / "coverage.json"))
        manifest["files"] = file_entries(staging, _roles(staging, built, artifacts))
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


def check_bundle_path(out: Path, overwrite: bool) -> Path:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable", "choose another -o path")
    _recover_killed_runs(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"bundle path {out} is a file", "give a folder name for the bundle")
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"bundle folder {out} exists and is not empty",
                                 "pass {overwrite}, or choose another {output=DIR}")
            if not is_bundle(out):
                raise InputError(f"{{overwrite}}: {out} is not a dlopt bundle (no manifest.json written by dlopt "
                                 "package), so it is not replaced",
                                 "choose another {output=DIR}, or empty the folder yourself")
    return out


def is_bundle(folder: Path) -> bool:
    """True when `folder` holds a manifest that `dlopt package` wrote (what --overwrite may replace)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("schema") == SCHEMA_NAME


def _recover_killed_runs(out: Path) -> None:
    """Clean up after runs for `out` that were killed (SIGKILL, a power cut): remove their staging
    folders, and put back a bundle that one moved aside (`.NAME.old-PID`) but never replaced."""
    import glob

    from dlopt.fileio import stale_pid

    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        if not path.is_dir():
            continue
        if stale_pid(path.name, f".{out.name}.building-"):
            shutil.rmtree(path, ignore_errors=True)
        elif stale_pid(path.name, f".{out.name}.old-"):
            if out.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, out)


def finalize_bundle(staging: Path, out: Path) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and removed after.
    SIGINT/SIGTERM wait until both renames are done; a run killed between them leaves the old bundle
    at `.NAME.old-PID`, which the next run for NAME puts back (see _recover_killed_runs)."""
    from dlopt.fileio import record_written, signals_held

    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp/mkstemp create private (0700/0600) entries: give the bundle the user's usual permissions
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    with signals_held():
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        record_written(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _parse_fix_shapes(texts: Iterable[str]) -> list[tuple[str, tuple[int, ...]]]:
    from dlopt.targets.mobile import parse_fix_shape

    parsed = [parse_fix_shape(t) for t in texts]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise InputError(f"fixed shapes name an input twice: {names}", "give each input once")
    return parsed


def _save_model(model, path: Path) -> None:
    import onnx

    large = model.ByteSize() > 2**31 - 1
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def _copy_onnx(src: Path, dst: Path, external: Sequence[str]) -> None:
    shutil.copyfile(src, dst)
    for location in external:
        shutil.copyfile(src.parent / location, dst.parent / location)


def _build_model(prepared: Path, staging: Path, config: PackageConfig, log: Log) -> dict[str, Any]:
    """Write the model in the target's form into the staging folder."""
    if config.target == "mobile":
        from dlopt.targets.mobile import SESSION_CONFIG_FOR_STYLE, STYLE_FOR_EP, to_ort_format

        intended = config.intended_ep or "cpu"
        style = STYLE_FOR_EP[intended]
        log(f"converting to ORT format ({style} optimization style, for the {intended} EP)")
        conversion = to_ort_format(prepared, staging, style=style, type_reduction=config.type_reduction)
        return {"file": conversion.model.name, "format": "ort", "intended_ep": intended, "optimization_style": style,
                "graph_optimization_level": "all" if style == "Fixed" else "basic",
                "session_config": dict(SESSION_CONFIG_FOR_STYLE[style]),
                "operators_config": conversion.operators_config.name,
                "ort_format_version": conversion.ort_format_version}
    from dlopt.targets.mobile import external_data_files

    external = external_data_files(load_onnx(prepared, load_external_data=False))
    if external:
        raise InputError(f"{prepared.name} keeps its weights in external data files {external}",
                         "bundles hold single-file models under 2 GiB for now")
    shutil.copyfile(prepared, staging / "model.onnx")
    return {"file": "model.onnx", "format": "onnx", "intended_ep": config.target, "optimization_style": None,
            "graph_optimization_level": None, "session_config": {}, "operators_config": None,
            "ort_format_version": None}


# ---------------------------------------------------------------------------------------------
# Samples and output checks
# ---------------------------------------------------------------------------------------------

def _sample_inputs(model_path: Path, config: PackageConfig,
                   data: Mapping[str, np.ndarray] | None) -> list[dict[str, np.ndarray]]:
    from dlopt.fileio import load_onnx
    from dlopt.inputs import feeds_from_arrays, parse_input_shapes, session_inputs, synthetic_feeds, value_ranges
    from dlopt.sessions import trial_run

    session = _session(model_path, {})
    specs = session_inputs(session)
    if data is not None:
        return [feeds_from_arrays(specs, data, "--data")]
    real = _reference_samples(config, specs)
    if real is not None:
        return real
    return synthetic_feeds(specs, count=config.samples, batch=config.batch, seq_len=config.seq_len,
                           seed=config.seed, overrides=parse_input_shapes(config.input_shapes),
                           ranges=value_ranges(load_onnx(model_path, load_external_data=False)),
                           run=lambda feeds: trial_run(session, feeds))


def _reference_samples(config: PackageConfig, specs) -> list[dict[str, np.ndarray]] | None:
    """With a reference model as --torch-source, its real example inputs as the samples (when they
    fit the ONNX model's inputs). An int8 .pte is calibrated on real data and must be checked on it:
    on N(0, 1) noise images EfficientNet-Lite0's int8 program measured 12.7 dB against the 15 dB
    floor (top-1 still agreeing), a property of the noise, not of the program."""
    if not (config.torch_source and _is_reference(config.torch_source)):
        return None
    from dlopt.models import get_reference_model

    example = get_reference_model(config.torch_source).example_inputs(batch=config.batch * config.samples,
                                                                      seq_len=config.seq_len)
    arrays = {k: np.asarray(v) for k, v in example.items()}
    if {s.name for s in specs} != set(arrays) or any(len(s.shape) != arrays[s.name].ndim for s in specs):
        return None
    b = config.batch
    return [{s.name: np.ascontiguousarray(arrays[s.name][k * b:(k + 1) * b]) for s in specs}
            for k in range(config.samples)]


def _session(model: Path, session_config: Mapping[str, str], threads: int = 1):
    from dlopt.sessions import cpu_session

    return cpu_session(model, threads=threads, graph_opt_level="all", config_entries=session_config,
                       error=VerificationError,
                       hint="the file is damaged or was written by an incompatible version")


def _run_onnx(model_path: Path, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    session = _session(model_path, {})
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, dict(feeds)))) for feeds in feeds_list]


def _write_samples(path: Path, feeds_list, expected) -> None:
    arrays = {}
    for k, (feeds, outs) in enumerate(zip(feeds_list, expected)):
        arrays.update({f"sample{k}.input.{n}": v for n, v in feeds.items()})
        arrays.update({f"sample{k}.expected.{n}": v for n, v in outs.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_samples(path: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Inverse of _write_samples: (inputs per sample, expected outputs per sample)."""
    inputs: dict[int, dict[str, np.ndarray]] = {}
    expected: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            head, kind, name = key.split(".", 2)
            index = int(head[len("sample"):])
            (inputs if kind == "input" else expected).setdefault(index, {})[name] = archive[key]
    order = sorted(inputs)
    return [inputs[k] for k in order], [expected.get(k, {}) for k in order]


def compare(actual: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Difference measures of one output (dlopt.fidelity): max abs diff, SQNR of `actual` against
    `reference` in dB (inf when equal) and, for [batch, classes] outputs, top-1 agreement."""
    from dlopt.fidelity import compare_arrays

    a, r = np.asarray(actual), np.asarray(reference)
    if a.shape != r.shape:
        return {"shape_mismatch": [list(a.shape), list(r.shape)], "max_abs_diff": float("inf"), "sqnr_db": None,
                "top1_agreement": None}
    measured = compare_arrays(a, r)
    return {"max_abs_diff": measured.max_abs_diff, "sqnr_db": measured.sqnr_db,
            "top1_agreement": measured.top1_agreement}


def check_output(actual: np.ndarray, reference: np.ndarray, criterion: Mapping[str, float]) -> dict[str, Any]:
    """`compare` plus the verdict: allclose for {atol, rtol}, a floor for {min_sqnr_db}."""
    result = compare(actual, reference)
    if "shape_mismatch" in result:
        return result | {"passed": False}
    if "min_sqnr_db" in criterion:
        passed = bool(result["sqnr_db"] is not None and result["sqnr_db"] >= criterion["min_sqnr_db"])
    else:
        passed = bool(np.allclose(np.asarray(actual, np.float64), np.asarray(reference, np.float64),
                                  atol=criterion["atol"], rtol=criterion["rtol"]))
    return result | {"passed": passed}


def verify_outputs(model: Path, session_config: Mapping[str, str], feeds_list, expected, criterion, *,
                   artifact: str) -> list[dict[str, Any]]:
    """Run the packaged ONNX/ORT model on each sample; one check per output over all samples."""
    session = _session(model, session_config)
    names = [o.name for o in session.get_outputs()]
    got = [dict(zip(names, session.run(None, dict(feeds)))) for feeds in feeds_list]
    return _checks(artifact, got, expected, criterion)


def _checks(artifact: str, got: Sequence[Mapping[str, np.ndarray]], expected: Sequence[Mapping[str, np.ndarray]],
            criterion: Mapping[str, float]) -> list[dict[str, Any]]:
    checks = []
    for output in expected[0]:
        if any(output not in g for g in got):
            checks.append({"artifact": artifact, "output": output, "criterion": dict(criterion), "passed": False,
                           "max_abs_diff": float("inf"), "sqnr_db": None, "top1_agreement": None,
                           "detail": "output missing"})
            continue
        actual = np.concatenate([np.asarray(g[output]).reshape(-1) for g in got])
        reference = np.concatenate([np.asarray(e[output]).reshape(-1) for e in expected])
        result = check_output(actual, reference, criterion)
        top1 = [compare(g[output], e[output])["top1_agreement"] for g, e in zip(got, expected)]
        result["top1_agreement"] = float(np.mean(top1)) if None not in top1 else None
        checks.append({"artifact": artifact, "output": output, "criterion": dict(criterion)} | result)
    return checks


def _check_text(check: Mapping[str, Any]) -> str:
    if "detail" in check:
        return check["detail"]
    if "shape_mismatch" in check:
        return f"shape {check['shape_mismatch'][0]} vs {check['shape_mismatch'][1]}"
    crit = check["criterion"]
    if "min_sqnr_db" in crit:
        return f"SQNR {check['sqnr_db']:.1f} dB < {crit['min_sqnr_db']} dB"
    return f"max |diff| {check['max_abs_diff']:.3g} beyond atol={crit['atol']:g}, rtol={crit['rtol']:g}"


# ---------------------------------------------------------------------------------------------
# ExecuTorch programs (XNNPACK)
# ---------------------------------------------------------------------------------------------

def _load_torch_source(config: PackageConfig):
    from dlopt.targets.xnnpack import require_executorch

    require_executorch()
    from dlopt.optimize.export import load_source

    return load_source(config.torch_source)


def _build_pte(source, staging: Path, config: PackageConfig, feeds_list, expected, log: Log, model_path: Path):
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
        data = lower_to_pte(source.module, feeds_list[0], input_names=input_names,
                            precision="fp32" if precision == "fp32" else "int8",
                            calibration=calibration if precision == "int8" else None,
                            int8_activations="dynamic" if precision == "int8-dynamic" else "static",
                            weight_rounding=config.pte_weight_rounding, bias_correction=config.pte_bias_correction,
                            report=lowering)
        lower_s = time.perf_counter() - started
        (staging / file_name).write_bytes(data)
        # one thread: the latency is compared with ORT's on one thread (see _measure)
        program = PteProgram(staging / file_name, input_names, threads=1)
        got = [program.run(feeds) for feeds in feeds_list]
        output_names = list(expected[0])
        got = [dict(zip(output_names, outs)) for outs in got]
        floor = config.pte_fp32_min_sqnr_db if precision == "fp32" else config.pte_int8_min_sqnr_db
        checks += _checks(file_name, got, expected, {"min_sqnr_db": floor})
        artifacts.append({"file": file_name, "runtime": f"executorch {_executorch_version()}", "backend": "xnnpack",
                          "precision": precision, "input_names": input_names,
                          "torch_source": config.torch_source, "lower_s": round(lower_s, 2),
                          "calibration_samples": len(calibration) if precision == "int8" else None,
                          "weight_rounding": config.pte_weight_rounding if precision == "int8" else None,
                          "bias_correction": config.pte_bias_correction if precision == "int8" else None,
                          "weight_refinement": lowering.get("weight_refinement")})
        programs.append((f"xnnpack-{precision}", program))
    return artifacts, checks, programs


def _pte_calibration(source, config: PackageConfig, feeds_list, model_path: Path) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for an int8 .pte: --calibration if given, else the reference model's own set
    (at the samples' shapes where it has a sequence axis), else the samples."""
    if "int8" not in config.pte_precisions:
        return []
    shapes = {k: v.shape for k, v in feeds_list[0].items()}
    spec = config.calibration or (f"model:{config.torch_source}" if _is_reference(config.torch_source) else None)
    if spec is None:
        return [dict(f) for f in feeds_list]
    feeds = []
    for sample in _load_calibration(spec, model_path, limit=config.pte_calibration_samples):
        fitted = _fit_to_shapes(sample, shapes)
        if fitted is not None:
            feeds.append(fitted)
    return feeds or [dict(f) for f in feeds_list]


def _is_reference(name: str | None) -> bool:
    from dlopt.models import REFERENCE_MODELS

    return name in REFERENCE_MODELS


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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _threads(config: PackageConfig) -> int:
    """Intra-op threads the bundle is measured with and recommends: --threads, else the target's own
    (phone-like for mobile, 1 otherwise)."""
    if config.threads:
        return config.threads
    if config.target == "mobile":
        from dlopt.targets.mobile import phone_threads

        return phone_threads()
    from dlopt.targets import get_target

    return getattr(get_target(config.target), "default_threads", 1)


def recommended_session(built: Mapping[str, Any], config: PackageConfig) -> dict[str, Any]:
    """The session configuration a bundle recommends to its users: the entries its model must be loaded
    with plus dlopt's own (denormals flushed: see dlopt.runtime), and the threads it was measured with."""
    from dlopt.runtime import SESSION_CONFIG

    return {"session_config": {**SESSION_CONFIG, **built["session_config"]}, "intra_op_num_threads": _threads(config),
            "inter_op_num_threads": 1,
            "first_session_rule": "ONNX Runtime applies session.set_denormal_as_zero to a session's intra-op pool "
                                  "threads, but to the thread that creates sessions only from the process's FIRST "
                                  "session: create a session with it before any other, and call run() from that "
                                  "thread (or set FTZ/DAZ on your own threads)"}


def _measure(model_file: Path, built: Mapping[str, Any], config: PackageConfig, feeds: Mapping[str, np.ndarray],
             pte_programs, log: Log) -> dict[str, Any]:
    """Latency of the packaged model on its target (phone-like threads for mobile), and, with .pte
    programs, ORT and ExecuTorch on one thread measured interleaved (their ratio is the fair number)."""
    from dlopt.bench import InterleavedSampler, machine_fingerprint
    from dlopt.targets import get_target

    target = get_target(config.target)
    metrics: dict[str, Any] = {}
    available, reason = target.is_available()
    if not available:
        log(f"no latency for target {config.target}: {reason}")
        return metrics
    threads = _threads(config)
    handle = target.create_session(model_file, threads=threads) if not built["session_config"] else None
    if handle is None:  # Runtime-style ORT models need their session config: the CPU EP, as the mobile target
        session = _session(model_file, built["session_config"], threads)
        run = lambda: session.run(None, dict(feeds))  # noqa: E731
    else:
        run = target.bind(handle, feeds)
    clock = target.default_clock(threads)
    log(f"measuring {model_file.name} on {config.target} ({threads} thread(s), {config.measure_s:g} s)")
    sampler = InterleavedSampler([run])
    sampler.warm_up(max_seconds=config.measure_s / 2, clock=clock)
    sampler.run_for(config.measure_s / 2, min_rounds=10)
    metrics[config.target] = {
        "artifact": model_file.name, "threads": threads, "clock": clock,
        "latency_ms": sampler.summary(0, clock).as_dict(1e3),
        "note": target.description, "machine": machine_fingerprint(threads, target)}
    if pte_programs:  # loaded with a one-thread ExecuTorch pool (_build_pte)
        one = _session(model_file, built["session_config"], 1)
        runners = [lambda: one.run(None, dict(feeds))] + [(lambda p=p: p.run(feeds)) for _, p in pte_programs]
        log(f"measuring ORT vs ExecuTorch/XNNPACK, one thread, interleaved ({config.measure_s:g} s)")
        sampler = InterleavedSampler(runners)
        sampler.warm_up(max_seconds=config.measure_s / 2, clock="cpu")
        sampler.run_for(config.measure_s, min_rounds=10)
        machine = machine_fingerprint(1)
        metrics["ort-cpu-1thread"] = {"artifact": model_file.name, "threads": 1, "clock": "cpu",
                                      "latency_ms": sampler.summary(0, "cpu").as_dict(1e3),
                                      "note": "ONNX Runtime CPU EP, one thread, baseline of the ratios below",
                                      "machine": machine}
        for k, (label, _) in enumerate(pte_programs, start=1):
            ratio = sampler.ratio(k, "cpu")
            metrics[label] = {"artifact": f"model.{label}.pte", "threads": 1, "clock": "cpu",
                              "latency_ms": sampler.summary(k, "cpu").as_dict(1e3),
                              "ratio_to_ort": {"estimate": ratio.estimate, "low": ratio.low, "high": ratio.high,
                                               "confidence": ratio.confidence},
                              "note": "ExecuTorch XNNPACK backend on this host's CPU (the kernels Android/iOS run)",
                              "machine": machine}
    return metrics


# ---------------------------------------------------------------------------------------------
# Manifest, model card
# ---------------------------------------------------------------------------------------------

def _tensor_infos(values) -> list[dict[str, Any]]:
    from onnx import helper

    infos = []
    for vi in values:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name if tt.elem_type else "unknown"
        infos.append({"name": vi.name, "dtype": dtype, "shape": dims})
    return infos


def _manifest(*, name, config, source_path, source, model, built, fixed, calibration, stage_configs, checks, samples,
              coverage, metrics, artifacts, staging) -> dict[str, Any]:
    import onnxruntime as ort

    from dlopt.targets.mobile import external_data_files

    inits = {t.name for t in model.graph.initializer}
    external = [{"file": loc, "sha256": sha256_file(source_path.parent / loc),
                 "bytes": (source_path.parent / loc).stat().st_size} for loc in external_data_files(
                     load_onnx(source_path, load_external_data=False))]
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dlopt_version": dlopt.__version__,
        "name": name,
        "target": config.target,
        "model": {
            "file": built["file"], "format": built["format"], "intended_ep": built["intended_ep"],
            "optimization_style": built["optimization_style"],
            "graph_optimization_level": built["graph_optimization_level"],
            "session_config": built["session_config"], "operators_config": built["operators_config"],
            "fixed_shapes": {k: list(v) for k, v in fixed.items()},
        },
        "runtime": {"onnxruntime": ort.__version__, "ort_format_version": built["ort_format_version"],
                    "recommended_session": recommended_session(built, config)},
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "inputs": _tensor_infos([i for i in model.graph.input if i.name not in inits]),
        "outputs": _tensor_infos(model.graph.output),
        "source": {"file": source_path.name, "sha256": sha256_file(source_path),
                   "bytes": source_path.stat().st_size, "external_data": external},
        "calibration": calibration,
        "configs": {"package": config_to_dict(config), "stages": stage_configs},
        "files": [],  # filled in last, when every file is written
        "verification": {"passed": all(c["passed"] for c in checks), "samples_file": SAMPLES_NAME,
                         "samples": samples, "checks": checks},
        "coverage": coverage,
        "metrics": metrics,
        "artifacts": artifacts,
        "environment": environment(),
        "signature": None,  # the signer's record when signed (package(sign_key=...))
    }


def _roles(staging: Path, built: Mapping[str, Any], artifacts) -> dict[str, str]:
    roles = {built["file"]: "model", SAMPLES_NAME: "samples", "README.md": "model-card",
             "coverage.json": "coverage-report"}
    if built["operators_config"]:
        roles[built["operators_config"]] = "operators-config"
    roles.update({a["file"]: "executorch-program" for a in artifacts})
    return roles


def _coverage_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    eps = {}
    for ep, cov in report["eps"].items():
        eps[ep] = {k: cov[k] for k in ("supported_nodes", "nodes", "supported_pct", "partitions", "unsupported_ops",
                                        "verdict")}
        fixed = cov.get("if_shapes_fixed")
        if fixed:
            eps[ep]["if_shapes_fixed"] = {k: fixed[k] for k in ("supported_pct", "partitions", "verdict")}
    return {"file": "coverage.json", "eps": eps, "dynamic_inputs": report["dynamic_inputs"],
            "advice": report["advice"]}


def _stage_reports(source_path: Path) -> dict[str, Any]:
    """Configs of the stages that made the model, from their JSON reports beside it (NAME.<stage>.json)."""
    stem = source_path.name[:-5] if source_path.name.endswith(".onnx") else source_path.stem
    found = {}
    for report_path in sorted(source_path.parent.glob(f"{stem}.*.json")):
        stage = report_path.name[len(stem) + 1:-len(".json")]
        try:
            report = json.loads(report_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a stage report
        if not isinstance(report, dict) or "config" not in report:
            continue
        entry = {"report": report_path.name, "sha256": sha256_file(report_path), "config": report["config"]}
        if isinstance(report.get("calibration"), dict):
            entry["calibration"] = report["calibration"]
        found[stage] = entry
    return found


def _load_calibration(spec: str, model_path: Path, limit: int | None = None):
    """The calibration data of MODEL; a folder of images is read for the model's image input."""
    from dlopt.optimize.calibration import load_calibration

    data = load_calibration(spec, limit=limit)
    if data is not None and data.needs_model:
        data.bind(load_onnx(model_path, load_external_data=False))
    return data


def _calibration_record(spec: str | None, model_path: Path) -> dict[str, Any] | None:
    """A content hash of the calibration samples (names, dtypes, shapes, bytes, in order), so the
    same data in another file format or folder hashes the same."""
    if spec is None:
        return None
    import hashlib

    data = _load_calibration(spec, model_path)
    digest = hashlib.sha256()
    count = 0
    for sample in data:
        for key in sorted(sample):
            value = np.ascontiguousarray(sample[key])
            digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.tobytes())
        count += 1
    record: dict[str, Any] = {"source": str(spec), "sha256": digest.hexdigest(), "samples": count,
                              "from": "hashed by dlopt package (content of every sample)"}
    path = Path(spec)
    if path.exists():
        from dlopt.manifest import hash_path

        files = hash_path(path)
        record |= {"bytes": files["bytes"], "files": files["files"]}
    return record


def _loading_section(m: Mapping[str, Any]) -> list[str]:
    """How to load the model with the session configuration it was checked and measured with, in Python
    and C++, and why the process's first session matters (see dlopt.runtime)."""
    model = m["model"]
    recommended = m["runtime"].get("recommended_session") or {"session_config": model["session_config"],
                                                              "intra_op_num_threads": 1, "inter_op_num_threads": 1}
    entries = recommended["session_config"]
    threads = recommended["intra_op_num_threads"]
    python = "".join(f'\nso.add_session_config_entry("{k}", "{v}")' for k, v in entries.items())
    cpp = "".join(f'\nso.AddConfigEntry("{k}", "{v}");' for k, v in entries.items())
    lines = ["## Loading", "",
             f"Recommended session configuration (threads {threads}, one inter-op thread): "
             + ", ".join(f"`{k}={v}`" for k, v in entries.items()) + ".", "",
             "```python", "import onnxruntime as ort", "so = ort.SessionOptions()",
             f"so.intra_op_num_threads = {threads}" + python,
             f'session = ort.InferenceSession("{model["file"]}", so)', "```", "",
             "```cpp", '#include <onnxruntime_cxx_api.h>', "Ort::Env env;", "Ort::SessionOptions so;",
             f"so.SetIntraOpNumThreads({threads});" + cpp,
             f'Ort::Session session(env, ORT_TSTR("{model["file"]}"), so);', "```", ""]
    if "session.set_denormal_as_zero" in entries:
        lines += ["`session.set_denormal_as_zero` flushes denormal floats to zero (padded inputs make Softmax produce "
                  "them, and each costs a slow microcode assist on x86). ONNX Runtime applies it to the session's "
                  "intra-op pool threads, but to the thread that creates sessions only once per process, from the "
                  "**first** session created: make this session (or a tiny one with the same entry) the process's "
                  "first, and call `run()` from that thread. With one intra-op thread the calling thread does all "
                  "the work. On threads of your own, set the MXCSR bits yourself (C++: "
                  "`_MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON); _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);`).",
                  ""]
    return lines


def model_card(manifest: Mapping[str, Any], coverage_report_path: Path | None = None) -> str:
    """README.md of a bundle: what it is, how to load it, how it was checked, how fast it ran where."""
    m = manifest
    model = m["model"]
    lines = [f"# {m['name']} ({m['target']} bundle)", "",
             f"Built by dlopt {m['dlopt_version']} on {m['created']} from `{m['source']['file']}` "
             f"(sha256 `{m['source']['sha256'][:16]}…`). Check it with `dlopt verify <this folder>`.", ""]
    if m.get("signature"):
        lines += [f"Signed: `{m['signature']['file']}` holds an Ed25519 signature of `manifest.json` by the key with "
                  f"fingerprint `{m['signature']['key_fingerprint']}`; check who signed it with "
                  "`dlopt verify <this folder> --trusted-key KEY.pub`.", ""]
    lines += ["## Files", ""]
    lines.append(f"- `{model['file']}`: the model ({model['format'].upper()} format"
                 + (f", ORT format version {m['runtime']['ort_format_version']}, {model['optimization_style']} "
                    f"optimization style for the {model['intended_ep']} EP" if model["format"] == "ort" else "")
                 + f"), written with ONNX Runtime {m['runtime']['onnxruntime']}.")
    if model.get("operators_config"):
        lines.append(f"- `{model['operators_config']}`: operators for a minimal ONNX Runtime build "
                     "(`--minimal_build --include_ops_by_config`).")
    for art in m["artifacts"]:
        lines.append(f"- `{art['file']}`: ExecuTorch program, {art['backend']} backend, {art['precision']}.")
    lines += [f"- `{SAMPLES_NAME}`: sample inputs and the source model's outputs on them.",
              "- `coverage.json`: NNAPI / CoreML coverage." if m["coverage"] else "", ""]
    lines += ["## Inputs and outputs", "",
              format_markdown_table(["", "name", "dtype", "shape"],
                                    [["input", t["name"], t["dtype"], t["shape"]] for t in m["inputs"]]
                                    + [["output", t["name"], t["dtype"], t["shape"]] for t in m["outputs"]]), ""]
    opsets = ", ".join(f"{k} {v}" for k, v in m["opset"].items())
    lines += [f"Opsets: {opsets}.", ""]
    lines += _loading_section(m)
    lines += ["## Verification", "",
              f"Checked against the source ONNX model on {m['verification']['samples']} sample(s) before the bundle "
              "was written:", "",
              format_markdown_table(["artifact", "output", "criterion", "max abs diff", "SQNR dB", "top-1 agree", "ok"],
                                    [[c["artifact"], c["output"], _criterion_text(c["criterion"]),
                                      c.get("max_abs_diff", float("nan")), _num(c.get("sqnr_db")),
                                      _num(c.get("top1_agreement")), c["passed"]]
                                     for c in m["verification"]["checks"]]), ""]
    if m["coverage"]:
        lines += ["## NNAPI / CoreML coverage", "",
                  format_markdown_table(["EP", "supported nodes", "%", "partitions", "unsupported ops", "verdict"],
                                        [[ep, f"{c['supported_nodes']}/{c['nodes']}", c["supported_pct"], c["partitions"],
                                          ", ".join(c["unsupported_ops"]) or "-", c["verdict"]]
                                         for ep, c in m["coverage"]["eps"].items()]), ""]
        lines += [f"- {a}" for a in m["coverage"]["advice"]] + [""]
    if m["metrics"]:
        lines += ["## Latency", "",
                  "Measured on the machine below; these are host CPU numbers, not a phone's.", "",
                  format_markdown_table(["target", "artifact", "threads", "median ms", "p90 ms", "ratio to ORT"],
                                        [[k, v["artifact"], v["threads"], v["latency_ms"]["median"],
                                          v["latency_ms"]["p90"],
                                          _ratio_text(v.get("ratio_to_ort"))] for k, v in m["metrics"].items()]), ""]
        machine = next(iter(m["metrics"].values()))["machine"]
        lines += [f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
                  f"onnxruntime {machine['onnxruntime']}.", ""]
        notes = sorted({v["note"] for v in m["metrics"].values()})
        lines += [f"- {n}" for n in notes] + [""]
    if m["calibration"]:
        lines += ["## Calibration data", "", f"`{m['calibration']['source']}`, sha256 `{m['calibration']['sha256']}`.", ""]
    if m["configs"]["stages"]:
        lines += ["## How the source model was made", ""]
        lines += [f"- {stage}: `{entry['config'].get('type', '?') if isinstance(entry['config'], dict) else '?'}` "
                  f"(report `{entry['report']}`)" for stage, entry in m["configs"]["stages"].items()] + [""]
    return "\n".join(line for line in lines) .replace("\n\n\n", "\n\n")


def _criterion_text(criterion: Mapping[str, float]) -> str:
    if "min_sqnr_db" in criterion:
        return f"SQNR >= {criterion['min_sqnr_db']:g} dB"
    return f"atol {criterion['atol']:g}, rtol {criterion['rtol']:g}"


def _num(value):
    return "-" if value is None else value


def _ratio_text(ratio):
    if not ratio:
        return "-"
    return f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def summary_table(manifest: Mapping[str, Any]) -> str:
    rows = [[c["artifact"], c["output"], _criterion_text(c["criterion"]), c.get("max_abs_diff", float("nan")),
             "inf (identical)" if c.get("sqnr_db") is None and c.get("max_abs_diff") == 0 else _num(c.get("sqnr_db")),
             _num(c.get("top1_agreement")), c["passed"]]
            for c in manifest["verification"]["checks"]]
    return format_table(["artifact", "output", "criterion", "max abs diff", "SQNR dB", "top-1 agree", "ok"], rows)


__all__ = ["PACKAGE_TARGETS", "PackageConfig", "PackageResult", "check_output", "compare", "model_card", "package",
           "read_samples", "summary_table", "validate_config", "verify_outputs"]
