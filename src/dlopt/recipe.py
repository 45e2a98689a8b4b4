"""`dlopt run recipe.toml`: a source model, its data, a target and an ordered list of stages, each
stage's output cached by content (dlopt.stagecache).

    source = "minilm"                 # a reference model, file.py:build, package.module:build, or an .onnx
    target = "cpu"                    # the default `target` of every stage that has one
    calibration = "model:minilm"      # optional: any source of dlopt.data (as `dlopt quantize` takes it)
    eval_data = "heldout.npz"         # optional: where quantize measures fidelity
    data_spec = "spec.toml"           # optional: a data spec file (docs/data.md), for both
    [data]                            # optional: the same keys (layout, values, image) here; they win
    layout = { state = 1 }            #   over data_spec's; both are recorded in the lineage
    name = "minilm-int8"              # optional: the bundle's model name
    training_data = "train.npz"       # optional: what distill trains on (default: the reference model's own)

    [[stage]]
    kind = "prune"                    # optional, torch sources: the pruned checkpoint is the cached artifact
    ratio = 0.5
    [[stage]]
    kind = "distill"                  # optional, right after prune: the source teaches the pruned student
    epochs = 2                        #   (dlopt.optimize.distill.Distill's keys); its checkpoint is cached
    [[stage]]
    kind = "export"                   # then the stage config's keys (dlopt.optimize.export.Export)
    [[stage]]
    kind = "int8-static"              # a scheme: int8-dynamic, int8-static, int8-weight-only,
    method = "percentile"             #   int4-weight-only, fp16; `image` is a table of ImagePreprocess keys
    [[stage]]
    kind = "package"                  # PackageConfig's keys; must be the last stage

Decoder LMs: `source` is smollm2 or a Hugging Face causal-LM folder (then `[[stage]] kind = "export-lm"`
first), or an exported LM folder; `int4-lm` quantizes it (calibration: a UTF-8 text file; eval_data: held-out
text, scored against the stage's input) and `package-lm` bundles it for onnxruntime-genai
(recipes/smollm2-int4.toml). A recipe that ends with an LM stage writes an LM folder at -o.

Stage kinds are those of the Stage registry (dlopt.stage.STAGES). `kind = "quantize"` (QuantizeConfig's
keys, precision and mode auto) is the front door of `dlopt quantize`: it resolves to a scheme when it
runs, and the lineage records which one and why.

Relative paths are relative to the recipe's folder. A stage's cache key is the sha256 of the input
artifact (or the torch source's file and the local modules it imports: `local_modules`), the stage's
config dict, the data's hash and the host facts that change the result (see `host_facts`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

import dlopt
from dlopt.data import DataSpec, local_modules, read_spec_file, reader_hash, source_path, spec_from_keys, spec_hash
from dlopt.errors import DlOptError, InputError, StageError
from dlopt.manifest import artifact_hash
from dlopt.stage import (
    ConfigValueError,
    StageContext,
    StageInput,
    config_from_dict,
    config_to_dict,
    config_version,
    get_stage,
    shown_value,
    stage_kinds,
)
from dlopt.stagecache import Entry, StageCache, cache_key

TOP_KEYS = ("source", "target", "calibration", "eval_data", "data_spec", "data", "name", "training_data", "stage")
# The torch stages: prune's cached artifact is the pruned checkpoint (rebuilt from the source by replaying
# its pruning), distill's the same checkpoint format with trained weights (the teacher is the recipe's
# source, the student the prune stage's checkpoint); a later export stage turns it into ONNX.
Log = Callable[[str], None]


def recipe_kinds() -> tuple[str, ...]:
    return stage_kinds()


@dataclass(frozen=True)
class StageSpec:
    index: int  # 1-based
    kind: str
    config: Any
    line: int | None  # of its [[stage]] header in the recipe


@dataclass(frozen=True)
class Recipe:
    path: Path
    source: str  # an absolute .onnx path, or a torch source spec
    target: str | None
    calibration: str | DataSpec | None  # a source text, or a DataSpec when the recipe declares more
    eval_data: str | DataSpec | None
    name: str | None
    stages: tuple[StageSpec, ...]
    training_data: str | None = None  # distill's: an .npz; None: the source reference model's own

    @property
    def onnx_source(self) -> bool:
        return self.source.endswith(".onnx")

    @property
    def lm_source(self) -> bool:
        """The source is an exported LM folder (genai_config.json + model.onnx): LM stages read it as it is."""
        from dlopt.lm import is_lm_folder

        return is_lm_folder(self.source)

    @property
    def source_artifact(self) -> Path | None:
        """The source as the first stage's input artifact: an .onnx file or an LM folder; None for a torch
        source (its first stage loads it)."""
        return Path(self.source) if self.onnx_source or self.lm_source else None

    @property
    def distill_data(self) -> str:
        """What distill trains on: `training_data`, else model:SOURCE (the reference model's own)."""
        return self.training_data or f"model:{self.source}"


def _stage_lines(text: str) -> list[int]:
    """Line numbers of the `[[stage]]` headers, in order (tomllib reports no positions)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*stage\s*\]\]", line)]


def _key_line(text: str, start: int | None, key: str) -> int | None:
    """The line of `key = ...` in the table that starts at line `start` (the top level when None)."""
    lines = text.splitlines()
    for n in range(start or 1, len(lines) + 1):
        line = lines[n - 1]
        if n > (start or 0) and re.match(r"\s*\[", line):
            break
        if re.match(rf"\s*{re.escape(key)}\s*=", line) or re.match(rf"\s*\[\s*{re.escape(key)}\s*\]", line):
            return n
    return start


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


@overload
def _resolve(base: Path, spec: str) -> str: ...
@overload
def _resolve(base: Path, spec: str | None) -> str | None: ...
def _resolve(base: Path, spec: str | None) -> str | None:
    """A relative path in the recipe is relative to the recipe's folder; model:NAME and module specs stay."""
    if spec is None or spec.startswith("model:"):
        return spec
    path_part, sep, func = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    candidate = Path(path_part).expanduser()
    if candidate.is_absolute():
        return str(candidate) + sep + func
    if (base / candidate).exists() or "/" in path_part or path_part.endswith((".onnx", ".py", ".npz")):
        return str((base / candidate).resolve()) + sep + func
    return spec  # a reference model name or package.module:build


def build_config(kind: str, keys: Mapping[str, Any], *, where: str, target: str | None = None) -> Any:
    """The stage's frozen config from its TOML keys (a table for a nested config such as `image`);
    unknown keys and bad values are input errors naming `where`."""
    cls = get_stage(kind).config
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise InputError(
            f"{where}: unknown {cls.__name__} key(s) {', '.join(unknown)}", f"known keys: {', '.join(sorted(names))}"
        )
    values = {"target": target} if target and "target" in names else {}
    values.update(keys)
    try:
        return config_from_dict(_as_config_dict(cls, values), cls)
    except ConfigValueError as e:
        raise ConfigValueError(f"{where}: {e.message}", e.hint, key=e.key) from e
    except InputError as e:
        raise InputError(f"{where}: {e.message}", e.hint) from e


def _as_config_dict(cls: type, keys: Mapping[str, Any]) -> dict[str, Any]:
    """TOML keys in config_to_dict's form: a table where the field holds a config becomes that config."""
    import typing

    hints = typing.get_type_hints(cls)
    fields = {}
    for key, value in keys.items():
        nested = [
            t
            for t in (hints.get(key), *typing.get_args(hints.get(key)))
            if isinstance(t, type) and dataclasses.is_dataclass(t)
        ]
        if nested and isinstance(value, Mapping) and "fields" not in value:
            value = _as_config_dict(nested[0], value)
        fields[key] = value
    return {"type": cls.__name__, "version": config_version(cls), "fields": fields}


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe: every stage's config is built (and validated) before any work."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the recipe {path}: {e.strerror or e}", "check the path") from e
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = raw_bytes[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{bad_line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at offset {e.start})",
            "save the recipe as UTF-8 (TOML files are UTF-8)",
        ) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}", "fix the recipe's syntax") from e
    except RecursionError as e:  # tomllib recurses per nesting level: thousands of [[[ ... exhaust the stack
        raise InputError(
            f"{path}: values nested too deeply to read", "a recipe nests a table or list a few levels at most"
        ) from e
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise InputError(
            f"{_where(path, _key_line(text, None, unknown[0]))}: unknown recipe key(s) {', '.join(unknown)}",
            f"known: {', '.join(TOP_KEYS)}",
        )
    if "source" not in data:
        raise InputError(f"{path}: no source", 'add source = "model.onnx" (or a torch source such as "minilm")')
    for key in ("source", "target", "calibration", "eval_data", "name", "training_data"):
        if key in data and not (isinstance(data[key], str) and data[key].strip()):
            raise InputError(
                f"{_where(path, _key_line(text, None, key))}: {key} must be a non-empty string, not "
                f"{shown_value(data[key])}",
                f'write it in quotes, e.g. {key} = "..."',
            )
    base = path.resolve().parent
    raw_stages = data.get("stage", [])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise InputError(
            f"{_where(path, _key_line(text, None, 'stage'))}: no stages",
            'add [[stage]] tables, e.g. [[stage]] kind = "quantize"',
        )
    lines = _stage_lines(text)
    stages = []
    for i, raw in enumerate(raw_stages, 1):
        line = lines[i - 1] if i <= len(lines) else None
        where = f"{_where(path, line)} (stage {i})"
        if not isinstance(raw, dict):
            raise InputError(
                f"{_where(path, line or _key_line(text, None, 'stage'))}: stage {i} is {shown_value(raw)}, not a table",
                'write each stage as a [[stage]] table with kind = "..."',
            )
        keys = dict(raw)
        kind = keys.pop("kind", None)
        if not isinstance(kind, str) or kind not in recipe_kinds():
            where = f"{_where(path, _key_line(text, line, 'kind') if kind is not None else line)} (stage {i})"
            raise InputError(f"{where}: unknown stage kind {kind!r}", f"choose one of {', '.join(recipe_kinds())}")
        cls = get_stage(kind).config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keys) - fields)
        if unknown:
            raise InputError(
                f"{_where(path, _key_line(text, line, unknown[0]))} (stage {i}, {kind}): unknown "
                f"{cls.__name__} key(s) {', '.join(unknown)}",
                f"known keys: {', '.join(sorted(fields))}",
            )
        for key in ("calibration", "torch_source"):
            if isinstance(keys.get(key), str):
                keys[key] = _resolve(base, keys[key])
        try:
            config = build_config(kind, keys, where=where, target=data.get("target"))
        except ConfigValueError as e:  # named at the line of the key whose value is wrong
            at = _key_line(text, line, e.key) if e.key is not None and e.key in keys else line
            detail = e.message.removeprefix(f"{where}: ")
            raise InputError(f"{_where(path, at)} (stage {i}, {kind}): {detail}", e.hint) from e
        stages.append(StageSpec(i, kind, config, line))
    declared = _declared_data(data, base, path, text)
    calibration = _resolve(base, data.get("calibration"))
    if calibration is None and declared.source is not None:
        calibration = declared.source
    recipe = Recipe(
        path=path,
        source=_resolve(base, data["source"]),
        target=data.get("target"),
        calibration=_with_spec(declared, calibration),
        eval_data=_with_spec(declared, _resolve(base, data.get("eval_data"))),
        name=data.get("name"),
        stages=tuple(stages),
        training_data=_resolve(base, data.get("training_data")),
    )
    _check_source(recipe, _where(path, _key_line(text, None, "source")))
    _check_order(recipe)
    return recipe


