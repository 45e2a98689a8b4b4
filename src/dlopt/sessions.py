"""ONNX Runtime sessions: the one place that builds SessionOptions, and the CPU sessions that stages
use to run a model they hold in memory (checks, calibration statistics, fidelity).

Targets (`dlopt.targets`) build their sessions with `session_options` too, so a session option that
dlopt sets (threads, graph optimization level, log level, session config entries) is set here once,
and with `session_source`, so a model whose declared output shapes are wrong runs on every target.

Declared output shapes: exported models (OCR models often) declare an output shape that the graph
does not produce. Where ONNX Runtime infers the output's shape itself it merges leniently and runs;
where it cannot, it keeps the declaration and fails a run whose outputs are reused (IO binding, as
the bench harness and package measure) with "Invalid rank for output". `session_source` clears such
declarations on the copy a session is built from (never the user's file) and says so once (`notes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import DlOptError, InputError, StageError

# What every dlopt session sets, what bundles record as their recommended session configuration
DENORMAL_KEY = "session.set_denormal_as_zero"
SESSION_CONFIG: dict[str, str] = {DENORMAL_KEY: "1"}

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
CPU_PROVIDER = "CPUExecutionProvider"
_PROTOBUF_LIMIT = 2**31 - 1


def session_options(
    *,
    threads: int = 1,
    graph_opt_level: str = "all",
    config_entries: Mapping[str, str] | None = None,
    denormal_as_zero: bool = True,
):
    """SessionOptions with dlopt's defaults: `threads` intra-op threads, one inter-op thread,
    sequential execution, errors-only logging (dlopt reports what matters itself), and
    SESSION_CONFIG (denormals flushed to zero; `denormal_as_zero=False` leaves that
    out: only for measuring what it does, in a process of its own) before `config_entries`."""
    import onnxruntime as ort

    if threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}", "pass {threads=1} or more")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_opt_level not in levels:
        raise InputError(
            f"unknown graph optimization level {graph_opt_level!r}", f"choose one of {', '.join(GRAPH_OPT_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[graph_opt_level]
    options.log_severity_level = 3
    # graph resolution ("Error merging shape info for output") and every run's output check
    # ("VerifyOutputSizes") log through the default logger, not the session's: one line per run
    ort.set_default_logger_severity(3)
    entries = {k: v for k, v in SESSION_CONFIG.items() if k != DENORMAL_KEY or denormal_as_zero}
    for key, value in {**entries, **(config_entries or {})}.items():
        options.add_session_config_entry(key, value)
    return options


def cpu_session(
    model: Any,
    *,
    threads: int = 1,
    graph_opt_level: str = "all",
    config_entries: Mapping[str, str] | None = None,
    error: type[Exception] = StageError,
    hint: str = "report this model",
):
    """A CPU session for `model`: an onnx.ModelProto, serialized bytes, or a path. A model that ONNX
    Runtime cannot load raises `error` (StageError by default: the stage made it) with `hint`."""
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)):
        source: Any = str(Path(model))
        label = Path(model).name
    elif isinstance(model, bytes):
        source, label = model, "the model"
    else:
        if model.ByteSize() > _PROTOBUF_LIMIT:
            raise InputError("models over 2 GiB must be run from a file", "save the model with external data first")
        source, label = model.SerializeToString(), "the model"
    options = session_options(threads=threads, graph_opt_level=graph_opt_level, config_entries=config_entries)
    # a file's wrong output declarations are relaxed (see the module docstring); a model held in memory
    # is one a stage made and runs with session.run, which does not check them: not worth its hashing
    relax = session_source(source, label) if isinstance(source, str) else contextlib.nullcontext((source, ()))
    try:
        with relax as (relaxed, _):
            return ort.InferenceSession(relaxed, sess_options=options, providers=[CPU_PROVIDER])
    except DlOptError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        raise error(f"ONNX Runtime cannot load {label}: {str(e).strip().splitlines()[0][:300]}", hint) from e


# --------------------------------------------------------------------------- declared output shapes

_notes: list[str] = []
_note_sink: list[Callable[[str], None]] = []


def note_once(text: str) -> None:
    """Tell the user `text` once (per `notes_to`): to the sink the CLI set, else kept in `notes()`."""
    if text in _notes:
        return
    _notes.append(text)
    for sink in _note_sink:
        sink(text)


def notes() -> list[str]:
    """What sessions said so far in this process (declarations relaxed)."""
    return list(_notes)


def notes_to(sink: Callable[[str], None] | None) -> None:
    """Send every later note to `sink` (the CLI prints them to stderr, once per command: what was said
    before is forgotten); None: keep them only."""
    _notes.clear()
    _note_sink.clear()
    if sink is not None:
        _note_sink.append(sink)


def _shape_text(value) -> str:
    if not value.type.tensor_type.HasField("shape"):
        return "[?]"
    dims = [
        d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in value.type.tensor_type.shape.dim
    ]
    return f"[{', '.join(dims)}]"


def _conflicts(declared, inferred) -> bool:
    """Whether the graph's inferred output shape (possibly unknown) fails to confirm the declared one."""
    if not inferred.type.tensor_type.HasField("shape"):
        return True  # unknown rank: ONNX Runtime would check every run's output against the declaration
    a, b = declared.type.tensor_type.shape.dim, inferred.type.tensor_type.shape.dim
    return len(a) != len(b) or any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value for x, y in zip(a, b)
    )


@dataclass(frozen=True)
class RelaxedOutput:
    """A graph output whose declared shape was cleared on a session's copy of the model."""

    name: str
    declared: str  # e.g. "[N, 6, 1]"
    inferred: str | None  # what the graph's shape inference finds; None: it cannot tell

    def note(self, produced: str | None = None) -> str:
        return f"output {self.name} declared {self.declared}, produces {produced or self.inferred}: declaration relaxed"


