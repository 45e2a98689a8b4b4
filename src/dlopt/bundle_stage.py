"""The package stages: dlopt.package's PackageConfig and package() as a Stage (an ONNX model file in, a
verified bundle folder out), and `package-lm`: dlopt.package.lm.package_lm (an exported LM folder in, a
verified onnxruntime-genai bundle out). Adapters only: the bundles are built and verified by dlopt.package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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

    result = package_stage.apply(
        given.input_path(),
        config,
        StageContext(output=context.folder() / "bundle", lineage=context.lineage, after=context.after, log=context.log),
    )
    return Artifact.of(result.model, result.report)


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
    data_fields=("calibration",),  # the samples it verifies and measures on
)
def package_stage(model: Path, config: PackageConfig, context: StageContext) -> StageResult:
    if context.output is None:
        raise InputError("the package stage writes a bundle folder and was given none", "pass output= in its context")
    result = package(model, context.output, config, lineage=context.lineage, log=context.log)
    return StageResult(result.bundle, {"verification": result.manifest["verification"]})


@dataclass(frozen=True, kw_only=True)
class PackageLm:
    """How `package-lm` bundles an LM folder (dlopt.package.lm.package_lm): for `target`, with `prompts`
    (default: package_lm's own) and their `new_tokens` greedy tokens in the manifest."""

    VERSION: ClassVar[int] = 1
    target: str = "cpu"
    name: str | None = None  # the model's name in the manifest and model card (dlopt run: the recipe's name)
    prompts: tuple[str, ...] = ()
    new_tokens: int = 20
    measure_s: float = 2.0  # generation measured after packaging; 0 skips it
    threads: int | None = None


def _package_config(config: PackageLm) -> PackageConfig:
    return PackageConfig(target=config.target, name=config.name, measure_s=config.measure_s, threads=config.threads)


def _validate_lm(config: PackageLm) -> None:
    validate_config(_package_config(config))
    if config.new_tokens < 1:
        raise InputError(f"new_tokens must be at least 1, got {config.new_tokens}", "e.g. new_tokens = 20")


def _lm_folder_problem(folder, config, before) -> str | None:
    from dlopt.lm import is_lm_folder

    path = Path(folder) if isinstance(folder, (str, Path)) else None
    if path is None or not is_lm_folder(path):
        return f"{folder} is not an exported LM folder (genai_config.json, model.onnx)"
    return None


def _write_lm(given: StageInput, config: PackageLm, context: StageContext) -> Artifact:
    """The stage before's LM folder as the verified genai bundle OUTPUT/bundle."""

    result = package_lm_stage.apply(
        given.input_path(),
        config,
        StageContext(output=context.folder() / "bundle", lineage=context.lineage, after=context.after, log=context.log),
    )
    return Artifact.of(result.model, result.report)


@register_stage(
    kind="package-lm",
    config=PackageLm,
    takes="lm",
    makes="bundle",
    writer=_write_lm,
    requires=(Check("an exported LM folder", _lm_folder_problem),),
    ensures=(Check("a bundle with its manifest", _verified_problem),),
    summary="a verified onnxruntime-genai bundle with sample prompts and their greedy outputs",
    validate=_validate_lm,
)
def package_lm_stage(folder: Path, config: PackageLm, context: StageContext) -> StageResult:
    from dlopt.package.lm import package_lm

    result = package_lm(
        folder,
        context.folder(),
        _package_config(config),
        prompts=config.prompts,
        new_tokens=config.new_tokens,
        log=context.log,
    )
    return StageResult(result.bundle, {"verification": result.manifest["verification"]})


__all__ = ["PackageLm", "package_lm_stage", "package_stage"]
