"""A content-addressed cache of stage outputs (`dlopt run`, `dlopt cache`).

An entry is a folder `<cache dir>/<key>/` named by the sha256 of everything that decides the stage's
output: the input artifact's bytes, the stage's config dict, the data's hash and the host facts that
change the result (see dlopt.recipe.key_inputs). It holds the stage's artifact (`model.onnx` with its
JSON report, or a `bundle/` folder) and `entry.json` (the key's inputs, when it was made, its size, the
stage's report). Entries are built in a hidden staging folder and renamed into place, so a crash never
leaves half an entry under a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import InputError
from dlopt.fileio import json_text

ENTRY_NAME = "entry.json"
CACHE_FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    """$DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages."""
    env = os.environ.get("DLOPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dlopt" / "stages"


def cache_key(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's key inputs (sorted keys, no whitespace)."""
    text = json.dumps({"cache_format": CACHE_FORMAT, **inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    info: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.info.get("kind", "?")

    @property
    def bytes(self) -> int:
        return int(self.info.get("bytes", 0))

    @property
    def created(self) -> float:
        return float(self.info.get("created_unix", 0.0))


class StageCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the cache folder {self.root}: {e.strerror or e}",
                             "pass a writable {cache_dir=DIR} (or set DLOPT_CACHE_DIR)") from e

    def get(self, key: str) -> Entry | None:
        path = self.root / key
        try:
            info = json.loads((path / ENTRY_NAME).read_text())
        except (OSError, ValueError):
            return None  # absent, or not an entry this dlopt wrote
        return Entry(key, path, info) if isinstance(info, dict) else None

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """A private staging folder for a new entry; renamed to the key's folder when the block succeeds,
        removed when it fails. The block writes the artifact; the caller then calls `commit`."""
        self._ensure_root()
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.building-{os.getpid()}-", dir=self.root))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after commit's rename; removed on failure

    def commit(self, key: str, staging: Path, info: Mapping[str, Any]) -> Entry:
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        now = time.time()
        info = {**info, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "created_unix": now, "bytes": size}
        (staging / ENTRY_NAME).write_text(json_text(info))
        target = self.root / key
        if target.exists():  # a forced re-run, or another process made it meanwhile: the newer one wins
            old = self.root / f".{key[:16]}.old-{os.getpid()}-{int(now * 1e6)}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, target)
        return Entry(key, target, dict(info))

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        found = [self.get(p.name) for p in self.root.iterdir() if _KEY.match(p.name)]
        return sorted((e for e in found if e is not None), key=lambda e: e.created)

    def remove(self, entry: Entry) -> None:
        # renamed away first, so that a reader never sees a half-removed entry under its key
        trash = self.root / f".{entry.key[:16]}.removing-{os.getpid()}"
        os.rename(entry.path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, *, older_than_s: float | None = None, max_bytes: int | None = None,
              everything: bool = False) -> list[Entry]:
        """Remove entries older than `older_than_s`, then the oldest until the rest fit in `max_bytes`
        (or all of them); returns what was removed."""
        entries = self.entries()  # oldest first
        now = time.time()
        doomed = list(entries) if everything else [e for e in entries if older_than_s is not None
                                                    and now - e.created > older_than_s]
        if max_bytes is not None and not everything:
            kept = [e for e in entries if e not in doomed]
            total = sum(e.bytes for e in kept)
            for e in kept:
                if total <= max_bytes:
                    break
                doomed.append(e)
                total -= e.bytes
        for e in doomed:
            self.remove(e)
        return doomed


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '512MiB' -> 536870912."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise InputError(f"size {text!r} is not a size", "e.g. {max_size=2GB} or 500MB")
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not size < 2**63:  # 400 digits read as infinity
        raise InputError(f"size {text.strip()[:20]}… is too large", "e.g. {max_size=2GB} or 500MB")
    return int(size)


def parse_age(text: str) -> float:
    """'7d' -> seconds; units s, m, h, d, w."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw])\s*", text)
    if not m:
        raise InputError(f"age {text!r} is not an age", "e.g. {older_than=7d} (units s, m, h, d, w)")
    age = float(m.group(1)) * _AGE_UNITS[m.group(2)]
    if not math.isfinite(age):  # 400 digits read as infinity
        raise InputError(f"age {text.strip()[:20]}… is too large", "e.g. {older_than=7d} (units s, m, h, d, w)")
    return age


def age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
