"""The Stage interface: what every transformation is to the rest of dlopt.

A stage has a `kind` name, a typed, versioned, frozen config class, named `requires` / `ensures`
checks on its input and output, and `run(input, config, context) -> StageResult` (a new model and
its report). A stage module registers its Stage with the `@register_stage` decorator; the registry maps
a kind to its Stage only, and imports a stage module (STAGE_MODULES) when its kind is first asked for.

Configs serialize to plain JSON-able dicts, `{"type": class name, "version": N, "fields": {...}}`
(nested configs, tuples, tuples of tuples and Paths included), so a manifest records exactly what
made an artifact; `config_from_dict` rebuilds the config from its class's type hints and rejects
unknown types, versions and keys.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from dlopt.errors import DlOptError, InputError, StageError


@dataclass(frozen=True)
class StageResult:
    """A new model plus the stage's report (plain JSON-able values: it goes into the JSON report)."""

    model: Any  # onnx.ModelProto for ONNX stages, a torch module for torch stages
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageInput:
    """What a stage's writer reads besides its config: `artifact`, the file or folder the stage before made
    (None: the source itself), the source spec (a torch stage loads and rebuilds from it), the data specs
    (calibration, held-out eval data, distill's training data) and `keep_failed`: the final output, beside
    which a result that fails its verification is kept."""

    artifact: Path | None
    source: str
    calibration: Any = None
    eval_data: Any = None
    training_data: str | None = None
    keep_failed: Path | None = None

    def input_path(self) -> Path:
        """The artifact a stage that reads a model reads: an error when no stage before made one."""
        if self.artifact is None:
            raise StageError(
                "the stage reads a model and no stage before made one",
                "begin the recipe with an export stage, or give an .onnx source",
            )
        return self.artifact


@dataclass(frozen=True)
class Artifact:
    """What a stage wrote: the file or folder, its sha256 (dlopt.manifest.artifact_hash) and the report."""

    path: Path
    sha256: str
    report: dict[str, Any]

    @classmethod
    def of(cls, path: Path | str, report: dict[str, Any]) -> Artifact:
        """The artifact at `path`, hashed here: the one place a stage's output gets its sha256."""
        from dlopt.manifest import artifact_hash

        return cls(Path(path), artifact_hash(Path(path)), report)


@dataclass(frozen=True)
class TorchStageArtifacts:
    """What a torch stage (prune, distill) leaves in its output directory, and what it printed."""

    checkpoint: Path
    onnx: Path
    report_path: Path
    report: dict[str, Any]
    table: str
    notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Stages and their checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageContext:
    """What a stage may need besides its input and config. `after`: the kinds of the stages that made
    the input, in order (named in errors: "int8-static failed after export, prune: ...")."""

    data: Any = None  # calibration / training data (a CalibrationData, a DistillData), or None
    eval_data: Any = None  # held-out samples to measure fidelity on, or None
    teacher: Any = None  # distill: the teacher (a ModelSource)
    output: Path | None = None  # stages that write a folder (package: the bundle; distill: its state): where
    # package: the stages that made its input (dlopt run's), with configs and hashes, for the manifest
    lineage: tuple[Mapping[str, Any], ...] | None = None
    after: tuple[str, ...] = ()
    resume: bool = False  # continue from the state a long stage (distill) saved in `output`
    progress: bool = False
    log: Callable[[str], None] = lambda message: None

    def folder(self) -> Path:
        """`output`, for a stage that writes into a folder: an error when it was given none."""
        if self.output is None:
            raise StageError("the stage writes into a folder and was given none", "pass output= in its context")
        return self.output


@dataclass(frozen=True)
class Check:
    """A named condition on a stage's input (requires) or output (ensures). `test(model, config, before)`
    returns None when it holds, else what is wrong; `before` is the stage's input, for ensures checks."""

    name: str  # what is required or ensured, e.g. "a float ONNX model"
    test: Callable[[Any, Any, Any], str | None]


# torch: a dlopt.sources.ModelSource; onnx: an onnx.ModelProto (a .onnx file on disk); bundle: a package
# folder; lm: an exported decoder LM folder (genai_config.json, model.onnx + data, tokenizer), as
# `dlopt export --task text-generation` writes and onnxruntime-genai loads.
ArtifactKind = Literal["torch", "onnx", "bundle", "lm"]


# The data a recipe gives its stages (dlopt.recipe): calibration, held-out eval data, distill's training data.
RECIPE_DATA = ("calibration", "eval_data", "training_data")

