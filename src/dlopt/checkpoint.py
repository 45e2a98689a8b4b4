"""The pruned checkpoint format (dlopt-pruned-v1): what `dlopt prune` and `dlopt distill` write, and what
distill, export and `dlopt run` rebuild a model from. Shared by the prune and distill stages and the verbs.

A pruned model's classes are the source's, with other shapes, so it cannot be rebuilt from a
state_dict alone. Pickling the whole module breaks for factories loaded from files. The checkpoint
instead records how to rebuild it: build the source, replay the pruning history, load the weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlopt.errors import InputError, MissingDependencyError

CHECKPOINT_FORMAT = "dlopt-pruned-v1"


def require_torch_pruning():
    try:
        import torch
        import torch_pruning
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            f"pruning needs the package {e.name!r}", "pip install torch==2.13.0 torch-pruning==1.6.0"
        ) from e
    return torch, torch_pruning


@dataclass(frozen=True, kw_only=True)
class PrunedCheckpoint:
    source: str  # the SOURCE spec the model was built from (reference model or factory; files absolute)
    pruning_history: list = field(default_factory=list)
    module_attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    state_dict: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    source_sha256: str | None = None  # of the factory's .py file when saved; None for reference models


def source_file(spec: str) -> Path | None:
    """The Python file a factory SOURCE runs (path/to/file.py:build, or package.module:build's
    module file); None for a reference model (or any other name, which load_source then judges)."""
    from dlopt.models import REFERENCE_MODELS
    from dlopt.sources import factory_file

    return None if spec in REFERENCE_MODELS or ":" not in spec else factory_file(spec)


def pinned_source(spec: str) -> tuple[str, str | None]:
    """(SOURCE with a file path made absolute and resolved, sha256 of the file it runs), as recorded
    in a checkpoint: it then works from any folder, and distill can tell when the file changed."""
    from dlopt.manifest import sha256_file

    path = source_file(spec)
    if path is None:
        return spec, None
    target, _, func = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        spec = f"{path.resolve()}:{func}"
    return spec, sha256_file(path)


def checked_source(checkpoint: PrunedCheckpoint, checkpoint_path: str | Path) -> str:
    """The checkpoint's SOURCE, once its file is known to be the one it was pruned from: a file that
    is missing, changed since, or not hashed in the checkpoint is never imported (it would run
    whatever code it now holds). The user can name the source explicitly instead (--student-source)."""
    from dlopt.manifest import sha256_file

    hint = (
        "pass {student_source=FILE.py:FUNCTION} (or package.module:FUNCTION) to build the student from a "
        "source you name"
    )
    path = source_file(checkpoint.source)
    if path is None:
        return checkpoint.source
    if not path.is_file():
        raise InputError(f"checkpoint {checkpoint_path}: its source file {path} does not exist", hint)
    if checkpoint.source_sha256 is None:
        raise InputError(
            f"checkpoint {checkpoint_path} records no sha256 of its source {checkpoint.source}, so it is not imported",
            hint,
        )
    if sha256_file(path) != checkpoint.source_sha256:
        raise InputError(
            f"checkpoint {checkpoint_path}: its source file {path} changed since the checkpoint was "
            "saved (sha256 differs), so it is not imported",
            hint,
        )
    return checkpoint.source


def save_checkpoint(path: str | Path, module, source: str, report: Mapping[str, Any], *, outputs=None) -> Path:
    """Write a checkpoint of `module` pruned from SOURCE (atomically, or staged in `outputs`, a
    dlopt.fileio.StagedOutputs, to be committed with the files written beside it)."""
    import torch

    from dlopt.fileio import staged_outputs

    source, source_sha256 = pinned_source(source)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "source": source,
        "source_sha256": source_sha256,
        "pruning_history": report.get("pruning_history", []),
        "module_attributes": report.get("module_attributes", {}),
        "state_dict": module.state_dict(),
        "report": {k: v for k, v in report.items() if k != "pruning_history"},
    }
    if outputs is not None:
        torch.save(payload, outputs.stage(path))
    else:
        with staged_outputs() as own:
            torch.save(payload, own.stage(path))
    return Path(path)


def read_checkpoint(path: str | Path) -> PrunedCheckpoint:
    from dlopt.fileio import load_torch_dict

    payload = load_torch_dict(
        path,
        kind="dlopt checkpoint",
        format_tag=CHECKPOINT_FORMAT,
        hint="give the .pt file written by `dlopt prune` or `dlopt distill`",
    )
    return PrunedCheckpoint(
        source=payload["source"],
        pruning_history=payload["pruning_history"],
        module_attributes=payload["module_attributes"],
        state_dict=payload["state_dict"],
        report=payload.get("report", {}),
        source_sha256=payload.get("source_sha256"),
    )


def rebuild(checkpoint: PrunedCheckpoint, module, example_inputs: Mapping[str, Any]):
    """Apply a checkpoint to a freshly built (unpruned) source module, in place; returns it."""
    _, tp = require_torch_pruning()
    if checkpoint.pruning_history:
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=dict(example_inputs))
        graph.load_pruning_history([tuple(h) for h in checkpoint.pruning_history])
    modules = dict(module.named_modules())
    for name, attrs in checkpoint.module_attributes.items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    try:
        module.load_state_dict(checkpoint.state_dict)
    except RuntimeError as e:
        raise InputError(
            f"the checkpoint's weights do not fit {checkpoint.source} after replaying its pruning "
            f"({str(e).splitlines()[0]})",
            "the source model changed since it was pruned",
        ) from e
    return module.eval()


def torch_source(spec: str, checkpoint: Path | None, log: Callable[[str], None], *, loaded: Any = None):
    """SOURCE `spec` as a ModelSource, rebuilt from a pruned `checkpoint` when one is given (from a copy of
    `loaded`, the source already loaded, when given)."""
    import copy
    import dataclasses

    from dlopt.fileio import guard_source_spec
    from dlopt.sources import load_source

    guard_source_spec(spec)
    if loaded is not None:
        source = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
    else:
        log(f"loading {spec}")
        source = load_source(spec)
    if checkpoint is None:
        return source
    log(f"rebuilding it from the checkpoint {checkpoint.parent.name[:12]}")
    module = rebuild(read_checkpoint(checkpoint), source.module, source.example_inputs)
    return dataclasses.replace(source, module=module, name=f"{source.name} (pruned)")


__all__ = [
    "CHECKPOINT_FORMAT",
    "PrunedCheckpoint",
    "checked_source",
    "pinned_source",
    "read_checkpoint",
    "rebuild",
    "require_torch_pruning",
    "save_checkpoint",
    "source_file",
    "torch_source",
]
