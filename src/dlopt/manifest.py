"""The bundle manifest: what a `dlopt package` bundle holds, what made it, and how to check it.

A manifest is the record that lets someone who receives a bundle answer "what is this, where did it
come from, is it intact, and how fast was it where?" without the machine that built it:
- every file of the bundle with its size and sha256 (`dlopt verify` re-hashes them, and treats a
  file that is not listed as tampering too);
- the ONNX Runtime version and ORT-format version that wrote the model, its opsets, inputs and outputs;
- the configs that produced it (the package config plus the stage reports found beside the source),
  the source model's sha256, the calibration data's hash;
- verification results and metrics per target, each with the machine fingerprint it was measured on;
- with `dlopt package --sign-key`, the signer's key fingerprint: manifest.sig beside it holds an
  Ed25519 signature of the manifest's exact bytes (dlopt.signing). The hashes prove integrity only;
  the signature, checked with `dlopt verify --trusted-key`, proves origin.

The JSON Schema is `dlopt/schemas/manifest.schema.json`. Version 1; a compatible change (a new
optional field) keeps the version, a removed or re-meant field raises it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from dlopt.errors import InputError, VerificationError

SCHEMA_NAME = "dlopt.manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # dlopt.signing: made after the manifest, so not listed in it
SAMPLES_NAME = "samples.npz"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """One digest over several files (e.g. a calibration folder): their paths relative to `root`
    and their contents, in sorted order, so renaming or editing any of them changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def hash_path(path: str | os.PathLike) -> dict[str, Any]:
    """sha256 and byte count of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        return {
            "path": str(p),
            "sha256": sha256_files(files, p),
            "bytes": sum(f.stat().st_size for f in files),
            "files": len(files),
        }
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size, "files": 1}
    raise InputError(f"{p} does not exist", "check the path")


def file_entries(bundle: Path, roles: dict[str, str]) -> list[dict[str, Any]]:
    """Every file under `bundle` except the manifest, with its role, size and sha256, sorted by path."""
    entries = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel in (MANIFEST_NAME, SIGNATURE_NAME):
            continue
        entries.append(
            {"path": rel, "role": roles.get(rel, "other"), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return entries


def load_schema() -> dict[str, Any]:
    text = resources.files("dlopt").joinpath("schemas/manifest.schema.json").read_text()
    return json.loads(text)


def validate(manifest: dict[str, Any]) -> list[str]:
    """Problems with `manifest` against the schema (empty when valid).

    With jsonschema installed (the `dev` extra), the full JSON Schema is checked; without it, the
    fields `dlopt verify` relies on are checked, so a missing jsonschema never passes a broken bundle."""
    try:
        import jsonschema
    except ModuleNotFoundError:
        return _validate_required(manifest)
    validator = jsonschema.Draft202012Validator(load_schema())
    problems = []
    for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message}")
    return problems


def _validate_required(manifest: dict[str, Any]) -> list[str]:
    schema = load_schema()
    problems = [f"(top level): missing {key!r}" for key in schema["required"] if key not in manifest]
    if manifest.get("schema") != SCHEMA_NAME:
        problems.append(f"schema: expected {SCHEMA_NAME!r}, got {manifest.get('schema')!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SCHEMA_VERSION}, got {manifest.get('schema_version')!r}")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and {"path", "bytes", "sha256"} <= set(f) for f in files
    ):
        problems.append("files: expected a list of {path, bytes, sha256} entries")
    return problems


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a bundle folder, parsed and schema-checked (see `read_manifest_bytes`)."""
    return read_manifest_bytes(bundle)[1]


