"""Loading models with clear errors, and writing outputs atomically (temp file, then rename)."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import DlOptError, InputError

# protobuf cannot serialize a single message over 2 GiB; above this, weights go to external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


@dataclass(frozen=True)
class WrittenModel:
    """A model file a stage wrote, its JSON report beside it, and that report."""

    model_path: Path
    report_path: Path
    report: dict[str, Any]


def report_path_for(model_path: str | os.PathLike, stage: str) -> Path:
    """Where a stage's JSON report goes: beside the model, `NAME.<stage>.json`."""
    path = Path(model_path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.{stage}.json")


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, before any long work, when `path` cannot be written."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise InputError(f"output path {out} is a directory", "give a file name, e.g. model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output directory {parent} does not exist", "create it first")
    if not parent.is_dir():
        raise InputError(f"output path {out}: {parent} is not a directory", "choose another -o path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable", "choose another -o path")
    return out


def check_output_folder(out: Path) -> None:
    """Fail early when `out` cannot become a new output folder: it must be absent or empty, its parent writable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"output {out} exists and is not an empty folder",
            "choose a new folder for -o (an export is never written over another)",
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"the parent of the output folder {out}, {parent}, does not exist", "choose another -o path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write into {parent}", "choose another -o path")


# -- inputs are never outputs ------------------------------------------------------------------------


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files an input consists of, resolved: the path itself, plus an ONNX model's external-data
    files (which an output must not overwrite either)."""
    p = Path(path)
    found = [p.resolve()]
    if p.is_file() and p.suffix.lower() == ".onnx":
        try:
            import onnx

            model = onnx.load_model(str(p), load_external_data=False)
        except Exception:  # an unreadable model is reported by the verb that loads it, with its own message
            return found
        found += [(p.parent / location).resolve() for location in external_data_files(model)]
    return found


def external_data_files(model) -> list[str]:
    """The `location`s (relative to the model's folder) of an ONNX model's external-data files."""
    from onnx.external_data_helper import _get_all_tensors

    found = []
    for tensor in _get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == 1:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in found:
                    found.append(entry.value)
    return found


def guard_outputs(
    inputs: Iterable[str | os.PathLike | None],
    outputs: Iterable[str | os.PathLike | None],
    *,
    cache: str | os.PathLike | None = None,
) -> None:
    """Refuse, before anything is written, an output that is, contains or lies inside an input.

    Inputs are files or folders the verb reads (an ONNX model with its external data, a data file,
    a factory's .py file, a recipe); outputs are every file or folder it may write, reports included. Paths
    are compared resolved (symlinks, `..`, relative paths), and existing files also by inode (hard
    links). None entries are skipped, so callers pass optional options as they are. `cache`: the stage
    cache folder the verb reads and writes (dlopt.stagecache): no output may be, contain or lie inside it,
    and it may not be, contain or lie inside an input (its entries are replaced and pruned)."""
    written = [o for o in outputs if o is not None]
    if not written and cache is None:
        return  # nothing will be written: no need to read the inputs' external-data lists
    sources = [f for i in inputs if i is not None for f in input_files(i)]
    for output in written:
        for source in sources:
            what = _overlap(Path(output), source)
            if what:
                raise InputError(
                    f"output {output} {what} the input {source}", "write to another path; inputs are never modified"
                )
        if cache is not None:
            what = _overlap(Path(output), Path(cache).expanduser().resolve())
            if what:
                raise InputError(
                    f"output {output} {what} the stage cache {cache}",
                    "write outside the cache, or pass another --cache-dir",
                )
    if cache is not None:
        for source in sources:
            what = _overlap(Path(cache).expanduser(), source)
            if what:
                raise InputError(
                    f"the stage cache {cache} {what} the input {source}",
                    "pass another --cache-dir: the cache's entries are replaced and pruned",
                )


def _overlap(output: Path, source: Path) -> str | None:
    """How `output` overlaps the resolved input path `source` ("is", "contains", "lies inside"), or None."""
    out = output.resolve()
    if out == source or (out.exists() and source.exists() and os.path.samefile(out, source)):
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def guard_source_spec(spec: str | None) -> Path | None:
    """The file a model SOURCE reads (`path/to/file.py:build` -> path/to/file.py), for guard_outputs."""
    if not spec or ":" not in spec:
        return None
    target = spec.rpartition(":")[0]
    return Path(target) if target.endswith(".py") or "/" in target or "\\" in target else None


# -- writing outputs: staged beside their final path, renamed into place together -------------------------
#
# A temp file is named `.NAME.<pid>-<random>.tmp` beside NAME. A run killed by SIGKILL (or a power
# cut) cannot remove its own; the next run writing NAME removes those whose process is gone. SIGINT
# and SIGTERM are held back while a set of outputs is renamed into place, so an interrupt never
# leaves a new model beside a stale report; what each run renamed into place is recorded for the
# CLI's "interrupted" message.

_written: list[Path] = []


def written_paths() -> list[Path]:
    """Outputs this process renamed into place since the last `reset_written()` that are still there:
    a file renamed into a staging folder that was removed since (a cache entry being built) is not."""
    return list(dict.fromkeys(p for p in _written if p.exists()))


def reset_written() -> None:
    _written.clear()


def record_written(path: Path) -> None:
    """Note an output renamed into place (for the CLI's message when a run is interrupted)."""
    _written.append(Path(path))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_pid(name: str, prefix: str) -> bool:
    """True when `name` is `<prefix><pid>-...` and that process is gone (a killed run's leftover)."""
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    pid_text = rest.split("-", 1)[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text))


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp files that killed runs left beside `out` (see above); returns them."""
    removed: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    try:
        candidates = list(parent.glob(f".{glob.escape(out.name)}.*.tmp"))
    except OSError:
        return removed
    for path in candidates:
        if stale_pid(path.name, f".{out.name}.") and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


class StagedOutputs:
    """Outputs of one result, each written to a temp file beside its final path, then renamed into
    place together by `commit()` with SIGINT/SIGTERM held back. Use through `staged_outputs()`."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    @property
    def main(self) -> Path | None:
        return self._staged[0][1] if self._staged else None

    def stage(self, path: str | os.PathLike) -> Path:
        """A temp path to write `path`'s content to."""
        out = check_output_path(path)
        remove_stale_temps(out)
        try:
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent if str(out.parent) else "."
            )
        except OSError as e:
            raise InputError(f"cannot write {out}: {e.strerror or e}", "choose another -o path") from e
        os.close(fd)
        self._staged.append((Path(tmp_name), out))
        return Path(tmp_name)

    def commit(self) -> list[Path]:
        """Rename every staged file into place; the first staged is the main one (the model). Earlier
        files of the set that the new ones replace are removed first, so even a SIGKILL between two
        renames leaves no new model beside an old report, only a missing report."""
        umask = os.umask(0)
        os.umask(umask)
        with signals_held():
            try:
                for tmp, _ in self._staged:
                    # mkstemp creates the file 0600; give the output the permissions an ordinary write would
                    os.chmod(tmp, 0o666 & ~umask)
                for _, out in self._staged[1:]:
                    if out.is_file() or out.is_symlink():
                        out.unlink()
                for tmp, out in self._staged:
                    os.replace(tmp, out)
                    _written.append(out)
            except OSError as e:
                raise _write_error(e, self._staged[0][1]) from e
        done = [out for _, out in self._staged]
        self._staged.clear()
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()


