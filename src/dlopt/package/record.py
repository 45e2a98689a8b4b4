"""The manifest's content: tensors, files and their roles, the coverage summary, the stage reports
and calibration data that made the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import dlopt
from dlopt.fileio import load_onnx
from dlopt.manifest import SAMPLES_NAME, SCHEMA_NAME, SCHEMA_VERSION, sha256_file
from dlopt.package.checks import load_calibration
from dlopt.package.measure import recommended_session
from dlopt.stage import config_to_dict
from dlopt.tables import environment


def tensor_infos(values) -> list[dict[str, Any]]:
    """Name, dtype and shape (dim_param names for symbolic axes) of each ONNX ValueInfo."""
    from onnx import helper

    infos = []
    for vi in values:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name if tt.elem_type else "unknown"
        infos.append({"name": vi.name, "dtype": dtype, "shape": dims})
    return infos


def build_manifest(
    *,
    name,
    config,
    source_path,
    source,
    model,
    built,
    fixed,
    calibration,
    stage_configs,
    checks,
    samples,
    coverage,
    metrics,
    artifacts,
    staging,
) -> dict[str, Any]:
    """The manifest's content; its file entries are filled in last, once every file is written."""
    import onnxruntime as ort

    from dlopt.targets.mobile import external_data_files

    inits = {t.name for t in model.graph.initializer}
    external = [
        {
            "file": loc,
            "sha256": sha256_file(source_path.parent / loc),
            "bytes": (source_path.parent / loc).stat().st_size,
        }
        for loc in external_data_files(load_onnx(source_path, load_external_data=False))
    ]
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dlopt_version": dlopt.__version__,
        "name": name,
        "target": config.target,
        "model": {
            "file": built["file"],
            "format": built["format"],
            "intended_ep": built["intended_ep"],
            "optimization_style": built["optimization_style"],
            "graph_optimization_level": built["graph_optimization_level"],
            "session_config": built["session_config"],
            "operators_config": built["operators_config"],
            "fixed_shapes": {k: list(v) for k, v in fixed.items()},
        },
        "runtime": {
            "onnxruntime": ort.__version__,
            "ort_format_version": built["ort_format_version"],
            "recommended_session": recommended_session(built, config),
        },
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "inputs": tensor_infos([i for i in model.graph.input if i.name not in inits]),
        "outputs": tensor_infos(model.graph.output),
        "source": {
            "file": source_path.name,
            "sha256": sha256_file(source_path),
            "bytes": source_path.stat().st_size,
            "external_data": external,
        },
        "calibration": calibration,
        "configs": {"package": config_to_dict(config), "stages": stage_configs},
        "files": [],  # filled in last, when every file is written
        "verification": {
            "passed": all(c["passed"] for c in checks),
            "samples_file": SAMPLES_NAME,
            "samples": samples,
            "checks": checks,
        },
        "coverage": coverage,
        "metrics": metrics,
        "artifacts": artifacts,
        "environment": environment(),
        "signature": None,  # the signer's record when signed (package(sign_key=...))
    }


def file_roles(staging: Path, built: Mapping[str, Any], artifacts) -> dict[str, str]:
    """The manifest's role of each bundle file (model, samples, model-card, ...)."""
    roles = {
        built["file"]: "model",
        SAMPLES_NAME: "samples",
        "README.md": "model-card",
        "coverage.json": "coverage-report",
    }
    if built["operators_config"]:
        roles[built["operators_config"]] = "operators-config"
    roles.update({a["file"]: "executorch-program" for a in artifacts})
    return roles


def coverage_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's digest of a mobile coverage report (per EP: supported share, partitions, verdict)."""
    eps = {}
    for ep, cov in report["eps"].items():
        eps[ep] = {
            k: cov[k] for k in ("supported_nodes", "nodes", "supported_pct", "partitions", "unsupported_ops", "verdict")
        }
        fixed = cov.get("if_shapes_fixed")
        if fixed:
            eps[ep]["if_shapes_fixed"] = {k: fixed[k] for k in ("supported_pct", "partitions", "verdict")}
    return {"file": "coverage.json", "eps": eps, "dynamic_inputs": report["dynamic_inputs"], "advice": report["advice"]}


def stage_reports(source_path: Path) -> dict[str, Any]:
    """Configs of the stages that made the model, from their JSON reports beside it (NAME.<stage>.json)."""
    stem = source_path.name[:-5] if source_path.name.endswith(".onnx") else source_path.stem
    found = {}
    for report_path in sorted(source_path.parent.glob(f"{stem}.*.json")):
        stage = report_path.name[len(stem) + 1 : -len(".json")]
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


def calibration_record(spec, model_path: Path) -> dict[str, Any] | None:
    """A content hash of the calibration samples (names, dtypes, shapes, bytes, in order), so the
    same data in another file format or folder hashes the same."""
    if spec is None:
        return None
    import hashlib

    data = load_calibration(spec, model_path)
    digest = hashlib.sha256()
    count = 0
    for sample in data:
        for key in sorted(sample):
            value = np.ascontiguousarray(sample[key])
            digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.tobytes())
        count += 1
    record: dict[str, Any] = {
        "source": str(spec),
        "sha256": digest.hexdigest(),
        "samples": count,
        "from": "hashed by dlopt package (content of every sample)",
    }
    path = Path(str(spec))  # a DataSpec's text is its source
    if path.exists():
        from dlopt.manifest import hash_path

        files = hash_path(path)
        record |= {"bytes": files["bytes"], "files": files["files"]}
    return record
