"""The bundle folder: where it may go, how an existing one is replaced atomically, and leftovers of
killed runs recovered.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dlopt.errors import InputError
from dlopt.manifest import MANIFEST_NAME, SCHEMA_NAME


def check_bundle_path(out: Path, overwrite: bool) -> Path:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable", "choose another -o path")
    if out.is_symlink():  # replacing it would replace the link, or leave the old bundle aside under its name
        raise InputError(
            f"bundle path {out} is a symlink (to {os.readlink(out)})", "give the folder itself as -o, not a link to it"
        )
    _recover_killed_runs(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"bundle path {out} is a file", "give a folder name for the bundle")
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(
                    f"bundle folder {out} exists and is not empty", "pass {overwrite}, or choose another {output=DIR}"
                )
            if not is_bundle(out):
                raise InputError(
                    f"{{overwrite}}: {out} is not a dlopt bundle (no manifest.json written by dlopt "
                    "package), so it is not replaced",
                    "choose another {output=DIR}, or empty the folder yourself",
                )
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
    from dlopt.fileio import record_written, signals_held, usual_permissions

    usual_permissions(staging)
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