RunStage = Callable[[Any, Any, StageContext], StageResult]
WriteStage = Callable[[StageInput, Any, StageContext], Artifact]


@dataclass(frozen=True)
class Stage:
    kind: str
    config: type  # the frozen config dataclass; its VERSION class attribute is the schema version
    run: RunStage
    takes: ArtifactKind  # what its input is: a torch source, an ONNX model, a bundle
    makes: ArtifactKind
    requires: tuple[Check, ...] = ()
    ensures: tuple[Check, ...] = ()
    summary: str = ""
    validate: Callable[[Any], None] | None = None  # raises InputError for a bad config, before any work
    # Writes the stage's output into context.output atomically and returns it as an Artifact (what dlopt run
    # caches); None for a stage that runs only inside another stage.
    writer: WriteStage | None = field(default=None, compare=False)
    # What a recipe needs to know of the stage, declared here so that the recipe runner has no branch on the
    # kind. reads: the recipe's data it reads ("calibration", "eval_data", "training_data"), whose hashes key
    # its cache entry; data_fields: fields of its config naming data files keyed the same way (package's
    # calibration); quantizes: it lowers precision (takes a float32 model, times kernels on a CPU target, may
    # keep a failed result beside the output); precision: the precision of the model it makes, from its
    # config; recipe_check(recipe, its StageSpec, where): rules on its place in a recipe (InputError).
    reads: tuple[str, ...] = ()
    data_fields: tuple[str, ...] = ()
    quantizes: bool = False
    precision: Callable[[Any], str | None] | None = field(default=None, compare=False)
    recipe_check: Callable[[Any, Any, str], None] | None = field(default=None, compare=False)

    def write(self, given: StageInput, config: Any, context: StageContext) -> Artifact:
        """Run the stage on files: its input artifact in, its output written into context.output."""
        if self.writer is None:
            raise InputError(
                f"the {self.kind} stage runs inside another stage, not on its own",
                "use the key of the stage that runs it",
            )
        return self.writer(given, config, context)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A registered stage travels (to worker processes) as its kind: its run function's module-level name
        # is the decorated Stage itself, so pickle could not find the function by name.
        return (get_stage, (self.kind,)) if _REGISTERED.get(self.kind) is self else super().__reduce__()

    def check_config(self, config: Any) -> None:
        if not isinstance(config, self.config):
            raise InputError(
                f"{self.kind} takes a {self.config.__name__}, not a {type(config).__name__}",
                f"build a {self.config.__name__}",
            )
        problem = _non_finite(config)
        if problem:  # NaN makes every comparison false: a NaN floor passes everything, a NaN time never ends
            raise InputError(
                f"{self.kind}: {problem[0]} must be a finite number, not {problem[1]}",
                f"give {{{problem[0]}=VALUE}} a finite number",
            )
        if self.validate is not None:
            self.validate(config)

    def apply(self, model: Any, config: Any, context: StageContext = StageContext()) -> StageResult:
        """Check the config and what the stage requires of its input, run it, check what it ensures."""
        self.check_config(config)
        for check in self.requires:
            problem = check.test(model, config, None)
            if problem:
                raise InputError(f"{self._failed(context)}: requires {check.name}: {problem}")
        try:
            result = self.run(model, config, context)
        except DlOptError as e:
            if context.after:  # same class, same exit code; the message says which chain it was in
                e.message = f"{self._failed(context)}: {e.message}"
            raise
        for check in self.ensures:
            problem = check.test(result.model, config, model)
            if problem:
                raise StageError(f"{self._failed(context)}: ensures {check.name}: {problem}", "report this model")
        return result

    def _failed(self, context: StageContext) -> str:
        return f"{self.kind} failed" + (f" after {', '.join(context.after)}" if context.after else "")


# kind -> the module that registers its Stage (with @register_stage), imported on first use only
# (get_stage): listing the kinds imports no stage. Like a package's entry points: where to find a kind.
STAGE_MODULES: dict[str, str] = {
    "export": "dlopt.optimize.export",
    "prune": "dlopt.optimize.prune",
    "distill": "dlopt.optimize.distill",
    "quantize": "dlopt.optimize.quantize.stages",  # the auto front door: resolves to one of the schemes below
    "int8-dynamic": "dlopt.optimize.quantize.stages",
    "int8-static": "dlopt.optimize.quantize.stages",
    "int8-weight-only": "dlopt.optimize.quantize.stages",
    "int4-weight-only": "dlopt.optimize.quantize.stages",
    "fp16": "dlopt.optimize.quantize.stages",
    "trim-padding": "dlopt.optimize.trim_padding",
    "package": "dlopt.bundle_stage",
    "export-lm": "dlopt.optimize.lm_stages",  # decoder LMs for generation: a torch source -> an LM folder
    "int4-lm": "dlopt.optimize.lm_stages",  # an LM folder -> its 4-bit (mixed 4/8) folder
    "package-lm": "dlopt.bundle_stage",  # an LM folder -> a genai bundle
}
_REGISTERED: dict[str, Stage] = {}  # kind -> its Stage, filled by register_stage as stage modules load


