"""What every optimization stage returns, and how stage configs serialize into reports and manifests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlopt.errors import InputError


@dataclass(frozen=True)
class StageResult:
    """A new model plus the stage's report (plain JSON-able values: it goes into the JSON report)."""

    model: Any  # onnx.ModelProto for ONNX stages, a torch module for torch stages
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TorchStageArtifacts:
    """What a torch stage (prune, distill) leaves in its output directory, and what it printed."""

    checkpoint: Path
    onnx: Path
    report_path: Path
    report: dict[str, Any]
    table: str
    notes: tuple[str, ...]


CONFIG_SCHEMA_VERSION = 1


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a plain dict with its type name and a version, for manifests."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(config).__name__} is not a config dataclass")
    body = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        body[f.name] = value
    return {"type": type(config).__name__, "version": CONFIG_SCHEMA_VERSION, "fields": body}


def config_from_dict(data: dict[str, Any], known: dict[str, type]) -> Any:
    """Inverse of config_to_dict; rejects unknown types, versions and keys."""
    type_name = data.get("type")
    if type_name not in known:
        raise InputError(f"unknown config type {type_name!r}", f"known: {', '.join(sorted(known))}")
    if data.get("version") != CONFIG_SCHEMA_VERSION:
        raise InputError(f"config {type_name} has version {data.get('version')!r}",
                         f"this dlopt reads version {CONFIG_SCHEMA_VERSION}")
    cls = known[type_name]
    names = {f.name: f for f in dataclasses.fields(cls)}
    fields = dict(data.get("fields", {}))
    unknown = set(fields) - set(names)
    if unknown:
        raise InputError(f"config {type_name} has unknown keys {sorted(unknown)}", "remove them")
    for key, value in fields.items():
        if isinstance(value, dict) and "type" in value and "fields" in value:
            fields[key] = config_from_dict(value, known)
        elif isinstance(value, list):
            fields[key] = tuple(value)
    return cls(**fields)