def _write_error(e: OSError, out: Path) -> DlOptError:
    if e.errno == errno.ENOSPC:
        return InputError(f"disk full while writing {out}", "free space and run again")
    return InputError(
        f"cannot write {out}: {e.strerror or e}",
        "check that the path is not a folder, read-only or on a read-only file system",
    )


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then act on the first that came.

    Python-level handlers, not a signal mask: a mask holds a signal only for the thread that sets it,
    and the kernel hands a process-directed signal to any other thread (ONNX Runtime's and torch's
    pools), whose arrival Python then acts on in the main thread at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            handler = previous[signal.Signals(pending[0])]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Stage several outputs and rename them into place together only if the block succeeds: a crash,
    an exception or an interrupt leaves no half-written file and no new file beside a stale one."""
    outputs = StagedOutputs()
    try:
        yield outputs
        outputs.commit()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(f"disk full while writing {outputs.main}", "free space and run again") from e
        raise
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash or an exception leaves no half-written file at `path`."""
    with staged_outputs() as outputs:
        yield outputs.stage(path)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """The -o FOLDER of a verb that writes several files: checked, created when missing, and removed
    again if the verb fails (bad input, a crash, an interrupt) before anything was written into it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} is a file", "-o names a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a folder"
        raise InputError(f"the parent of the output folder {out}, {parent}, {what}", "choose another -o path")
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot create the output folder {out}: {e.strerror or e}", "choose a writable -o path"
        ) from e
    if not os.access(out, os.W_OK):
        raise InputError(f"output folder {out} is not writable", "choose another -o path")
    try:
        yield out
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: files written before the failure stay
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, json_text(obj).encode())


def json_text(obj: Any) -> str:
    """Standard JSON (what every other tool parses): numpy values as Python ones, and the non-finite
    floats JSON has no words for (an SQNR of identical outputs is inf) written as null."""
    return json.dumps(finite_for_json(obj), indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"


def finite_for_json(value: Any) -> Any:
    import math

    import numpy as np

    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_for_json(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")


def save_onnx_atomic(model, path: str | os.PathLike) -> Path:
    """Save an onnx.ModelProto atomically; models over 2 GiB get their weights in PATH.data."""
    with staged_outputs() as outputs:
        stage_onnx(model, path, outputs)
    return Path(path)


def usual_permissions(root: Path) -> None:
    """Give the staged folder `root` and everything in it the permissions an ordinary write would (0777 for
    folders, 0666 for files, less the umask): mkdtemp and mkstemp create private 0700/0600 entries, and so
    does onnx's external-data writer (model.onnx.data), which another user or a container could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def stage_onnx(model, path: str | os.PathLike, outputs: StagedOutputs) -> Path:
    """Write `model` to a temp file of `outputs` that becomes `path` on commit (models over 2 GiB:
    their weights to PATH.data, staged too). Returns the temp model file."""
    import onnx

    out = Path(path)
    tmp = outputs.stage(out)
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        tmp.write_bytes(model.SerializeToString())
        return tmp
    # The data file is written under a temp name; the graph is pointed at its final name, which it
    # will have once committed.
    data_name = out.name + ".data"
    data_tmp = outputs.stage(out.parent / data_name)
    onnx.save_model(
        model,
        str(tmp),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_tmp.name,
        size_threshold=1024,
    )
    reloaded = onnx.load_model(str(tmp), load_external_data=False)
    for tensor in _external_tensors(reloaded):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    tmp.write_bytes(reloaded.SerializeToString())
    return tmp


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.HasField("data_location") and t.data_location == 1]