def register_stage(
    *,
    kind: str,
    config: type,
    takes: ArtifactKind,
    makes: ArtifactKind,
    requires: tuple[Check, ...] = (),
    ensures: tuple[Check, ...] = (),
    summary: str = "",
    validate: Callable[[Any], None] | None = None,
    writer: WriteStage | None = None,
    reads: tuple[str, ...] = (),
    data_fields: tuple[str, ...] = (),
    quantizes: bool = False,
    precision: Callable[[Any], str | None] | None = None,
    recipe_check: Callable[[Any, Any, str], None] | None = None,
) -> Callable[[RunStage], Stage]:
    """Decorate a stage's `run(input, config, context) -> StageResult` to make it the Stage `kind` of the
    registry; the decorated name is that Stage. `writer`: how it runs on files (Stage.write)."""
    if kind not in STAGE_MODULES:
        raise TypeError(f"stage kind {kind!r} is not in dlopt.stage.STAGE_MODULES: add where it is registered")

    def decorate(run: RunStage) -> Stage:
        stage = Stage(
            kind=kind,
            config=config,
            run=run,
            takes=takes,
            makes=makes,
            requires=requires,
            ensures=ensures,
            summary=summary,
            validate=validate,
            writer=writer,
            reads=reads,
            data_fields=data_fields,
            quantizes=quantizes,
            precision=precision,
            recipe_check=recipe_check,
        )
        if unknown := set(reads) - set(RECIPE_DATA):
            raise TypeError(f"stage kind {kind!r} reads {sorted(unknown)}: a recipe's data are {RECIPE_DATA}")
        if kind in _REGISTERED and _REGISTERED[kind].run.__qualname__ != run.__qualname__:
            raise TypeError(f"stage kind {kind!r} is registered twice")
        _REGISTERED[kind] = stage
        return stage

    return decorate


def stage_kinds() -> tuple[str, ...]:
    return tuple(STAGE_MODULES)


def get_stage(kind: str) -> Stage:
    module = STAGE_MODULES.get(kind)
    if module is None:
        raise InputError(f"unknown stage kind {kind!r}", f"choose one of {', '.join(STAGE_MODULES)}")
    if kind not in _REGISTERED:
        importlib.import_module(module)
    stage = _REGISTERED.get(kind)
    if stage is None:
        raise TypeError(f"{module} registers no stage {kind!r}")
    return stage


def stage_for_config(config: Any) -> Stage:
    """The registered stage whose config class `config` is (imports the stage modules)."""
    for kind in STAGE_MODULES:
        stage = get_stage(kind)
        if type(config) is stage.config:
            return stage
    raise InputError(f"{type(config).__name__} is not a stage config", f"known stages: {', '.join(STAGE_MODULES)}")


# ---------------------------------------------------------------------------------------------
# Configs to and from plain dicts
# ---------------------------------------------------------------------------------------------


def _non_finite(config: Any, prefix: str = "") -> tuple[str, float] | None:
    """(field, value) of the first NaN or infinite number in a config (nested configs and tuples too)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                return prefix + f.name, item
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                found = _non_finite(item, f"{prefix}{f.name}.")
                if found:
                    return found
    return None


def config_version(cls: type) -> int:
    # Nested value configs from other modules (ImagePreprocess, PackageConfig) declare no VERSION: 1.
    return int(getattr(cls, "VERSION", 1))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a plain JSON-able dict with its type name and version."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"{type(config).__name__} is not a config dataclass")
    body = {f.name: _encode(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"type": type(config).__name__, "version": config_version(type(config)), "fields": body}


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


class ConfigValueError(InputError):
    """A config key whose value is not of the field's declared type; `key` is the top-level key (for a
    recipe's line number)."""

    def __init__(self, message: str, hint: str | None = None, *, key: str | None = None):
        super().__init__(message, hint)
        self.key = key