def read_manifest_bytes(bundle: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """The manifest's exact bytes (what a signature covers) and, parsed from those same bytes and
    schema-checked, the manifest.

    A missing folder is the user's input error (exit 2); a folder without a readable, valid manifest
    is a bundle that fails verification (exit 1): it was tampered with or is not a bundle."""
    root = Path(bundle)
    if not root.exists():
        raise InputError(f"bundle {root} does not exist", "give the folder `dlopt package -o` wrote")
    if not root.is_dir():
        raise InputError(f"bundle {root} is not a folder", "give the folder `dlopt package -o` wrote")
    path = root / MANIFEST_NAME
    if path.is_symlink():  # a link can point anywhere: the bundle would vouch for a file it does not hold
        raise VerificationError(
            f"{path} is a symlink (to {os.readlink(path)})", "a bundle holds its own manifest; package again"
        )
    if not path.is_file():
        raise VerificationError(f"{path} is missing", "this is not a dlopt bundle, or its manifest was removed")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{path} is not valid JSON ({e})", "the manifest was damaged; package again") from e
    if not isinstance(manifest, dict):
        raise VerificationError(f"{path} is not a JSON object", "the manifest was damaged; package again")
    problems = validate(manifest)
    if problems:
        raise VerificationError(
            f"{path} does not match the manifest schema: {'; '.join(problems[:5])}",
            "the manifest was damaged or written by another dlopt version",
        )
    return raw, manifest


def path_problem(bundle: Path, rel: Any) -> str | None:
    """What is wrong with a path the manifest names, else None: it must be relative, stay inside the
    bundle and go through no symlink (a link makes the bundle vouch for a file outside it)."""
    if not isinstance(rel, str) or not rel:
        return "not a path"
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        return "path leaves the bundle"
    current = bundle
    for part in parts:
        current = current / part
        if current.is_symlink():
            return f"{current.relative_to(bundle).as_posix()} is a symlink (to {os.readlink(current)})"
    return None


def named_paths(manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest points verify at besides its file list: the model, the samples, each program."""
    named = [manifest.get("model", {}).get("file"), manifest.get("verification", {}).get("samples_file")]
    named += [a.get("file") for a in manifest.get("artifacts", []) if isinstance(a, dict)]
    return [n for n in named if n is not None]


def check_files(bundle: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per file, listed or found: {path, status, detail}; status is ok, missing, changed
    (size or sha256 differ) or unlisted (a file in the bundle that the manifest does not name)."""
    rows = []
    listed = set()
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        path = bundle / rel
        outside = path_problem(bundle, rel)
        if outside:
            rows.append({"path": rel, "status": "changed", "detail": outside})
        elif not path.is_file():
            rows.append({"path": rel, "status": "missing", "detail": f"listed with {entry['bytes']} bytes"})
        elif path.stat().st_size != entry["bytes"]:
            rows.append(
                {
                    "path": rel,
                    "status": "changed",
                    "detail": f"{path.stat().st_size} bytes, manifest says {entry['bytes']}",
                }
            )
        else:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                rows.append(
                    {
                        "path": rel,
                        "status": "changed",
                        "detail": f"sha256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…",
                    }
                )
            else:
                rows.append({"path": rel, "status": "ok", "detail": f"{entry['bytes']} bytes"})
    for rel in named_paths(manifest):  # the model verify runs must be a hashed file of this bundle
        if rel not in listed:
            listed.add(rel)
            rows.append(
                {
                    "path": str(rel),
                    "status": "changed",
                    "detail": path_problem(bundle, rel) or "named by the manifest but not in its file list",
                }
            )
    signature = bundle / SIGNATURE_NAME
    if signature.is_symlink():
        rows.append({"path": SIGNATURE_NAME, "status": "changed", "detail": f"a symlink (to {os.readlink(signature)})"})
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(bundle).as_posix()
        if rel not in (MANIFEST_NAME, SIGNATURE_NAME) and rel not in listed:
            rows.append({"path": rel, "status": "unlisted", "detail": "not in the manifest"})
    return rows


def artifact_hash(model_path: Path) -> str:
    """sha256 of an ONNX file and its external data files (in order), of a torch checkpoint, or of a bundle
    folder."""
    if model_path.is_dir():
        return hash_path(model_path)["sha256"]
    if model_path.suffix == ".pt":
        return sha256_file(model_path)
    from dlopt.fileio import external_data_files, load_onnx  # loads nothing of this module: no cycle

    external = external_data_files(load_onnx(model_path, load_external_data=False))
    if not external:
        return sha256_file(model_path)
    import hashlib

    digest = hashlib.sha256(sha256_file(model_path).encode())
    for name in external:
        digest.update(name.encode() + b"\0" + sha256_file(model_path.parent / name).encode())
    return digest.hexdigest()


__all__ = [
    "MANIFEST_NAME",
    "SAMPLES_NAME",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "artifact_hash",
    "check_files",
    "file_entries",
    "hash_path",
    "load_schema",
    "read_manifest",
    "read_manifest_bytes",
    "sha256_file",
    "sha256_files",
    "validate",
]
