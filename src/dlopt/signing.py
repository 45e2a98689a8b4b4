"""Ed25519 signatures on bundle manifests: who wrote this bundle, not only whether it is intact.

The manifest's hashes catch accidents, but anyone who can edit a bundle can also rewrite its manifest
to match. A signature made with a private key the attacker does not hold closes that gap:
`dlopt package --sign-key KEY` signs the exact bytes of manifest.json and writes the signature to
manifest.sig; `dlopt verify --trusted-key PUB` checks it against a public key the user trusts.

Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key) made by `dlopt keygen`,
so openssl and other tools read them too. A key's fingerprint is the sha256 of its 32 raw public
bytes; the manifest records the signer's fingerprint (covered by the signature). The cryptography
package does the signing: hand-written elliptic-curve code would be a liability.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import InputError
from dlopt.manifest import SIGNATURE_NAME

SIGNATURE_SCHEMA = "dlopt.signature"
ALGORITHM = "ed25519"
PRIVATE_KEY_NAME = "dlopt-signing.key"
PUBLIC_KEY_NAME = "dlopt-signing.pub"


@dataclass(frozen=True)
class SignatureCheck:
    """status: ok | missing | bad (not made by the trusted key over these manifest bytes)."""

    status: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def public_fingerprint(public_key) -> str:
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key_pair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair as PEM files; returns the public key's fingerprint.

    The private key file is created with mode 0600. An existing file at either path is never
    overwritten (InputError): a lost signing key cannot be brought back."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    serialization = _serialization()
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise InputError(f"the private and public key paths are the same ({private_path})", "give two different paths")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InputError(f"key file {path} exists", "keys are never overwritten: choose another path or remove it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"folder {parent} for {path.name} does not exist", "create it first")
        if not os.access(parent, os.W_OK):
            raise InputError(f"folder {parent} is not writable", "choose another path for the keys")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    umask = os.umask(0)
    os.umask(umask)
    _create_exclusive(private_path, private_pem, 0o600)
    try:
        _create_exclusive(public_path, public_pem, 0o644 & ~umask)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return public_fingerprint(key.public_key())


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a private temp file beside `path`, then hard-link it into place: the link fails
    if `path` appeared meanwhile (no overwrite), and `path` is never seen half-written."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise InputError(f"key file {path} exists", "keys are never overwritten: choose another path") from e
    finally:
        tmp.unlink(missing_ok=True)


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist or is not a file", "make a key pair with `dlopt keygen -o DIR`")
    try:
        return p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}", "check its permissions") from e


def load_private_key(path: str | os.PathLike):
    """The Ed25519 private key in the PEM file at `path` (InputError for anything else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_pem(path, "signing key")
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except TypeError as e:  # an encrypted key
        raise InputError(f"signing key {path} is encrypted", "give an unencrypted key, as `dlopt keygen` writes") from e
    except ValueError as e:
        raise InputError(
            f"{path} is not a PEM private key ({e})", "give the private key file `dlopt keygen` wrote (not the .pub)"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"signing key {path} is a {type(key).__name__}, not Ed25519", "make one with `dlopt keygen`")
    _check_private_mode(Path(path))  # after the format: a public key given by mistake is told so first
    return key


def _check_private_mode(path: Path) -> None:
    """A private key others can read is no longer private (ssh refuses such keys too): group and other
    must have no access (0600 or stricter). POSIX only: Windows has no such mode bits."""
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InputError(
            f"signing key {path} is readable by others (mode {mode:04o}); a private key must be 0600 or stricter",
            f"chmod 600 {shlex.quote(str(path))}, or make a new key pair if it leaked",
        )


def load_public_key(path: str | os.PathLike):
    """The Ed25519 public key in the PEM file at `path` (InputError for anything else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_pem(path, "trusted key")
    try:
        key = _serialization().load_pem_public_key(data)
    except ValueError as e:
        raise InputError(
            f"{path} is not a PEM public key ({e})", "give the public key file (.pub) `dlopt keygen` wrote"
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(
            f"trusted key {path} is a {type(key).__name__}, not Ed25519", "give a key made by `dlopt keygen`"
        )
    return key


def signer_record(private_key) -> dict[str, str]:
    """What the manifest says about its signer (the signature covers this too)."""
    return {
        "algorithm": ALGORITHM,
        "key_fingerprint": public_fingerprint(private_key.public_key()),
        "file": SIGNATURE_NAME,
    }


def sign(manifest_bytes: bytes, private_key) -> bytes:
    """The contents of manifest.sig: a small JSON document holding the signature of `manifest_bytes`."""
    signature = private_key.sign(manifest_bytes)
    record = {
        "schema": SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_fingerprint": public_fingerprint(private_key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    return (json.dumps(record, indent=2) + "\n").encode()


def check_signature(
    manifest_bytes: bytes, manifest: dict[str, Any], signature_path: Path, trusted_key
) -> SignatureCheck:
    """Is `manifest_bytes` signed by `trusted_key`? The signature decides; the recorded fingerprints
    only make the message say whether another key signed or the manifest changed after signing."""
    from cryptography.exceptions import InvalidSignature

    trusted = public_fingerprint(trusted_key)
    if signature_path.is_symlink():  # the bundle's own signature, not one borrowed from elsewhere
        return SignatureCheck("bad", f"{signature_path.name} is a symlink (to {os.readlink(signature_path)})")
    if not signature_path.is_file():
        return SignatureCheck("missing", f"the bundle is not signed ({signature_path.name} is missing)")
    try:
        record = json.loads(signature_path.read_bytes())
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, TypeError, KeyError) as e:
        return SignatureCheck("bad", f"{signature_path.name} is damaged ({type(e).__name__})")
    try:
        trusted_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        claimed = record.get("key_fingerprint") if isinstance(record, dict) else None
        if isinstance(claimed, str) and claimed != trusted:
            return SignatureCheck(
                "bad", f"signed by another key ({claimed[:16]}…), not the trusted key ({trusted[:16]}…)"
            )
        return SignatureCheck("bad", "the signature does not match: manifest.json changed after it was signed")
    recorded = (manifest.get("signature") or {}).get("key_fingerprint")
    if recorded != trusted:  # a valid signature over a manifest naming another signer: refuse the contradiction
        return SignatureCheck("bad", f"the manifest names signer {recorded!r}, not the trusted key ({trusted[:16]}…)")
    return SignatureCheck("ok", f"signed by the trusted key ({trusted[:16]}…)")


__all__ = [
    "ALGORITHM",
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGNATURE_NAME",
    "SignatureCheck",
    "check_signature",
    "generate_key_pair",
    "load_private_key",
    "load_public_key",
    "public_fingerprint",
    "sign",
    "signer_record",
]