def _check_source(recipe: Recipe, where: str) -> None:
    """The source is an .onnx file, a reference model, path/to/file.py:FUNCTION or package.module:FUNCTION
    (a module that can be found): anything else is refused here, before any stage runs."""
    import importlib.util

    from dlopt.models import REFERENCE_MODELS
    from dlopt.usercode import user_code

    spec = recipe.source
    if recipe.onnx_source or spec in REFERENCE_MODELS or ".py:" in spec or Path(spec).is_dir():
        return  # a folder: an exported LM folder, or a Hugging Face model folder that export-lm reads
    forms = f"an .onnx file, a reference model ({', '.join(REFERENCE_MODELS)}), file.py:build or package.module:build"
    module, sep, function = spec.rpartition(":")
    if not sep or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise InputError(f"{where}: source {spec!r} is not a model source", f"give {forms}")
    try:
        with user_code(f"finding the source module {module!r}", hint="fix the module", errors=False):
            found = importlib.util.find_spec(module)  # imports its parent packages: user code
    except (ImportError, ValueError) as e:
        found, reason = None, f" ({e})"
    else:
        reason = ""
    if found is None:
        raise InputError(
            f"{where}: source module {module!r} cannot be found{reason}",
            f"give {forms} (a module must be installed or on PYTHONPATH)",
        )


