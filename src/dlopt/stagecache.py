"""A content-addressed cache of stage outputs (`dlopt run`, `dlopt cache`).

An entry is a folder `<cache dir>/<key>/` named by the sha256 of everything that decides the stage's
output: the input artifact's bytes, the stage's config dict, the data's hash and the host facts that
change the result (see dlopt.recipe.key_inputs). It holds the stage's artifact (`model.onnx` with its
JSON report, or a `bundle/` folder) and `entry.json`: the key's inputs, when it was made, its size, the
stage's report, and the marker of an entry dlopt wrote: its own key, and the sha256 and size of every
other file in the folder.

Entries are built in a hidden staging folder (`.KEY16.building-PID-*`) and renamed into place, so a crash
never leaves half an entry under a key; the staging folders of dead processes are swept by the next
build, `cache ls` and `cache prune`. Reading an entry re-verifies it: a symlink, a file that is not
listed, a missing one or one whose sha256 changed make it a miss (with the reason), which the caller
rebuilds. `cache prune` removes only folders whose entry.json names their own key.

Concurrent processes: a build holds an exclusive lock (fcntl.flock on `.locks/<key[:2]>.lock`) from
before it looks for the entry again until its commit, so one process builds and the others wait, then
take its entry; a read holds the shared lock while it verifies the entry (and, for `dlopt run`, links
its files into the run's private folder, so a forced rebuild by another process never changes a file
under a run that is using it).
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
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import InputError, StageError
from dlopt.fileio import json_text, pid_alive

ENTRY_NAME = "entry.json"
CACHE_FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")
LOCKS_DIR = ".locks"
# hidden folders of one process: staging of a build, an entry moved aside to be replaced or removed, a
# run's private links (dlopt.recipe); named `.KEY16.<what>-PID...` or `.run-PID-...`
# (thread, cache folder, lock name) of the cache locks this process holds: a nested request is granted at
# once (a second flock of the same file by the same process, through another descriptor, would wait forever)
_HELD: set[tuple[int, str, str]] = set()
_PRIVATE = re.compile(r"^\.(?:[0-9a-f]{16}\.(?:building|old|removing)|run)-(\d+)(?:-|$)")


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


@dataclass(frozen=True)
class Lookup:
    """What a read of one key found: a verified entry, or None with why (None when there is none)."""

    entry: Entry | None
    problem: str | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _info_digest(info: Mapping[str, Any]) -> str:
    """sha256 of entry.json's content but this digest itself (canonical JSON, as json_text writes floats):
    an entry.json edited by hand, or cut short, is not trusted."""
    body = {k: v for k, v in info.items() if k != "entry_sha256"}
    return hashlib.sha256(
        json.dumps(json.loads(json_text(body)), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _listing(folder: Path) -> tuple[dict[str, Path], str | None]:
    """Every regular file under `folder` by its relative POSIX path (entry.json left out), or what makes
    the folder no entry: a symlink or a special file anywhere in it."""
    files: dict[str, Path] = {}
    for parent, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            path = Path(parent) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                return files, f"{rel} is a symlink"
            if name in names and not path.is_file():
                return files, f"{rel} is not a regular file"
            if name in names and rel != ENTRY_NAME:
                files[rel] = path
    return files, None


class StageCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create the cache folder {self.root}: {e.strerror or e}",
                "pass a writable {cache_dir=DIR} (or set DLOPT_CACHE_DIR)",
            ) from e

    # -- locks -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str, *, exclusive: bool) -> Iterator[None]:
        """flock on the key's lock file (one per first two hex digits of the key: a bounded number of
        files, never removed, so that no process ever locks a file another has unlinked). dlopt holds one
        cache lock at a time, so two processes never wait for each other."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent runs there do not wait for each other
            yield
            return
        held = (threading.get_ident(), str(self.root.resolve()), key[:2])
        if held in _HELD or not self.root.is_dir():
            yield
            return
        locks = self.root / LOCKS_DIR
        try:
            locks.mkdir(exist_ok=True)
            fd = os.open(locks / f"{key[:2]}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only cache: nobody can write it, reads need no lock
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            _HELD.add(held)
            try:
                yield
            finally:
                _HELD.discard(held)
        finally:
            os.close(fd)  # releases the lock

    # -- reading -----------------------------------------------------------------------------------

    def _info(self, key: str) -> dict[str, Any] | None:
        """entry.json of `<root>/<key>` when dlopt wrote it: a real folder, whose entry.json names its key."""
        path = self.root / key
        if not _KEY.match(key) or path.is_symlink() or not path.is_dir():
            return None
        try:
            info = json.loads((path / ENTRY_NAME).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("key") == key else None

    def _verify(self, key: str, keyed: bool = False) -> Lookup:
        """`keyed`: the entry's recorded `inputs` must hash to its key (entries of `dlopt run`'s stages)."""
        path = self.root / key
        if path.is_symlink():
            return Lookup(None, f"{path} is a symlink")
        if not path.exists():
            return Lookup(None)
        info = self._info(key)
        if info is None:
            return Lookup(None, f"{path} is not an entry dlopt wrote (no entry.json naming its key)")
        recorded = info.get("files")
        if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
            return Lookup(None, "it records no file hashes (made by an older dlopt)")
        if info.get("entry_sha256") != _info_digest(info):
            return Lookup(None, "its entry.json was edited since it was written")
        artifact = info.get("artifact")
        if not isinstance(artifact, str) or not any(
            rel == artifact or rel.startswith(f"{artifact}/") for rel in recorded
        ):
            return Lookup(None, "its entry.json names no artifact it holds")
        if keyed and (
            not isinstance(info.get("inputs"), dict)
            or cache_key(info["inputs"]) != key
            or not isinstance(info.get("output_sha256"), str)
        ):
            return Lookup(None, "its entry.json records key inputs that do not make its key")
        found, problem = _listing(path)
        if problem:
            return Lookup(None, problem)
        for rel in sorted(set(found) | set(recorded)):
            if rel not in recorded:
                return Lookup(None, f"{rel} is not a file dlopt wrote")
            if rel not in found:
                return Lookup(None, f"{rel} is missing")
            size, digest = recorded[rel].get("bytes"), recorded[rel].get("sha256")
            if found[rel].stat().st_size != size or _sha256(found[rel]) != digest:
                return Lookup(None, f"{rel} changed since it was written (its sha256 differs)")
        return Lookup(Entry(key, path, info))

    def lookup(self, key: str) -> Lookup:
        """The entry under `key`, verified against the sha256 of each file recorded when it was written;
        else why it is no entry (None when there is nothing under the key)."""
        with self._locked(key, exclusive=False):
            return self._verify(key)

    def get(self, key: str) -> Entry | None:
        return self.lookup(key).entry

    def checkout(self, key: str, into: Path) -> tuple[Lookup, Path | None]:
        """Verify the entry (its recorded key inputs too) and link its files into `into/<key>` (copies where
        links fail), all under the key's shared lock: a private view that a concurrent forced rebuild of the
        key cannot change. Returns the lookup and the private folder (None when the entry failed)."""
        with self._locked(key, exclusive=False):
            found = self._verify(key, keyed=True)
            if found.entry is None:
                return found, None
            private = into / key
            shutil.rmtree(private, ignore_errors=True)
            for rel in found.entry.info["files"]:
                target = private / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(found.entry.path / rel, target)
                except OSError:  # a file system without hard links
                    shutil.copyfile(found.entry.path / rel, target)
            return found, private

    # -- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """The key's exclusive lock and a private staging folder for a new entry. The block may look the
        key up again (another process may have made it while this one waited), writes the artifact and
        calls `commit`, which renames the folder into place; a failed block leaves nothing."""
        self._ensure_root()
        with self._locked(key, exclusive=True):
            self.sweep()
            staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.building-{os.getpid()}-", dir=self.root))
            try:
                yield staging
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone after commit's rename; removed on failure

    def commit(self, key: str, staging: Path, info: Mapping[str, Any]) -> Entry:
        """Record every file's sha256 in entry.json and rename `staging` to the key's folder (replacing an
        entry there: a forced run, or a tampered entry). Called inside `building(key)`. `info["files"]`, when
        given (an entry shipped from another node), must match what staging holds."""
        found, problem = _listing(staging)
        if problem:
            raise StageError(f"cache entry {key[:12]}: {problem}", "a stage wrote a link: report this")
        files = {rel: {"sha256": _sha256(path), "bytes": path.stat().st_size} for rel, path in sorted(found.items())}
        shipped = info.get("files")
        if shipped is not None and shipped != files:
            raise StageError(
                f"cache entry {key[:12]} arrived with files that differ from its entry.json",
                "run again; if it repeats, prune the worker's cache",
            )
        now = time.time()
        info = {
            **info,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "created_unix": now,
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        info["entry_sha256"] = _info_digest(info)
        (staging / ENTRY_NAME).write_text(json_text(info))
        target = self.root / key
        with self._locked(key, exclusive=True):
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():  # a forced re-run, or an entry that failed its check: the new one wins
                old = self.root / f".{key[:16]}.old-{os.getpid()}-{int(now * 1e6)}"
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging, target)
        return Entry(key, target, dict(info))

    @contextlib.contextmanager
    def private_folder(self) -> Iterator[Path]:
        """A folder of this process's own for `checkout` views (in the cache, so that they are hard links;
        in the temp folder, as copies, when the cache is not writable), removed when the block ends."""
        try:
            self._ensure_root()
            self.sweep()
            folder = Path(tempfile.mkdtemp(prefix=f".run-{os.getpid()}-", dir=self.root))
        except (InputError, OSError):
            folder = Path(tempfile.mkdtemp(prefix="dlopt-run-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- listing and removing ----------------------------------------------------------------------

    def sweep(self) -> list[Path]:
        """Remove the hidden folders (staging, moved aside, a run's private links) of dead processes."""
        removed: list[Path] = []
        try:
            names = [p for p in self.root.iterdir() if p.name.startswith(".")]
        except OSError:
            return removed
        for path in names:
            match = _PRIVATE.match(path.name)
            if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
        return removed

    def entries(self) -> list[Entry]:
        """The entries dlopt wrote (entry.json names the folder's key), oldest first; not re-verified."""
        if not self.root.is_dir():
            return []
        self.sweep()
        found = []
        for p in self.root.iterdir():
            info = self._info(p.name)
            if info is not None:
                found.append(Entry(p.name, p, info))
        return sorted(found, key=lambda e: e.created)

    def remove(self, entry: Entry) -> None:
        # under the key's lock, renamed away first: a reader never sees a half-removed entry under its key
        with self._locked(entry.key, exclusive=True):
            if self._info(entry.key) is None:
                return  # not (or no longer) an entry dlopt wrote: never removed
            trash = self.root / f".{entry.key[:16]}.removing-{os.getpid()}-{time.time_ns()}"
            os.rename(entry.path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def prune(
        self, *, older_than_s: float | None = None, max_bytes: int | None = None, everything: bool = False
    ) -> list[Entry]:
        """Remove entries older than `older_than_s`, then the oldest until the rest fit in `max_bytes`
        (or all of them); returns what was removed."""
        entries = self.entries()  # oldest first
        now = time.time()
        doomed = (
            list(entries)
            if everything
            else [e for e in entries if older_than_s is not None and now - e.created > older_than_s]
        )
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


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
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
