"""`dlopt verify BUNDLE/`: is this bundle what its manifest says, and does its model still compute
what the source model computed?

1. The manifest is read and checked against its JSON Schema.
2. Every file is re-hashed: a missing file, a changed byte (size or sha256) or a file the manifest
   does not list is a failure.
3. Only when every file is intact, the model (and each .pte program, where ExecuTorch is installed)
   is run on the stored sample inputs and compared with the source model's stored outputs under the
   criterion the manifest recorded. A model that no longer loads is a failure, not a crash.
Any failure raises VerificationError (exit code 1) after the whole report is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlopt.errors import VerificationError
from dlopt.manifest import check_files, read_manifest
from dlopt.report import format_table


@dataclass(frozen=True)
class VerifyResult:
    bundle: Path
    manifest: dict[str, Any]
    files: list[dict[str, Any]]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f["status"] == "ok" for f in self.files) and all(o["passed"] for o in self.outputs)

    def problems(self) -> list[str]:
        found = [f"{f['path']}: {f['status']} ({f['detail']})" for f in self.files if f["status"] != "ok"]
        found += [f"{o['artifact']} {o['output']}: {o.get('detail') or 'outputs differ'}"
                  for o in self.outputs if not o["passed"]]
        return found


def verify_bundle(bundle: str | os.PathLike, *, check_outputs: bool = True) -> VerifyResult:
    """Check a bundle; returns the full result (see `passed`). Raises InputError for a path that is not
    a folder, VerificationError only for a manifest that cannot be read at all."""
    root = Path(bundle)
    manifest = read_manifest(root)
    files = check_files(root, manifest)
    result = VerifyResult(bundle=root, manifest=manifest, files=files)
    if not check_outputs:
        return result
    if any(f["status"] != "ok" for f in files):
        result.skipped.append("outputs not re-checked: files failed their hash check")
        return result
    result.outputs.extend(_check_model(root, manifest))
    for artifact in manifest.get("artifacts", []):
        rows, skipped = _check_pte(root, manifest, artifact)
        result.outputs.extend(rows)
        if skipped:
            result.skipped.append(skipped)
    return result


def _recorded_criteria(manifest: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    return {(c["artifact"], c["output"]): c["criterion"] for c in manifest["verification"]["checks"]}


def _check_model(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    from dlopt.package import read_samples, verify_outputs

    model = manifest["model"]
    inputs, expected = read_samples(root / manifest["verification"]["samples_file"])
    criteria = _recorded_criteria(manifest)
    criterion = next((c for (a, _), c in criteria.items() if a == model["file"]), None)
    if criterion is None:
        return [{"artifact": model["file"], "output": "-", "passed": False,
                 "detail": "the manifest records no criterion for the model"}]
    try:
        return verify_outputs(root / model["file"], model["session_config"], inputs, expected, criterion,
                              artifact=model["file"])
    except VerificationError as e:
        return [{"artifact": model["file"], "output": "-", "passed": False, "detail": e.message}]
    except Exception as e:  # a damaged model can fail inside onnxruntime in many ways
        return [{"artifact": model["file"], "output": "-", "passed": False,
                 "detail": f"running it failed: {type(e).__name__}: {str(e)[:200]}"}]


def _check_pte(root: Path, manifest: dict[str, Any], artifact: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    from dlopt.package import _checks, read_samples
    from dlopt.targets.xnnpack import executorch_status

    ok, reason = executorch_status()
    if not ok:
        return [], f"{artifact['file']}: not run ({reason}; pip install 'dlopt[mobile]'); its hash was checked"
    from dlopt.targets.xnnpack import PteProgram

    inputs, expected = read_samples(root / manifest["verification"]["samples_file"])
    criteria = _recorded_criteria(manifest)
    criterion = next((c for (a, _), c in criteria.items() if a == artifact["file"]), None)
    if criterion is None:
        return [{"artifact": artifact["file"], "output": "-", "passed": False,
                 "detail": "the manifest records no criterion for it"}], None
    try:
        program = PteProgram(root / artifact["file"], artifact["input_names"])
        names = list(expected[0])
        got = [dict(zip(names, program.run(feeds))) for feeds in inputs]
    except Exception as e:  # noqa: BLE001 - a damaged program must fail verification, not crash it
        return [{"artifact": artifact["file"], "output": "-", "passed": False,
                 "detail": f"running it failed: {type(e).__name__}: {str(e)[:200]}"}], None
    return _checks(artifact["file"], got, expected, criterion), None


def format_result(result: VerifyResult) -> str:
    lines = [format_table(["file", "status", "detail"], [[f["path"], f["status"], f["detail"]] for f in result.files])]
    if result.outputs:
        from dlopt.package import _check_text

        rows = [[o["artifact"], o["output"], o.get("max_abs_diff", "-"),
                 "-" if o.get("sqnr_db") is None else o["sqnr_db"], "ok" if o["passed"] else _check_text(o)]
                for o in result.outputs]
        lines += ["", format_table(["artifact", "output", "max abs diff", "SQNR dB", "result"], rows)]
    lines += [f"note: {s}" for s in result.skipped]
    return "\n".join(lines)


__all__ = ["VerifyResult", "format_result", "verify_bundle"]
