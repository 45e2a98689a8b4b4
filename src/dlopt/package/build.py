"""The model in the target's form: the source copied (or its shapes fixed) and converted (ORT format
for mobile, ONNX with session settings for cpu and cuda).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dlopt.errors import InputError
from dlopt.fileio import load_onnx
from dlopt.package.config import Log, PackageConfig, builds


def parse_fix_shapes(texts: Iterable[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(input name, shape) of each --fix-shape NAME=DIMS text; an input named twice is an InputError."""
    from dlopt.targets.mobile import parse_fix_shape

    parsed = [parse_fix_shape(t) for t in texts]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise InputError(f"fixed shapes name an input twice: {names}", "give each input once")
    return parsed


def save_onnx(model, path: Path) -> None:
    """Write `model` to `path`, its weights to PATH.data when it is over protobuf's 2 GiB."""
    import onnx

    large = model.ByteSize() > 2**31 - 1
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def copy_onnx(src: Path, dst: Path, external: Sequence[str]) -> None:
    """Copy the model file `src` to `dst` with its external data files (names relative to its folder)."""
    shutil.copyfile(src, dst)
    for location in external:
        shutil.copyfile(src.parent / location, dst.parent / location)


def build_model(prepared: Path, staging: Path, config: PackageConfig, log: Log) -> dict[str, Any]:
    """Write the model in the target's form into the staging folder."""
    if builds(config, "ort"):
        from dlopt.targets.mobile import SESSION_CONFIG_FOR_STYLE, STYLE_FOR_EP, to_ort_format

        intended = config.intended_ep or "cpu"
        style = STYLE_FOR_EP[intended]
        log(f"converting to ORT format ({style} optimization style, for the {intended} EP)")
        conversion = to_ort_format(prepared, staging, style=style, type_reduction=config.type_reduction)
        return {
            "file": conversion.model.name,
            "format": "ort",
            "intended_ep": intended,
            "optimization_style": style,
            "graph_optimization_level": "all" if style == "Fixed" else "basic",
            "session_config": dict(SESSION_CONFIG_FOR_STYLE[style]),
            "operators_config": conversion.operators_config.name,
            "ort_format_version": conversion.ort_format_version,
        }
    from dlopt.targets.mobile import external_data_files

    external = external_data_files(load_onnx(prepared, load_external_data=False))
    if external:
        raise InputError(
            f"{prepared.name} keeps its weights in external data files {external}",
            "bundles hold single-file models under 2 GiB for now",
        )
    shutil.copyfile(prepared, staging / "model.onnx")
    return {
        "file": "model.onnx",
        "format": "onnx",
        "intended_ep": config.target,
        "optimization_style": None,
        "graph_optimization_level": None,
        "session_config": {},
        "operators_config": None,
        "ort_format_version": None,
    }