def _declared_data(data: Mapping[str, Any], base: Path, path: Path, text: str) -> DataSpec:
    """The recipe's data spec: its `data_spec` file's keys, then its [data] table's (layout, values, image)."""
    declared = DataSpec()
    spec_file = data.get("data_spec")
    if spec_file is not None:
        if not isinstance(spec_file, str):
            raise InputError(
                f"{_where(path, _key_line(text, None, 'data_spec'))}: data_spec must be a file name",
                'e.g. data_spec = "spec.toml"',
            )
        declared = read_spec_file(base / Path(spec_file).expanduser())
    table = data.get("data")
    if table is not None:
        if not isinstance(table, Mapping):
            raise InputError(
                f"{_where(path, _key_line(text, None, 'data'))}: data must be a table",
                "e.g. [data] with layout, values, image",
            )
        keys = spec_from_keys(
            table, where=_where(path, _key_line(text, None, "data")), allowed=("layout", "values", "image")
        )
        declared = DataSpec(
            source=declared.source,
            layout=tuple((dict(declared.layout) | dict(keys.layout)).items()),
            values=tuple((dict(declared.values) | dict(keys.values)).items()),
            image=keys.image or declared.image,
        )
    return declared


def _with_spec(declared: DataSpec, source: str | None) -> str | DataSpec | None:
    """A data source with the recipe's declared spec; a plain source stays text (its cache key unchanged)."""
    if source is None:
        return None
    spec = declared.with_source(source)
    return source if spec == DataSpec(source=source) else spec