def load_onnx(path: str | os.PathLike, load_external_data: bool = True):
    """Load an ONNX model, turning every way that can fail into an InputError naming the file:
    missing, not a model, external data missing, operators that ONNX does not define."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise InputError(f"model file {p} does not exist", "check the path")
    if p.is_dir():
        raise InputError(f"model path {p} is a directory, not an .onnx file", "give the .onnx file itself")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{p} is not a valid ONNX model ({type(e).__name__})", "export it again with `dlopt export`"
        ) from e
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}", "check the file and its permissions") from e
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise InputError(f"{p} is not a valid ONNX model (no graph)", "export it again with `dlopt export`")
    check_known_ops(model, p)
    external = external_data_files(model)
    missing = [location for location in external if not (p.parent / location).is_file()]
    if missing:
        raise InputError(
            f"{p}: its external data file {p.parent / missing[0]} is missing",
            "keep the data file(s) beside the model, under the name the model records",
        )
    if load_external_data and external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except (ValueError, RuntimeError, OSError, onnx.checker.ValidationError) as e:
            raise InputError(
                f"cannot read the external data of {p} ({type(e).__name__}: {e})",
                "keep the data file(s) beside the model, unchanged",
            ) from e
    return model


def check_known_ops(model, path: str | os.PathLike) -> None:
    """Refuse operators of the standard ONNX domains that ONNX does not define (a typo, an exporter's
    private op): every later step would fail on them with a runtime error far from the cause."""
    import onnx

    local = {(f.domain, f.name) for f in model.functions}
    unknown = sorted(
        {
            n.op_type
            for n in _all_nodes(model.graph)
            if n.domain in ("", "ai.onnx", "ai.onnx.ml")
            and (n.domain, n.op_type) not in local
            and not onnx.defs.has(n.op_type, "ai.onnx.ml" if n.domain == "ai.onnx.ml" else "")
        }
    )
    if unknown:
        raise InputError(
            f"{path} uses operator(s) that ONNX does not define: {', '.join(unknown)}",
            "export the model again with standard operators",
        )


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def load_torch_dict(path: str | os.PathLike, *, kind: str, format_tag: str, hint: str) -> dict[str, Any]:
    """A dict that dlopt saved with torch.save (weights only, tagged {"format": format_tag}), or an
    InputError naming the file: missing, unreadable, or not what `kind` describes."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{kind} {p} does not exist", hint)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise InputError(f"{p} is not a {kind} ({type(e).__name__})", hint) from e
    if not isinstance(payload, dict) or payload.get("format") != format_tag:
        raise InputError(f"{p} is not a {kind}", hint)
    return payload
