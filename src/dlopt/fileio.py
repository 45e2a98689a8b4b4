"""Loading models with clear errors, and writing outputs atomically (temp file, then rename)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlopt.errors import InputError

# protobuf cannot serialize a single message over 2 GiB; above this, weights go to external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash or an exception leaves no half-written file at `path`."""
    out = check_output_path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}", "choose another -o path") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give the output the permissions an ordinary write would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InputError(f"disk full while writing {out}", "free space and run again") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


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
    import onnx

    out = Path(path)
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        return write_bytes_atomic(out, model.SerializeToString())
    # External data is written beside the temp file under its final name, then the model is renamed.
    data_name = out.name + ".data"
    with atomic_path(out) as tmp:
        data_tmp = out.parent / (data_name + ".tmp")
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_tmp.name, size_threshold=1024)
        # the graph refers to the data file by name: point it at the final name before the renames
        reloaded = onnx.load_model(str(tmp), load_external_data=False)
        for tensor in _external_tensors(reloaded):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        tmp.write_bytes(reloaded.SerializeToString())
        os.replace(data_tmp, out.parent / data_name)
    return out


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.HasField("data_location") and t.data_location == 1]


def load_onnx(path: str | os.PathLike, load_external_data: bool = True):
    """Load an ONNX model, turning every way that can fail into an InputError naming the file."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise InputError(f"model file {p} does not exist", "check the path")
    if p.is_dir():
        raise InputError(f"model path {p} is a directory, not an .onnx file", "give the .onnx file itself")
    try:
        model = onnx.load_model(str(p), load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not a valid ONNX model ({type(e).__name__})",
                         "export it again with `dlopt export`") from e
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}", "check the file and its permissions") from e
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise InputError(f"{p} is not a valid ONNX model (no graph)", "export it again with `dlopt export`")
    return model


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