def _check_order(recipe: Recipe) -> None:
    """Each stage takes what the one before made (the source for the first): a torch source must be
    exported first, a bundle ends the recipe; each config passes its stage's checks."""
    made = "onnx" if recipe.onnx_source else "lm" if recipe.lm_source else "torch"
    for stage in recipe.stages:
        where = f"{_where(recipe.path, stage.line)} (stage {stage.index}, {stage.kind})"
        spec = get_stage(stage.kind)
        if made == "bundle":
            raise InputError(
                f"{where}: the stage before makes a bundle, not a model: a bundle ends the recipe",
                "move the package stage last",
            )
        if spec.makes == "bundle" and stage.index != len(recipe.stages):
            raise InputError(
                f"{where}: {stage.kind} makes a bundle, not a model: it must be the last stage", "move it last"
            )
        if spec.takes != made:
            if made == "torch":
                export = "export-lm" if spec.takes == "lm" else "export"
                raise InputError(
                    f"{where}: the source {recipe.source} is a torch model; the first stage must export it",
                    f'add [[stage]] kind = "{export}" first',
                )
            raise InputError(
                f"{where}: {stage.kind} takes a {spec.takes} model and the "
                f"{'source' if stage.index == 1 else 'stage before'} gives an {made} one",
                "drop it for an .onnx source, or move it first" if spec.takes == "torch" else "reorder the stages",
            )
        if spec.recipe_check is not None:
            spec.recipe_check(recipe, stage, where)
        if spec.quantizes and any(_precision(s) == "fp16" for s in recipe.stages[: stage.index - 1]):
            raise InputError(
                f"{where}: the stage before made an FP16 model: {stage.kind} takes a float32 one",
                "quantize once per recipe: keep one fp16 (or int8/int4) stage",
            )
        if spec.writer is None:
            raise InputError(
                f"{where}: the {stage.kind} stage runs inside another stage, not on its own",
                "use the key of the stage that runs it",
            )
        made = spec.makes
        try:
            spec.check_config(stage.config)
        except InputError as e:
            raise InputError(f"{where}: {e.message}", e.hint) from e
    if made == "torch":
        last = recipe.stages[-1]
        raise InputError(
            f"{_where(recipe.path, last.line)} (stage {last.index}, {last.kind}): a recipe ends with an "
            "ONNX model or a bundle, not a torch checkpoint",
            'add [[stage]] kind = "export" after it',
        )


def _precision(stage: StageSpec) -> str | None:
    """The precision of the model the stage makes (fp16 for an fp16 stage or a quantize stage asking for it)."""
    made = get_stage(stage.kind).precision
    return made(stage.config) if made is not None else None


