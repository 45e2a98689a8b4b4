"""The package stage: dlopt.package's PackageConfig and package() as a Stage (an ONNX model file in, a
verified bundle folder out). An adapter only: the bundle itself is built and verified by dlopt.package."""

from __future__ import annotations

from pathlib import Path

from dlopt.errors import InputError
from dlopt.package import PackageConfig, package, validate_config
from dlopt.stage import Artifact, Check, StageContext, StageInput, StageResult, register_stage


def _model_file_problem(model, config, before) -> str | None:
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is None:
        return f"got a {type(model).__name__}, not the path of an .onnx file"
    if not path.is_file() or path.suffix != ".onnx":
        return f"{path} is not an .onnx file"
    return None


def _verified_problem(bundle, config, before) -> str | None:
    manifest = Path(bundle) / "manifest.json"
    return None if manifest.is_file() else f"{bundle} has no manifest.json"


def _write(given: StageInput, config: PackageConfig, context: StageContext) -> Artifact:
    """The stage before's model as the verified bundle folder OUTPUT/bundle (its lineage: context.lineage)."""
    from dlopt.manifest import artifact_hash

    result = package_stage.apply(
        given.input_path(),
        config,
        StageContext(output=context.folder() / "bundle", lineage=context.lineage, after=context.after, log=context.log),
    )
    return Artifact(Path(result.model), artifact_hash(Path(result.model)), result.report)


@register_stage(
    kind="package",
    config=PackageConfig,
    takes="onnx",
    makes="bundle",
    writer=_write,
    requires=(Check("an ONNX model file", _model_file_problem),),
    ensures=(Check("a bundle with its manifest", _verified_problem),),
    summary="a verified, self-describing bundle for the target",
    validate=validate_config,
)
def package_stage(model: Path, config: PackageConfig, context: StageContext) -> StageResult:
    if context.output is None:
        raise InputError("the package stage writes a bundle folder and was given none", "pass output= in its context")
    result = package(model, context.output, config, lineage=context.lineage, log=context.log)
    return StageResult(result.bundle, {"verification": result.manifest["verification"]})


__all__ = ["package_stage"]
