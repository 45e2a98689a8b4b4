"""`dlopt verify BUNDLE/`: is this bundle what its manifest says, and does its model still compute
what the source model computed?

1. The manifest is read and checked against its JSON Schema.
2. With a trusted public key, the manifest's signature (manifest.sig) must be that key's signature
   of the manifest's exact bytes. Without one, nothing proves who wrote the manifest: whoever can
   change the bundle can rewrite its hashes and samples too, so the check is of integrity (accidents),
   not origin.
3. Every file is re-hashed: a missing file, a changed byte (size or sha256) or a file the manifest
   does not list is a failure.
4. Only when the signature (if checked) and every file are intact, the model (and each .pte program,
   where ExecuTorch is installed) is run on the stored sample inputs and compared with the source
   model's stored outputs. The tolerance is verify's own (`Tolerance`: the package defaults, or the
   caller's atol/rtol); the criterion recorded in the manifest can only tighten it, never loosen it,
   because an unsigned manifest is editable by anyone. A model that no longer loads is a failure, not
   a crash.
`verify_bundle` returns the whole report; `verification_error(result)` is the VerificationError
(exit code 1) a failure is reported with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlopt.errors import InputError, VerificationError, render
from dlopt.manifest import SIGNATURE_NAME, check_files, read_manifest_bytes
from dlopt.package import PackageConfig
from dlopt.report import format_table
from dlopt.signing import SignatureCheck


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """What verify accepts. The ORT model: allclose within atol/rtol (by default `dlopt package`'s
    own defaults, a lossless conversion). A .pte program: an SQNR floor per precision, as at packaging.
    `explicit`: the user chose atol/rtol, so they are used as given; otherwise a tighter criterion
    recorded in the manifest is used instead, a looser one never."""

    atol: float = PackageConfig.atol
    rtol: float = PackageConfig.rtol
    explicit: bool = False
    pte_fp32_min_sqnr_db: float = PackageConfig.pte_fp32_min_sqnr_db
    pte_int8_min_sqnr_db: float = PackageConfig.pte_int8_min_sqnr_db

    def __post_init__(self):
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {value}", f"pass e.g. {{{name}=1e-4}}")

    def model_criterion(self, recorded: Mapping[str, Any] | None) -> dict[str, float]:
        criterion = {"atol": self.atol, "rtol": self.rtol}
        if not self.explicit:
            for key in criterion:
                value = _number(recorded, key)
                if value is not None and value >= 0:
                    criterion[key] = min(criterion[key], value)
        return criterion

    def pte_criterion(self, precision: Any, recorded: Mapping[str, Any] | None) -> dict[str, float]:
        # an unknown precision gets the strictest floor; the label is only as trustworthy as the manifest
        floor = self.pte_int8_min_sqnr_db if precision in ("int8", "int8-dynamic") else self.pte_fp32_min_sqnr_db
        value = _number(recorded, "min_sqnr_db")
        return {"min_sqnr_db": max(floor, value) if value is not None else floor}


def _number(recorded: Mapping[str, Any] | None, key: str) -> float | None:
    value = recorded.get(key) if isinstance(recorded, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class VerifyResult:
    bundle: Path
    manifest: dict[str, Any]
    files: list[dict[str, Any]]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    signature: SignatureCheck | None = None  # None: no trusted key given, origin not checked

    @property
    def passed(self) -> bool:
        return (all(f["status"] == "ok" for f in self.files) and all(o["passed"] for o in self.outputs)
                and (self.signature is None or self.signature.passed))

    def problems(self) -> list[str]:
        found = [] if self.signature is None or self.signature.passed else [f"signature: {self.signature.detail}"]
        found += [f"{f['path']}: {f['status']} ({f['detail']})" for f in self.files if f["status"] != "ok"]
        found += [f"{o['artifact']} {o['output']}: {o.get('detail') or 'outputs differ'}"
                  for o in self.outputs if not o["passed"]]
        return found


def verify_bundle(bundle: str | os.PathLike, *, check_outputs: bool = True,
                  trusted_key: str | os.PathLike | None = None, tolerance: Tolerance = Tolerance()) -> VerifyResult:
    """Check a bundle; returns the full result (see `passed`). `trusted_key`: a public key PEM
    (`dlopt keygen`); the manifest must carry its signature. Raises InputError for a path that is not
    a folder or an unreadable key, VerificationError only for a manifest that cannot be read at all."""
    root = Path(bundle)
    key = None
    if trusted_key is not None:
        from dlopt.signing import load_public_key

        key = load_public_key(trusted_key)
    raw, manifest = read_manifest_bytes(root)
    signature = None
    if key is not None:
        from dlopt.signing import check_signature

        signature = check_signature(raw, manifest, root / SIGNATURE_NAME, key)
    files = check_files(root, manifest)
    result = VerifyResult(bundle=root, manifest=manifest, files=files, signature=signature)
    if not check_outputs:
        return result
    if signature is not None and not signature.passed:
        result.skipped.append("outputs not re-checked: the manifest is not signed by the trusted key")
        return result
    if any(f["status"] != "ok" for f in files):
        result.skipped.append("outputs not re-checked: files failed their hash check")
        return result
    result.outputs.extend(_check_model(root, manifest, tolerance))
    for artifact in manifest.get("artifacts", []):
        rows, skipped = _check_pte(root, manifest, artifact, tolerance)
        result.outputs.extend(rows)
        if skipped:
            result.skipped.append(skipped)
    return result


def _recorded_criteria(manifest: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    return {(c["artifact"], c["output"]): c["criterion"] for c in manifest["verification"]["checks"]}


def _recorded_criterion(manifest: dict[str, Any], artifact: str) -> dict[str, Any] | None:
    """The tightest criterion the manifest records for `artifact` (only ever used to tighten)."""
    found = [c for (a, _), c in _recorded_criteria(manifest).items() if a == artifact and isinstance(c, dict)]
    if not found:
        return None
    tightest: dict[str, Any] = {}
    for key, pick in (("atol", min), ("rtol", min), ("min_sqnr_db", max)):
        values = [v for v in (_number(c, key) for c in found) if v is not None]
        if values:
            tightest[key] = pick(values)
    return tightest


def _check_model(root: Path, manifest: dict[str, Any], tolerance: Tolerance) -> list[dict[str, Any]]:
    from dlopt.package import read_samples, verify_outputs

    model = manifest["model"]
    inputs, expected = read_samples(root / manifest["verification"]["samples_file"])
    criterion = tolerance.model_criterion(_recorded_criterion(manifest, model["file"]))
    try:
        return verify_outputs(root / model["file"], model["session_config"], inputs, expected, criterion,
                              artifact=model["file"])
    except VerificationError as e:
        return [{"artifact": model["file"], "output": "-", "passed": False, "detail": e.message}]
    except Exception as e:  # a damaged model can fail inside onnxruntime in many ways
        return [{"artifact": model["file"], "output": "-", "passed": False,
                 "detail": f"running it failed: {type(e).__name__}: {str(e)[:200]}"}]


def _check_pte(root: Path, manifest: dict[str, Any], artifact: dict[str, Any],
               tolerance: Tolerance) -> tuple[list[dict[str, Any]], str | None]:
    from dlopt.package import read_samples
    from dlopt.package.checks import _checks
    from dlopt.targets.xnnpack import executorch_status

    ok, reason = executorch_status()
    if not ok:
        return [], f"{artifact['file']}: not run ({reason}; pip install 'dlopt[mobile]'); its hash was checked"
    from dlopt.targets.xnnpack import PteProgram

    inputs, expected = read_samples(root / manifest["verification"]["samples_file"])
    criterion = tolerance.pte_criterion(artifact.get("precision"),
                                        _recorded_criterion(manifest, artifact["file"]))
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
        from dlopt.package.checks import _check_text

        rows = [[o["artifact"], o["output"], o.get("max_abs_diff", "-"),
                 "-" if o.get("sqnr_db") is None else o["sqnr_db"], "ok" if o["passed"] else _check_text(o)]
                for o in result.outputs]
        lines += ["", format_table(["artifact", "output", "max abs diff", "SQNR dB", "result"], rows)]
    lines += [f"note: {s}" for s in result.skipped]
    return "\n".join(lines)


def origin_text(result: VerifyResult, audience: str = "api") -> str:
    """One line on who wrote the manifest: checked against the trusted key, or plainly not checked.
    `audience`: "api" or "cli", how the option it suggests is spelled (dlopt.errors.render)."""
    if result.signature is not None:
        return f"signature: {result.signature.detail}"
    signer = result.manifest.get("signature")
    named = (f"; the manifest names signer {signer['key_fingerprint'][:16]}…, check it with {{trusted_key=KEY.pub}}"
             if isinstance(signer, dict) and "key_fingerprint" in signer else "")
    return render("note: integrity only: the files match the manifest, but nothing checked who wrote the manifest "
                  f"(anyone who can edit the bundle can rewrite it){named}", audience)


def verification_error(result: VerifyResult) -> VerificationError:
    """The error a failed verification is reported with: the first problems, and what to do."""
    problems = result.problems()
    return VerificationError(f"bundle {result.bundle} failed verification: {'; '.join(problems[:4])}"
                             + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
                             "do not ship it; package it again from the source model")


def verified_text(result: VerifyResult) -> str:
    """The one line that says a bundle passed: what it holds, what built it, whether its origin was checked."""
    m = result.manifest
    origin = "signed by the trusted key" if result.signature is not None else "integrity only, origin not checked"
    return (f"ok: {result.bundle} ({m['name']}, {m['target']}, {len(result.files)} files, built by dlopt "
            f"{m['dlopt_version']} with onnxruntime {m['runtime']['onnxruntime']}; {origin})")


__all__ = ["Tolerance", "VerifyResult", "format_result", "origin_text", "verification_error", "verified_text",
           "verify_bundle"]
