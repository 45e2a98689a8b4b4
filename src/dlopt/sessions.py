"""ONNX Runtime sessions: the one place that builds SessionOptions, and the CPU sessions that stages
use to run a model they hold in memory (checks, calibration statistics, fidelity).

Targets (`dlopt.targets`) build their sessions with `session_options` too, so a session option that
dlopt sets (threads, graph optimization level, log level, session config entries) is set here once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, StageError

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
CPU_PROVIDER = "CPUExecutionProvider"
_PROTOBUF_LIMIT = 2**31 - 1


def session_options(*, threads: int = 1, graph_opt_level: str = "all",
                    config_entries: Mapping[str, str] | None = None, denormal_as_zero: bool = True):
    """SessionOptions with dlopt's defaults: `threads` intra-op threads, one inter-op thread,
    sequential execution, errors-only logging (dlopt reports what matters itself), and
    dlopt.runtime.SESSION_CONFIG (denormals flushed to zero; `denormal_as_zero=False` leaves that
    out: only for measuring what it does, in a process of its own) before `config_entries`."""
    from dlopt.runtime import DENORMAL_KEY, SESSION_CONFIG

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
        raise InputError(f"unknown graph optimization level {graph_opt_level!r}",
                         f"choose one of {', '.join(GRAPH_OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[graph_opt_level]
    options.log_severity_level = 3
    entries = {k: v for k, v in SESSION_CONFIG.items() if k != DENORMAL_KEY or denormal_as_zero}
    for key, value in {**entries, **(config_entries or {})}.items():
        options.add_session_config_entry(key, value)
    return options


def cpu_session(model: Any, *, threads: int = 1, graph_opt_level: str = "all",
                config_entries: Mapping[str, str] | None = None, error: type[Exception] = StageError,
                hint: str = "report this model"):
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
    try:
        return ort.InferenceSession(source, sess_options=options, providers=[CPU_PROVIDER])
    except Exception as e:  # onnxruntime raises its own exception types
        raise error(f"ONNX Runtime cannot load {label}: {str(e).strip().splitlines()[0][:300]}", hint) from e


def feeds_for(session, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of `sample` that `session` takes (a stage's variant may drop an input); a missing
    input is an InputError naming it."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in sample]
    if missing:
        raise InputError(f"the data lacks inputs {sorted(missing)} of the model",
                         f"give arrays named {', '.join(names)}")
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


__all__ = ["CPU_PROVIDER", "GRAPH_OPT_LEVELS", "cpu_session", "feeds_for", "run_outputs", "session_options",
           "trial_run"]