# ---------------------------------------------------------------------------------------------
# Cache keys
# ---------------------------------------------------------------------------------------------


def host_facts(kind: str, config: Any) -> dict[str, Any]:
    """The facts of this host that change a stage's output. Quantization for a target whose kernels run
    here (cpu) times kernel choices (LayerNorm forms, node forms) on this CPU, so its ISA class is in the key."""
    from dlopt.targets import capabilities

    facts: dict[str, Any] = {"dlopt": dlopt.__version__, "onnxruntime": _version("onnxruntime")}
    stage = get_stage(kind)
    if stage.takes == "torch":
        facts["torch"] = _version("torch")
    if "lm" in (stage.takes, stage.makes):  # the model builder and the genai checks of an LM folder
        facts["onnxruntime-genai"] = _version("onnxruntime-genai")
    if stage.quantizes and capabilities(config.target).kernels_measurable_here:
        from dlopt.runtime import isa_line
        from dlopt.targets.cpu import host_cpu

        facts["isa"] = isa_line(host_cpu())
    return facts


def _version(module: str) -> str:
    """A package's version without importing it (torch takes seconds to import: a warm run should not)."""
    import importlib.metadata

    for dist in (module, "onnxruntime-gpu") if module == "onnxruntime" else (module,):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return __import__(module).__version__


def source_hash(spec: str) -> str:
    """A torch source's identity: its factory file's bytes (file.py:build, package.module:build), or,
    for a reference model, its name with this dlopt's version (the factory ships with dlopt). A Python
    data reader is hashed the same way (dlopt.data.reader_hash), with the local modules the file imports
    (dlopt.data.local_modules). A folder (a Hugging Face model folder) is hashed by its files' bytes."""
    if Path(spec).is_dir():
        return artifact_hash(Path(spec))
    return reader_hash(spec)


def data_hash(spec: str | DataSpec | None) -> str | None:
    """The data's hash (dlopt.data.spec_hash): a file's bytes, or a folder's listing and bytes; a Python
    reader's file, like a torch factory's; model:NAME is the reference model's own set, fixed by the dlopt
    version; a DataSpec that declares more than its source adds that declaration."""
    return spec_hash(spec)


def _reads_data(kind: str) -> bool:
    """A stage that reads the recipe's calibration or held-out data (quantize and its schemes, trim-padding,
    int4-lm): the declared data spec is in its key and lineage."""
    return bool({"calibration", "eval_data"} & set(get_stage(kind).reads))


def _makes(kind: str) -> str:
    return get_stage(kind).makes


def _declared_specs(recipe: Recipe) -> dict[str, Any] | None:
    """The recipe's data specs, recorded in the key inputs and the lineage when they declare more than a source."""
    roles = (("calibration", recipe.calibration), ("eval_data", recipe.eval_data))
    found = {role: spec.record() for role, spec in roles if isinstance(spec, DataSpec)}
    return found or None


def _stage_data(recipe: Recipe, stage: StageSpec) -> dict[str, str | None]:
    """The hashes of the data the stage reads (Stage.reads, Stage.data_fields): part of its key."""
    spec = get_stage(stage.kind)
    given = {"calibration": recipe.calibration, "eval_data": recipe.eval_data, "training_data": recipe.distill_data}
    found = {role: data_hash(given[role]) for role in spec.reads}
    return found | {name: data_hash(getattr(stage.config, name)) for name in spec.data_fields}


def _prepared(recipe: Recipe, stage: StageSpec) -> Any:
    """The config the stage runs with: the package stage gets the recipe's name and calibration."""
    if _makes(stage.kind) == "bundle":
        changes: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(stage.config)}
        if "name" in fields and stage.config.name is None:
            changes["name"] = recipe.name or recipe.path.stem
        if "calibration" in fields and stage.config.calibration is None and recipe.calibration:
            changes["calibration"] = recipe.calibration
        return dataclasses.replace(stage.config, **changes)
    return stage.config