def relax_declared_outputs(model) -> list[RelaxedOutput]:
    """Clear, on `model` (a ModelProto, changed in place), each graph output's declared shape that the
    graph's own shape inference does not confirm (another rank, another fixed size, or a rank it
    cannot infer); the element type stays. Returns what was cleared."""
    import onnx

    declared = {
        o.name for o in model.graph.output if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape")
    }
    if not declared:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for output in probe.graph.output:
        output.type.tensor_type.ClearField("shape")
    for tensor in probe.graph.initializer:  # shapes need dims and small values (shape constants), not weights
        if len(tensor.raw_data) > 4096:
            tensor.ClearField("raw_data")
    try:
        inferred_model = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference failing is not the model failing: leave the declarations
        return []
    inferred = {o.name: o for o in inferred_model.graph.output}
    relaxed = []
    for output in model.graph.output:
        if output.name in declared and output.name in inferred and _conflicts(output, inferred[output.name]):
            after = _shape_text(inferred[output.name])
            relaxed.append(RelaxedOutput(output.name, _shape_text(output), None if after == "[?]" else after))
            output.type.tensor_type.ClearField("shape")
    return relaxed


def produced_notes(relaxed: Sequence[RelaxedOutput], outputs: Mapping[str, Any], label: str) -> None:
    """Once the model ran: say, once, which relaxed declarations its `outputs` ({name: array or
    anything with .shape}) really disagree with (an unconfirmed declaration may well be right)."""
    for r in relaxed:
        shape = outputs.get(r.name)
        shape = getattr(shape, "shape", shape)
        shape = shape() if callable(shape) else shape
        if shape is None:
            continue
        produced = f"[{', '.join(str(int(d)) for d in shape)}]"
        declared = r.declared.strip("[]").split(", ") if r.declared != "[]" else []
        if len(declared) != len(shape) or any(d.isdigit() and int(d) != int(n) for d, n in zip(declared, shape)):
            note_once(f"{label}: {r.note(produced)}")


_relaxed: dict[Any, tuple[bytes | None, tuple[RelaxedOutput, ...]]] = {}  # per model content (built many times)


def _relaxed_copy(key: Any, load: Callable[[], Any]) -> tuple[bytes | None, tuple[RelaxedOutput, ...]]:
    """The serialized relaxed model (None: nothing to relax) and what was relaxed, once per `key`."""
    if key not in _relaxed:
        model = load()
        found = tuple(relax_declared_outputs(model))
        if len(_relaxed) > 64:
            _relaxed.clear()
        _relaxed[key] = (model.SerializeToString() if found else None, found)
    return _relaxed[key]


@contextlib.contextmanager
def session_source(source: Any, label: str | None = None) -> Iterator[tuple[Any, tuple[RelaxedOutput, ...]]]:
    """(what a session should load, the outputs relaxed): `source` (a path or serialized bytes)
    unchanged, or a copy whose unconfirmed output declarations are cleared (see the module
    docstring). A declaration that inference shows wrong is said at once; one it cannot confirm is
    said by `produced_notes` once the model ran and showed it wrong. A path's copy is written to a
    temporary folder beside links to its external data files."""
    import onnx

    key: str | tuple[str, int, int]  # the content's hash, or the file's path, time and size
    if isinstance(source, bytes):
        key, load = hashlib.sha256(source).hexdigest(), lambda: onnx.load_model_from_string(source)
        label = label or "the model"
    else:
        path = Path(source)
        label = label or path.name
        try:
            stat = path.stat()
        except OSError:  # ONNX Runtime reports a missing model in its own words
            yield source, ()
            return
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        load = lambda: onnx.load_model(str(path), load_external_data=False)  # noqa: E731
    try:
        relaxed, found = _relaxed_copy(key, load)
    except Exception:  # noqa: BLE001 - not an ONNX model (an .ort file): ONNX Runtime reads it as it is
        relaxed, found = None, ()
    for r in found:
        if r.inferred is not None:
            note_once(f"{label}: {r.note()}")
    if relaxed is None:
        yield source, ()
    elif isinstance(source, bytes):
        yield relaxed, found
    else:
        with tempfile.TemporaryDirectory(prefix="dlopt-session-") as tmp:
            from dlopt.fileio import external_data_files

            for name in external_data_files(onnx.load_model_from_string(relaxed)):
                link = Path(tmp) / name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((Path(source).parent / name).resolve())
            copy = Path(tmp) / Path(source).name
            copy.write_bytes(relaxed)  # external data stays where the links point
            yield str(copy), found


def feeds_for(session, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of `sample` that `session` takes (a stage's variant may drop an input); a missing
    input is an InputError naming it."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in sample]
    if missing:
        raise InputError(
            f"the data lacks inputs {sorted(missing)} of the model", f"give arrays named {', '.join(names)}"
        )
    return {n: sample[n] for n in names}


def trial_run(session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run once without ONNX Runtime logging a failure to stderr: for trying whether a model runs on
    some inputs (dlopt.inputs tries candidate shapes), where a failure is expected and handled."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    return session.run(None, dict(feeds), options)


def run_outputs(session, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of `session` on each sample, in the session's output order."""
    return [session.run(None, feeds_for(session, f)) for f in feeds_list]


__all__ = [
    "CPU_PROVIDER",
    "GRAPH_OPT_LEVELS",
    "cpu_session",
    "feeds_for",
    "note_once",
    "notes",
    "notes_to",
    "produced_notes",
    "relax_declared_outputs",
    "RelaxedOutput",
    "run_outputs",
    "session_options",
    "session_source",
    "trial_run",
]