def config_from_dict(data: Any, cls: type | None = None) -> Any:
    """Inverse of config_to_dict. `cls`: the expected class (else any registered stage's config, by its
    type name). Unknown types, versions and keys, and values that are not of their field's declared
    type (a string where a bool belongs, NaN where a number does), are InputErrors."""
    if not isinstance(data, Mapping) or not isinstance(data.get("fields", {}), Mapping):
        raise InputError(
            f"a config must be a table with type, version and fields, not {shown_value(data)}",
            "write it as config_to_dict does",
        )
    type_name = data.get("type")
    if cls is None:
        known = {get_stage(kind).config.__name__: get_stage(kind).config for kind in STAGE_MODULES}
        if type_name not in known:
            raise InputError(f"unknown config type {shown_value(type_name)}", f"known: {', '.join(sorted(known))}")
        cls = known[type_name]
    elif type_name != cls.__name__:
        raise InputError(
            f"config type {shown_value(type_name)} where a {cls.__name__} belongs", f"give a {cls.__name__}"
        )
    version = config_version(cls)
    if data.get("version") != version:
        raise InputError(
            f"config {type_name} has version {shown_value(data.get('version'))}", f"this dlopt reads version {version}"
        )
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    fields = dict(data.get("fields", {}))
    unknown = sorted(str(k) for k in set(fields) - names)
    if unknown:
        raise InputError(f"config {type_name} has unknown keys {unknown}", f"known keys: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in fields.items():
        try:
            values[key] = _decode(value, hints.get(key, Any), f"{type_name}.{key}")
        except ConfigValueError as e:
            raise ConfigValueError(e.message, e.hint, key=key) from e
        except InputError as e:  # a nested config's own error: which key of this one holds it
            raise ConfigValueError(e.message, e.hint, key=key) from e
    try:
        return cls(**values)
    except TypeError as e:
        raise InputError(f"config {type_name}: {e}", "check its fields") from e


def shown_value(value: Any) -> str:
    """A value in a message, never longer than a line (a recipe value may be a 5 MB string)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_text(hint: Any) -> str:
    """`hint` as a reader of a recipe knows types: a number, true or false, a string, a list, one of 'a', 'b'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args if a is not type(None))
    if origin is Literal:
        return "a string" if all(isinstance(a, str) for a in args) else "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return "a list" + (f" of {plural.get(args[0], 'values')}" if len(args) == 2 and args[1] is Ellipsis else "")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} table"
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path (a string)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _fits(hint: Any, value: Any) -> bool:
    """Whether a JSON value is the encoded form of `hint` (one option of a union)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is Literal:  # the type only: which values a stage takes is its validate's to say, with its hint
        return any(type(value) is type(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return isinstance(value, str)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin is dict:
        return isinstance(value, Mapping)
    return hint is Any


def _decode(value: Any, hint: Any, where: str) -> Any:
    """A JSON value back to the type its field declares (lists to tuples, dicts to configs, str to Path),
    refusing a value of another type: `per_channel = "false"` is not a false bool, `samples = "2"` no count."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong(expected: str | None = None) -> ConfigValueError:
        return ConfigValueError(
            f"{where} must be {expected or _type_text(hint)}, not {shown_value(value)}",
            f"write {where.rpartition('.')[2]} as {expected or _type_text(hint)}",
        )

    if hint is Any:
        return tuple(value) if isinstance(value, list) else value
    if value is None:
        if origin in (Union, types.UnionType) and type(None) in args:
            return None
        raise wrong()
    if origin in (Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            if _fits(option, value):
                return _decode(value, option, where)
        raise wrong()
    if not _fits(hint, value):
        raise wrong()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return config_from_dict(value, hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise wrong(f"a list of {len(args)} values")
        return (
            tuple(_decode(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
        )
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return hint(value)
    if hint is float:
        if not math.isfinite(value):  # TOML's nan and inf: no tolerance, time or floor is meant to be one
            raise wrong("a finite number")
        return float(value)
    if origin is dict and len(args) == 2:
        return {k: _decode(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    return value


__all__ = [
    "Artifact",
    "Check",
    "ConfigValueError",
    "RunStage",
    "STAGE_MODULES",
    "Stage",
    "StageContext",
    "StageInput",
    "StageResult",
    "TorchStageArtifacts",
    "WriteStage",
    "config_from_dict",
    "config_to_dict",
    "config_version",
    "get_stage",
    "register_stage",
    "shown_value",
    "stage_for_config",
    "stage_kinds",
]