def key_inputs(
    recipe: Recipe, stage: StageSpec, input_sha256: str, upstream: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    config = _prepared(recipe, stage)
    inputs: dict[str, Any] = {
        "kind": stage.kind,
        "config": config_to_dict(config),
        "input_sha256": input_sha256,
        "data": _stage_data(recipe, dataclasses.replace(stage, config=config)),
        "host": host_facts(stage.kind, config),
    }
    specs = _declared_specs(recipe) if _reads_data(stage.kind) else None
    if specs:
        inputs["data_spec"] = specs  # what the lineage records; a plain source keys as it always did
    if _makes(stage.kind) == "bundle":
        inputs["lineage"] = upstream  # the bundle's manifest records them
    evaluator = getattr(config, "evaluator", None)
    if isinstance(evaluator, str) and ".py:" in evaluator:  # the user's metric decides the verdict: its file too
        inputs["evaluator"] = source_hash(evaluator)
    return inputs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    stage: StageSpec
    key: str
    cached: bool
    seconds: float
    input_sha256: str
    output_sha256: str
    entry: Entry

    def lineage(self) -> dict[str, Any]:
        step = {
            "index": self.stage.index,
            "kind": self.stage.kind,
            "config": self.entry.info["inputs"]["config"],
            "input_sha256": self.input_sha256,
            "output_sha256": self.output_sha256,
            "cache_key": self.key,
        }
        if self.entry.info["inputs"].get("data_spec"):  # the data as declared (layout, values, image)
            step["data_spec"] = self.entry.info["inputs"]["data_spec"]
        report = self.entry.info.get("report")
        scheme = report.get("scheme") if isinstance(report, dict) else None
        # a `quantize` stage: the scheme it resolved to, and why
        if isinstance(scheme, dict) and scheme.get("resolved_from"):
            step["scheme"] = {"kind": scheme["kind"], "config": scheme["config"], "reasons": scheme["reasons"]}
        return step


@dataclass(frozen=True)
class RunResult:
    output: Path
    stages: tuple[StageRun, ...]


def force_from(recipe: Recipe, force: str | None) -> int | None:
    """The 1-based index of the first stage to redo for --force (a stage kind or index)."""
    if force is None:
        return None
    if force.isdigit() and 1 <= int(force) <= len(recipe.stages):
        return int(force)
    for stage in recipe.stages:
        if stage.kind == force:
            return stage.index
    raise InputError(
        f"{{force={force}}}: {recipe.path} has no such stage",
        f"give a stage kind ({', '.join(s.kind for s in recipe.stages)}) or index 1-{len(recipe.stages)}",
    )


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """Every file the recipe reads: the recipe itself, its source (an .onnx, or a factory's file and the
    local modules it imports), its data files and the stages' own (package's calibration, torch_source)."""
    from dlopt.fileio import guard_source_spec

    found: list[Path] = [recipe.path]
    if recipe.onnx_source or Path(recipe.source).is_dir():
        found.append(Path(recipe.source))
    elif (factory := guard_source_spec(recipe.source)) is not None:
        found += [factory, *local_modules(factory)] if factory.is_file() else [factory]
    specs = [recipe.calibration, recipe.eval_data, recipe.training_data]
    for stage in recipe.stages:
        specs.append(getattr(stage.config, "calibration", None))
        torch_source = guard_source_spec(getattr(stage.config, "torch_source", None))
        if torch_source is not None:
            found.append(torch_source)
    found += [Path(p) for p in map(source_path, specs) if p is not None]
    return found


def recipe_outputs(recipe: Recipe, out: Path) -> list[Path]:
    """Every path `run_recipe` may write for -o `out`: it, the stage reports delivered beside a model
    (NAME.quantize.json, NAME.export.json), and where a quantize stage below its floor keeps its result
    (NAME.failed.onnx and its report)."""
    from dlopt.fileio import report_path_for

    paths = [out]
    if _makes(recipe.stages[-1].kind) == "onnx":
        paths += [report_path_for(out, "quantize"), report_path_for(out, "export")]
    if any(get_stage(s.kind).quantizes for s in recipe.stages):
        from dlopt.optimize.quantize.files import failed_path

        failed = failed_path(out)
        paths += [failed, report_path_for(failed, "quantize")]
    return paths


def run_recipe(
    recipe: Recipe,
    output: str | os.PathLike,
    *,
    cache: StageCache,
    force: str | None = None,
    overwrite: bool = False,
    log: Log = lambda message: None,
) -> RunResult:
    """Run the recipe's stages, each from the cache when its key is there (and its files are those it
    was written with), and write the last stage's artifact to `output` (an .onnx file, or a bundle folder
    when the last stage is package)."""
    from dlopt.fileio import check_output_path, guard_outputs

    out = Path(output)
    last = _makes(recipe.stages[-1].kind)
    if last == "bundle":
        from dlopt.package import check_bundle_path

        check_bundle_path(out, overwrite)  # the rules of `dlopt package -o` (--overwrite replaces only a bundle)
    elif last == "lm":
        _check_new_folder(out)
    else:
        check_output_path(out)
    inputs, outputs = recipe_inputs(recipe), recipe_outputs(recipe, out)
    guard_outputs(inputs, outputs, cache=cache.root)
    redo = force_from(recipe, force)
    started = time.time()  # --force: an entry another process rebuilt after this moment is a fresh one

    with cache.private_folder() as private:
        artifact: Path | None = recipe.source_artifact
        input_sha = artifact_hash(artifact) if artifact else source_hash(recipe.source)
        runs: list[StageRun] = []
        for stage in recipe.stages:
            label = f"stage {stage.index}/{len(recipe.stages)} {stage.kind}"
            start = time.perf_counter()
            inputs_k = key_inputs(recipe, stage, input_sha, [r.lineage() for r in runs])
            key = cache_key(inputs_k)
            forced = redo is not None and stage.index >= redo
            found, view = (None, None) if forced else cache.checkout(key, private)
            if found is not None and found.problem:
                log(f"{label}: cache entry {key[:12]} not used ({found.problem}): rebuilding it")
            entry = found.entry if found is not None else None
            cached = entry is not None
            if entry is None or view is None:  # (view is None exactly when entry is)
                try:
                    entry, view, cached = _build(
                        recipe,
                        stage,
                        artifact,
                        out,
                        key,
                        inputs_k,
                        cache,
                        private,
                        [r.lineage() for r in runs],
                        label,
                        forced,
                        started,
                        log,
                    )
                except DlOptError as e:  # which stage failed, after which: "stage 2/3 quantize (after export): ..."
                    # a Stage names its own chain ("int8-static failed after export: ..."); else it is said here
                    named = e.message.startswith(f"{stage.kind} failed after ")
                    after = f" (after {', '.join(r.stage.kind for r in runs)})" if runs and not named else ""
                    e.message = f"{recipe.path} {label}{after}: {e.message}"  # same class: same exit code
                    raise
            produced = view / entry.info["artifact"]
            # recorded at write time from these bytes, which checkout just verified file by file (and
            # entry.json by its digest): the hash of what this run goes on with and delivers
            output_sha = entry.info["output_sha256"]
            seconds = time.perf_counter() - start
            log(f"{label}: {'cached' if cached else 'done'} in {seconds:.2f} s (key {key[:12]})")
            runs.append(StageRun(stage, key, cached, seconds, input_sha, output_sha, entry))
            artifact, input_sha = produced, output_sha
        _deliver(_made_before(artifact, recipe.stages[-1]), out, made=last, inputs=inputs, guarded=outputs)
    return RunResult(out, tuple(runs))


def _build(
    recipe: Recipe,
    stage: StageSpec,
    artifact: Path | None,
    out: Path,
    key: str,
    inputs: Mapping[str, Any],
    cache: StageCache,
    private: Path,
    lineage: list[dict[str, Any]],
    label: str,
    forced: bool,
    started: float,
    log: Log,
) -> tuple[Entry, Path, bool]:
    """Build the stage's entry under the key's lock, unless another process made it while this one waited
    for the lock (for a forced stage: made after this run started). Returns the entry, its private view
    and whether it was taken from the cache."""
    with cache.building(key) as staging:
        again, view = cache.checkout(key, private)
        if again.entry is not None and view is not None and (not forced or again.entry.created >= started):
            return again.entry, view, True
        log(f"{label}: running (key {key[:12]})")
        _run_stage(recipe, stage, artifact, out, key, inputs, cache, staging, lineage, log)
        made, view = cache.checkout(key, private)
        if made.entry is None or view is None:
            raise StageError(
                f"the cache entry {key[:12]} just written fails its check: {made.problem}",
                "run again; if it repeats, pass another --cache-dir",
            )
        return made.entry, view, False


def _run_stage(
    recipe: Recipe,
    stage: StageSpec,
    artifact: Path | None,
    out: Path,
    key: str,
    inputs: Mapping[str, Any],
    cache: StageCache,
    staging: Path,
    lineage: list[dict[str, Any]],
    log: Log,
) -> Entry:
    """Run one stage on files (Stage.write: its input artifact in, its output written into `staging`) and
    commit what it wrote to the cache under `key`."""
    after = tuple(step["kind"] for step in lineage)
    given = StageInput(
        artifact=artifact,
        source=recipe.source,
        calibration=recipe.calibration,
        eval_data=recipe.eval_data,
        training_data=recipe.distill_data,
        keep_failed=out,
    )
    spec = get_stage(stage.kind)
    given = given if spec.takes == "torch" else dataclasses.replace(given, artifact=_made_before(artifact, stage))
    made = spec.write(
        given, _prepared(recipe, stage), StageContext(output=staging, lineage=tuple(lineage), after=after, log=log)
    )
    summary = {
        k: made.report[k]
        for k in (
            "verdict",
            "verification",
            "bytes_written",
            "bytes",
            "recipe",
            "scheme",
            "parameters_before",
            "parameters_after",
            "macs_before",
            "macs_after",
            "epochs_run",
            "best_epoch",
            "train_samples",
            "trim_padding",
            "held_out",
            "bytes_after",
        )
        if k in made.report
    }
    info = {
        "kind": stage.kind,
        "inputs": dict(inputs),
        "artifact": made.path.name,
        "output_sha256": made.sha256,
        "source": recipe.source,
        "recipe": str(recipe.path),
        "report": summary,
    }
    return cache.commit(key, staging, info)


def _made_before(artifact: Path | None, stage: StageSpec) -> Path:
    """The artifact an earlier stage made, which `stage` reads (None only before a stage that takes torch)."""
    if artifact is None:  # _check_order puts a stage that takes torch first when the source is not ONNX
        raise StageError(
            f"stage {stage.index} {stage.kind} reads a model no earlier stage made",
            "begin the recipe with an export stage, or give an .onnx source",
        )
    return artifact


def _check_new_folder(out: Path) -> None:
    """-o for a recipe that ends with an LM folder: a new (or empty) folder in a folder that exists."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {out} exists and is not an empty folder", "choose a new folder for -o")
    if not out.resolve().parent.is_dir():
        raise InputError(f"the parent of the output folder {out} does not exist", "choose another -o path")


def _deliver(artifact: Path, out: Path, *, made: str, inputs: list[Path], guarded: list[Path]) -> None:
    """Copy the last artifact out of the run's private view of the cache: a bundle or LM folder (renamed
    into place whole), or a model with its stage reports beside it (renamed together). `guarded`: the
    outputs already checked against `inputs`; a report of another name is checked here."""
    import os
    import tempfile

    if made in ("bundle", "lm"):
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.resolve().parent))
        try:
            shutil.copytree(artifact, staging, dirs_exist_ok=True)
            if made == "bundle":
                from dlopt.package import finalize_bundle

                finalize_bundle(staging, out)
            else:
                _check_new_folder(out)
                if out.exists():
                    out.rmdir()  # checked empty
                os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    from dlopt.fileio import external_data_files, guard_outputs, json_text, load_onnx, report_path_for, staged_outputs

    external = external_data_files(load_onnx(artifact, load_external_data=False))
    if external:
        raise InputError(
            f"{artifact.name} keeps its weights in external data files",
            "end the recipe with a package stage, which bundles them",
        )
    reports = {
        report: report_path_for(out, report.name[len(artifact.name[:-5]) + 1 : -len(".json")])
        for report in sorted(artifact.parent.glob(f"{artifact.name[:-5]}.*.json"))
    }
    guard_outputs(inputs, [path for path in reports.values() if path not in guarded])
    with staged_outputs() as outputs:
        shutil.copyfile(artifact, outputs.stage(out))
        for report, path in reports.items():
            outputs.stage(path).write_text(json_text(_delivered_report(report, out)))


def _delivered_report(report: Path, out: Path) -> Any:
    """A stage report as delivered: its `output` names -o, not the cache's staging folder it was written in."""
    import json

    try:
        body = json.loads(report.read_text())
    except (OSError, ValueError) as e:
        raise StageError(f"the cached report {report.name} is not JSON ({e})", "run again with --force") from e
    if isinstance(body, dict) and "output" in body:
        body["output"] = str(out)
    return body
