"""The user's data, one way for every verb: a declared `DataSpec` and a re-iterable stream of feeds.

quantize, optimize, bench, eval, gate, package and `dlopt run` read data through this module, so
`--calibration`, `--eval-data` and `--data` accept exactly the same things with the same options
(docs/data.md). A `DataSpec` says where the samples are and how they become the model's inputs:

- `source`: where the samples are (`str`):
  - `data.npz`: arrays named by input; each array's sample axis is axis 0 unless `layout` says
    otherwise (a streaming model's state `[2, N, 128]` has its samples on axis 1);
  - a folder of `.npz` files (each like the above, read in sorted name order; one file per sample
    when lengths vary), of `.npy` files (single-input models: axis 0 = samples), or of images
    (.jpg, .png ...: single-input image models, pre-processed as `image` declares, dlopt.images);
  - `my_data.py:samples` or `package.module:samples`: a Python reader, a function with no required
    arguments that returns or yields dicts {input name: array}, one feed (batch 1) each. It is called
    again for every pass over the data. This is the escape hatch for what a file cannot describe:
    stateful or streaming models, whose reader carries the model's state from feed to feed itself;
  - `model:NAME`: a reference model's own set (dlopt.models).
- `layout`: (input name, sample axis) pairs for inputs whose samples are not on axis 0;
- `values`: (input name, values) pairs: a constant fed to every sample, in the model's dtype and rank
  (a scalar such as a sample rate, or a small vector), also for inputs the source does not hold;
- `image`: the one pre-processing of image folders (dlopt.images.ImagePreprocess).

A spec is given once, on the command line (`--calibration`/`--data`, `--input-layout`, `--input-value`,
`--image-*`) or in a spec file (`--data-spec spec.toml`, the same keys; command-line options win), is
recorded (config_to_dict) in the quantize report, the bundle manifest and the recipe lineage, and a
recorded one can be given back as a spec file (an OUT.quantize.json or a manifest.json).

A `CalibrationData` is what a spec yields: a re-iterable source of feeds (`{input name: np.ndarray}`,
batch 1, one sample per item). It never holds more than one sample in memory beyond what its source
holds (an .npz is read lazily, array by array; readers and reference sets are generators), so
statistics over it cost the same memory for 100 or 10,000 samples. Samples may differ in shape
(sequence length): every consumer handles one sample at a time. `sample_arrays` stacks the samples
along each input's sample axis for the verbs that run batches (bench, gate, eval, package).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, overload

import numpy as np

from dlopt.errors import InputError
from dlopt.images import ImagePreprocess, ImageTarget, image_feeds, image_files, image_target, parse_number, parse_size
from dlopt.inputs import Feeds, InputSpec, graph_inputs
from dlopt.stage import config_from_dict, config_to_dict
from dlopt.usercode import import_user_file, user_code

# Arrays of a data file that hold answers, not inputs: `dlopt eval` scores against them (class indices,
# expected outputs); every other verb skips them where the model has no input of that name.
ANSWER_ARRAYS = frozenset({"labels", "expected"})
DEFAULT_SAMPLE_COUNT = 100
# file.py:function or package.module:function (a Windows drive letter is not a module name: "C:x" needs ".py")
_READER = re.compile(r"^(?P<module>.+\.py|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)$")
SPEC_KEYS = ("source", "layout", "values", "image")


# ------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where samples are and how they become the model's inputs (the module doc)."""

    VERSION: ClassVar[int] = 1
    source: str | None = None
    layout: tuple[tuple[str, int], ...] = ()  # (input name, sample axis); undeclared inputs: axis 0
    values: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (input name, constant fed to every sample)
    image: ImagePreprocess | None = None  # image folders; None: ImagePreprocess's defaults

    def __post_init__(self) -> None:
        for what, pairs in (("layout", self.layout), ("values", self.values)):
            names = [name for name, _ in pairs]
            if any(not isinstance(n, str) or not n for n in names):
                raise InputError(f"data {what} names an input with no name", "write NAME=...")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise InputError(f"data {what} gives input {twice[0]!r} twice", "give each input once")
        for name, axis in self.layout:
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
                raise InputError(
                    f"sample axis {axis!r} of input {name!r} is not an axis",
                    "give a non-negative axis, e.g. {input_layout=state=1}",
                )
        both = sorted(set(dict(self.layout)) & set(dict(self.values)))
        if both:
            raise InputError(
                f"input {both[0]!r} has both a sample axis and a constant value",
                "a constant is the same for every sample: drop its {input_layout=NAME=AXIS}",
            )
        for name, value in self.values:
            if not value or not all(np.isfinite(v) for v in value):
                raise InputError(f"value of input {name!r} is empty or not finite", "e.g. {input_value=rate=16000}")

    def __str__(self) -> str:
        return self.source or "no data"

    def with_source(self, source: str | None) -> DataSpec:
        return replace(self, source=None if source is None else str(source))

    def axis(self, name: str) -> int:
        return dict(self.layout).get(name, 0)

    @property
    def is_reader(self) -> bool:
        return self.source is not None and _reader_parts(self.source) is not None

    @property
    def is_path(self) -> bool:
        """A file or folder the data is read from (not model:NAME, not a Python reader)."""
        return self.source is not None and not self.source.startswith("model:") and not self.is_reader

    def record(self) -> dict[str, Any]:
        """The spec as reports, manifests and lineage record it (dlopt.stage.config_to_dict)."""
        return config_to_dict(self)


@overload
def as_spec(spec: str | os.PathLike | DataSpec, image: ImagePreprocess | None = None) -> DataSpec: ...
@overload
def as_spec(spec: None, image: ImagePreprocess | None = None) -> None: ...
def as_spec(spec: str | os.PathLike | DataSpec | None, image: ImagePreprocess | None = None) -> DataSpec | None:
    """A `--calibration`/`--data` value as a DataSpec (a DataSpec stays itself); `image` fills in an
    undeclared image pre-processing (a stage config's own `image`)."""
    if spec is None:
        return None
    if not isinstance(spec, DataSpec):
        spec = DataSpec(source=str(spec))
    if spec.image is None and image is not None:
        spec = replace(spec, image=image)
    return spec


def source_path(spec: str | Path | DataSpec | None) -> Path | None:
    """The file or folder a data source reads (a Python reader's .py file), None for model:NAME and
    module readers: what the output guards keep every output away from."""
    data = as_spec(spec)
    if data is None or data.source is None or not (data.is_path or (data.is_reader and ".py:" in data.source)):
        return None
    return Path(data.source.rpartition(":")[0] if data.is_reader else data.source)


def parse_layout(items: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """('state=1',) -> (('state', 1),): --input-layout NAME=AXIS."""
    pairs = []
    for item in items:
        name, sep, axis = str(item).partition("=")
        if not sep or not name.strip() or not axis.strip().isdigit():
            raise InputError(
                f"input layout {item!r} is not NAME=AXIS",
                "e.g. {input_layout=state=1} (the input's samples are on axis 1)",
            )
        pairs.append((name.strip(), int(axis)))
    return tuple(pairs)


def parse_values(items: Iterable[str]) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """('rate=16000', 'w=1,2') -> (('rate', (16000.0,)), ('w', (1.0, 2.0))): --input-value NAME=VALUE."""
    pairs = []
    for item in items:
        name, sep, text = str(item).partition("=")
        try:
            values = tuple(parse_number(t) for t in text.split(",") if t.strip())
        except InputError:
            values = ()
        if not sep or not name.strip() or not values:
            raise InputError(
                f"input value {item!r} is not NAME=VALUE", "e.g. {input_value=rate=16000}, or NAME=1,2,3 for a vector"
            )
        pairs.append((name.strip(), values))
    return tuple(pairs)


def data_spec(
    source: str | Path | None = None,
    *,
    spec_file: str | Path | None = None,
    layout: Iterable[str] = (),
    values: Iterable[str] = (),
    image: Mapping[str, Any] | None = None,
) -> DataSpec:
    """The spec that a command's options declare: the keys of `spec_file` (if any), overridden by the
    options given: `source`, `layout` and `values` as the user writes them ("state=1", "rate=16000"),
    and `image` (ImagePreprocess keys as option text, e.g. {"resize": "letterbox", "size": "640x640"})."""
    base = read_spec_file(spec_file) if spec_file else DataSpec()
    if source is None:
        source = base.source
    given_layout, given_values = dict(parse_layout(layout)), dict(parse_values(values))
    # an option overrides the file's key for its input, also of the other kind (the file's constant `sr`
    # becomes a sampled input with --input-layout sr=0); both kinds on the command line are refused
    layout_pairs = {k: v for k, v in base.layout if k not in given_values} | given_layout
    value_pairs = {k: v for k, v in base.values if k not in given_layout} | given_values
    given = {k: v for k, v in (image or {}).items() if v is not None and v != ()}
    img = base.image
    if given:
        img = _image(
            config_to_dict(img)["fields"] | _image_fields(given, "option") if img else _image_fields(given, "option"),
            "option",
        )
    return DataSpec(
        source=None if source is None else str(source),
        layout=tuple(layout_pairs.items()),
        values=tuple(value_pairs.items()),
        image=img,
    )


def read_spec_file(path: str | Path) -> DataSpec:
    """A data spec file: TOML with the keys source, [layout], [values], [image] (docs/data.md), or a
    JSON record of one (an OUT.quantize.json or a bundle's manifest.json). A relative source is
    relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read the data spec {path}: {e.strerror or e}", "check the path") from e
    if path.suffix == ".json":
        return _recorded_spec(path, text)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        keys = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"data spec {path} is not valid TOML: {e}", "fix its syntax") from e
    return spec_from_keys(keys, where=str(path), base=path.resolve().parent)


def spec_from_keys(
    keys: Mapping[str, Any], *, where: str, base: Path | None = None, allowed: tuple[str, ...] = SPEC_KEYS
) -> DataSpec:
    """A DataSpec from a spec file's (or a recipe's [data] table's) keys; errors name `where`."""
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown data spec key(s) {', '.join(unknown)}", f"known: {', '.join(allowed)}")
    source = keys.get("source")
    if source is not None and not isinstance(source, str):
        raise InputError(f"{where}: source must be a string, not {source!r}", 'e.g. source = "calibration/"')
    if source is not None and base is not None and not source.startswith("model:"):
        reader = _reader_parts(source)
        path_part = reader[0] if reader and reader[0].endswith(".py") else (None if reader else source)
        if path_part is not None and not Path(path_part).expanduser().is_absolute():
            resolved = str((base / Path(path_part).expanduser()).resolve())
            source = resolved + (f":{reader[1]}" if reader else "")
    try:
        layout = _table(keys, "layout", where)
        values = _table(keys, "values", where)
        layout_pairs = tuple((str(k), _axis(v, k, where)) for k, v in layout.items())
        value_pairs = tuple((str(k), _numbers(v, k, where)) for k, v in values.items())
        image = keys.get("image")
        if image is not None and not isinstance(image, Mapping):
            raise InputError(f"{where}: image must be a table of pre-processing keys", "e.g. [image] resize = ...")
        img = _image(_image_fields(image, where), where) if image else None
        return DataSpec(source=source, layout=layout_pairs, values=value_pairs, image=img)
    except InputError as e:
        if e.message.startswith(where):
            raise
        raise InputError(f"{where}: {e.message}", e.hint) from e


def _table(keys: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    table = keys.get(name, {})
    if not isinstance(table, Mapping):
        raise InputError(f"{where}: {name} must be a table of input name = ...", f"e.g. [{name}] state = 1")
    return table


def _axis(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: the sample axis of {name!r} is {value!r}, not an axis", "e.g. state = 1")
    return value


def _numbers(value: Any, name: str, where: str) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(parse_number(v) if isinstance(v, str) else float(v) for v in items if not isinstance(v, bool))
    except (TypeError, ValueError, InputError):
        raise InputError(f"{where}: the value of {name!r} is {value!r}, not numbers", "e.g. rate = 16000") from None


_IMAGE_NAMES = {f.name for f in fields(ImagePreprocess)}


def _image_fields(keys: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ImagePreprocess keys as a user writes them (text or TOML values) -> its field values."""
    unknown = sorted(set(keys) - _IMAGE_NAMES)
    if unknown:
        raise InputError(
            f"{where}: unknown image key(s) {', '.join(unknown)}", f"known: {', '.join(sorted(_IMAGE_NAMES))}"
        )
    out: dict[str, Any] = {}
    for key, value in keys.items():
        if key == "size":
            out[key] = parse_size("x".join(map(str, value)) if isinstance(value, (list, tuple)) else value)
        elif key in ("mean", "std"):
            out[key] = _numbers(value.split(",") if isinstance(value, str) else value, f"image {key}", where)
        elif key in ("scale", "pad"):
            out[key] = parse_number(value) if isinstance(value, str) else float(value)
        elif key in ("layout", "resize", "interpolation", "letterbox_anchor", "letterbox_rounding"):
            out[key] = str(value).lower()
        else:  # bgr
            out[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return out


def _image(values: Mapping[str, Any], where: str) -> ImagePreprocess:
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    try:
        return ImagePreprocess(**values)
    except TypeError as e:
        raise InputError(f"{where}: bad image pre-processing ({e})", "see docs/data.md") from e


def _recorded_spec(path: Path, text: str) -> DataSpec:
    """The data spec a quantize report or a bundle manifest recorded."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise InputError(f"data spec {path} is not valid JSON ({e})", "give a .toml spec or a report/manifest") from e
    found = record.get("data_spec") if isinstance(record, dict) else None
    if isinstance(found, Mapping) and "type" not in found:  # by role: the calibration data's first
        found = found.get("calibration") or found.get("eval_data") or found.get("data")
    if not isinstance(found, Mapping):
        raise InputError(f"{path} records no data spec", "give a .toml spec file, or a report written by this dlopt")
    spec = config_from_dict(found, DataSpec)
    return spec


# ------------------------------------------------------------------------------------------ the hash
def spec_hash(spec: str | Path | DataSpec | None) -> str | None:
    """What identifies the data for a cache key: the source's content hash (a file's bytes, a folder's
    listing and bytes; a Python reader's file, like a torch factory's; model:NAME with this dlopt's
    version) and, when the spec declares more than its source, the spec itself."""
    import dlopt
    from dlopt.manifest import hash_path

    spec = as_spec(spec)
    if spec is None or spec.source is None:
        return None
    source = spec.source
    if source.startswith("model:"):
        content = f"{source}@{dlopt.__version__}"
    elif spec.is_reader:
        content = reader_hash(source)
    else:
        content = hash_path(source)["sha256"]
    if spec == DataSpec(source=source):
        return content  # a plain source keys as it always did
    declared = json.dumps(config_to_dict(replace(spec, source=None)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{content}\0{declared}".encode()).hexdigest()


def reader_hash(source: str) -> str:
    """A Python reader's identity, as a torch factory's (dlopt.recipe.source_hash uses this too): its spec,
    its file's bytes (file.py:function, or package.module:function's source file) and those of the local
    modules it imports (`local_modules`); dlopt's version when there is no such file (a reference model
    ships with dlopt)."""
    import dlopt
    from dlopt.manifest import sha256_file

    module = source.rpartition(":")[0] if ":" in source else ""
    file = _reader_file(module) if module else None
    if file is None or not file.is_file():
        return hashlib.sha256(f"{source}\0{dlopt.__version__}".encode()).hexdigest()
    body = f"{source}\0{sha256_file(file)}"
    for helper in local_modules(file):
        body += f"\0{helper}\0{sha256_file(helper)}"
    return hashlib.sha256(body.encode()).hexdigest()


def local_modules(factory: Path) -> list[Path]:
    """The local .py files a factory file imports, directly or through each other: modules and packages
    found under the factory's folder or a sys.path folder outside the standard library and site-packages.
    Read from the `import` statements (the ast, nothing is run); a module imported by a computed name
    (importlib.import_module(name), __import__) is not seen: after changing one, `dlopt run --force`."""
    import ast
    import sys
    import sysconfig

    shared = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}

    def local(folder: Path) -> bool:
        return (
            folder.is_dir()
            and not any(folder == s or s in folder.parents for s in shared)
            and not {"site-packages", "dist-packages"} & set(folder.parts)
        )

    roots = [factory.resolve().parent] + [p for p in (Path(e or ".").resolve() for e in sys.path) if local(p)]

    def find(base: Path, dotted: str) -> list[Path]:
        """The files `dotted` names under `base`: each package's __init__.py on the way, then the module."""
        files, here = [], base
        for part in dotted.split("."):
            if (here / part / "__init__.py").is_file():
                here = here / part
                files.append(here / "__init__.py")
            elif (here / f"{part}.py").is_file():
                files.append(here / f"{part}.py")
                break
            else:
                return files if here != base else []
        return files

    seen: dict[Path, None] = {}
    todo = [factory.resolve()]
    while todo:
        file = todo.pop()
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (OSError, SyntaxError, ValueError):
            continue  # the loader reports an unreadable factory; a broken helper fails when imported
        for node in ast.walk(tree):
            names: list[tuple[Path | None, str]] = []
            if isinstance(node, ast.Import):
                names = [(None, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = None
                if node.level:  # relative: from the importing file's package
                    base = file.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                prefix = node.module or ""
                names = [(base, prefix)] if prefix else []
                names += [(base, f"{prefix}.{alias.name}" if prefix else alias.name) for alias in node.names]
            for base, dotted in names:
                for root in [base] if base is not None else roots:
                    found = find(root, dotted)
                    if found:
                        for path in found:
                            path = path.resolve()
                            if path != factory.resolve() and path not in seen:
                                seen[path] = None
                                todo.append(path)
                        break
    return sorted(seen)


def _reader_parts(source: str) -> tuple[str, str] | None:
    match = _READER.match(source)
    if match is None or Path(source).exists():
        return None
    return match.group("module"), match.group("function")


def _reader_file(module: str) -> Path | None:
    if module.endswith(".py"):
        return Path(module)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


# ------------------------------------------------------------------------------------------ the data
class CalibrationData:
    """A re-iterable, validated stream of feeds, one sample (batch 1) per item.

    Build one with `load_data`, `CalibrationData.from_arrays` or `CalibrationData.from_feeds`.
    Iterating twice yields the same samples in the same order (quantization is deterministic)."""

    def __init__(
        self,
        open_stream: Callable[[], Iterator[Feeds]],
        *,
        source: str,
        count: int | None = None,
        limit: int | None = None,
        spec: DataSpec | None = None,
    ):
        self._open_stream = open_stream
        self.source = source  # how the data was named by the user, for messages and reports
        self._count = count
        self.limit = limit
        self.spec = spec or DataSpec(source=source)
        self._specs: list[InputSpec] | None = None
        self._input_names: frozenset[str] = frozenset()
        self._constants = {name: _unbound_constant(v) for name, v in self.spec.values}
        self.ignore: frozenset[str] = frozenset()  # arrays of the source that are not inputs (eval's labels)
        self.finite = True  # refuse NaN/inf inputs (calibration); eval and bench warn about them instead

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        *,
        source: str = "arrays",
        limit: int | None = None,
        spec: DataSpec | None = None,
    ) -> CalibrationData:
        """Arrays named by input, samples on axis 0 (or each input's axis in `spec.layout`)."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        spec = spec or DataSpec(source=source)
        count = _sample_count(arrays, source, spec)
        return cls(lambda: _split_samples(arrays, source, spec), source=source, count=count, limit=limit, spec=spec)

    @classmethod
    def from_feeds(
        cls, feeds: Iterable[Mapping[str, np.ndarray]], *, source: str = "feeds", limit: int | None = None
    ) -> CalibrationData:
        """A list of feeds, each one sample with a batch axis of 1 (shapes may differ)."""
        items = [{k: np.asarray(v) for k, v in f.items()} for f in feeds]
        return cls(lambda: iter(items), source=source, count=len(items), limit=limit)

    # -- use ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Feeds]:
        for index, feeds in enumerate(self._open_stream()):
            if self.limit is not None and index >= self.limit:
                return
            if self.ignore:
                feeds = {k: v for k, v in feeds.items() if k not in self.ignore}
            if self._constants:
                given = sorted(set(feeds) & set(self._constants))
                if given:
                    raise InputError(
                        f"data {self.source} (sample {index}) holds input {given[0]!r}, which also "
                        "has a constant value",
                        "give it one way: in the data or by {input_value=NAME=V}",
                    )
                feeds = {**feeds, **self._constants}
            if self._specs is not None:
                # the arrays eval scores against (labels, expected outputs) may sit in any verb's data: the
                # same .npz works for quantize, bench and gate too; they are never fed unless they are inputs
                skipped = ANSWER_ARRAYS.intersection(feeds).difference(self._input_names)
                if skipped:
                    feeds = {k: v for k, v in feeds.items() if k not in skipped}
                _check_sample(feeds, self._specs, self.source, index, finite=self.finite)
            yield feeds

    def __len__(self) -> int:
        if self._count is None:  # a reader: counted once by reading it (it stops at the limit itself)
            self._count = sum(1 for _ in self._open_stream())
        return min(self._count, self.limit) if self.limit is not None else self._count

    def bind(self, model) -> CalibrationData:
        """Check the first sample now (names, ranks, dtypes, fixed dims) and every later one as it is
        read; returns self. Mismatches raise InputError naming the data source and the input."""
        self._specs = graph_inputs(model)
        self._input_names = frozenset(s.name for s in self._specs)
        by_name = {s.name: s for s in self._specs}
        for name, value in self.spec.values:
            if name not in by_name:
                raise InputError(
                    f"data {self.source}: {{input_value={name}=...}} names no input of the model",
                    f"its inputs: {', '.join(by_name)}",
                )
            self._constants[name] = _constant(value, by_name[name], self.source)
        first = next(iter(self), None)
        if first is None:
            raise InputError(f"data {self.source} holds no samples", "give at least one sample")
        return self

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self)}

    @property
    def needs_model(self) -> bool:
        """True when samples can be read only once bound to the model (images, bare .npy arrays)."""
        return False


@overload
def load_data(
    spec: str | os.PathLike | DataSpec | CalibrationData,
    model=None,
    *,
    limit: int | None = None,
    image: ImagePreprocess | None = None,
    ignore: Iterable[str] = (),
) -> CalibrationData: ...
@overload
def load_data(
    spec: None,
    model=None,
    *,
    limit: int | None = None,
    image: ImagePreprocess | None = None,
    ignore: Iterable[str] = (),
) -> None: ...
def load_data(
    spec: str | os.PathLike | DataSpec | CalibrationData | None,
    model=None,
    *,
    limit: int | None = None,
    image: ImagePreprocess | None = None,
    ignore: Iterable[str] = (),
) -> CalibrationData | None:
    """Turn a user's data (`--calibration`, `--eval-data`, `--data`: a source text or a DataSpec) into
    CalibrationData, checked against `model` (an onnx.ModelProto) if given.

    `limit` caps the number of samples read (and sets how many a `model:NAME` set generates); `image`
    is the image pre-processing where the spec declares none (dlopt.images; default: pixels/255, RGB,
    stretched to the model's size and layout); arrays named in `ignore` are not fed (eval's labels)."""
    if spec is None or isinstance(spec, CalibrationData):
        data = spec
    else:
        spec = as_spec(spec, image)
        data = _open(spec, limit)
    if data is not None and ignore:
        data.ignore = frozenset(ignore)
    if data is not None and model is not None:
        data.bind(model)
    return data


def _open(spec: DataSpec, limit: int | None) -> CalibrationData:
    source = spec.source
    if source is None:
        raise InputError("the data spec names no source", "give {calibration=DATA} or {data=DATA}, or source = ...")
    if source.startswith("model:"):
        return _reference_set(source[len("model:") :], limit, spec)
    if spec.is_reader:
        return _reader(spec, limit)
    path = Path(source)
    if not path.exists():
        raise InputError(
            f"data {path} does not exist",
            "give an .npz file, a folder of .npz/.npy/image files, file.py:function or model:NAME",
        )
    return _folder(path, limit, spec) if path.is_dir() else _npz_file(path, limit, spec)


# -- sources --------------------------------------------------------------------------------------
def _reference_set(name: str, limit: int | None, spec: DataSpec) -> CalibrationData:
    from dlopt.models import get_reference_model

    ref = get_reference_model(name)
    count = limit if limit is not None else DEFAULT_SAMPLE_COUNT

    def stream() -> Iterator[Feeds]:
        for feeds in ref.calibration_data(count):
            yield {k: np.asarray(v) for k, v in feeds.items()}

    return CalibrationData(stream, source=f"model:{name}", count=count, limit=limit, spec=spec)


def _reader(spec: DataSpec, limit: int | None) -> CalibrationData:
    """A Python reader: called again for every pass; what it raises is an input error naming it."""
    source = str(spec.source)
    function = _reader_function(source)

    def stream() -> Iterator[Feeds]:
        produced = 0  # feeds yielded so far: the item an error is raised at
        # the user's code: what it raises or exits with (SystemExit included) is one line and exit 2
        with user_code(
            lambda: f"data reader {source} at item {produced}", hint="fix the reader; run it alone to see its traceback"
        ):
            for item in _call(function, source):
                if not isinstance(item, Mapping):
                    raise InputError(
                        f"data reader {source} yielded a {type(item).__name__} (item {produced}), not a "
                        "dict of input name -> array",
                        "yield one {name: array} dict per feed",
                    )
                yield {str(k): np.asarray(v) for k, v in item.items()}
                produced += 1
                if limit is not None and produced >= limit:
                    return

    return CalibrationData(stream, source=source, count=None, limit=limit, spec=spec)


def _call(function: Callable[[], Any], source: str) -> Iterable[Any]:
    result = function()
    if isinstance(result, Mapping) or not isinstance(result, Iterable):
        raise InputError(
            f"data reader {source} returned a {type(result).__name__}, not an iterable of feeds",
            "return or yield dicts of input name -> array, one per feed",
        )
    return result


def _reader_function(source: str) -> Callable[[], Any]:
    parts = _reader_parts(source)
    if parts is None:
        raise InputError(f"data {source} is not a reader", "give file.py:function or package.module:function")
    module_name, function_name = parts
    if module_name.endswith(".py"):
        module = import_user_file(
            module_name,
            role="data reader",
            name=f"data reader {source}",
            hint="fix the module; import it alone to see its traceback",
        )
    else:
        with user_code(f"importing data reader {source}", hint="fix the module; import it alone to see its traceback"):
            module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(
            f"data reader {source}: {module_name} has no function {function_name!r}",
            "give file.py:function, a function with no required arguments",
        )
    return function


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(
            f"data file {path} is not a readable .npz ({type(e).__name__})",
            "save it with numpy.savez(path, input_name=array, ...)",
        ) from e


def _npz_sample_count(path: Path, spec: DataSpec) -> int:
    with _open_npz(path) as z:
        if not z.files:
            raise InputError(f"data file {path} holds no arrays", "save arrays named by input")
        shapes = {}
        for name in z.files:
            try:
                shapes[name] = z[name].shape
            except ValueError as e:  # object arrays need pickle
                raise InputError(
                    f"data file {path}: array {name!r} is not numeric",
                    "store numeric arrays, one per input, first axis = samples",
                ) from e
    return _count_from_shapes(shapes, str(path), spec)


def _count_from_shapes(shapes: Mapping[str, tuple[int, ...]], source: str, spec: DataSpec) -> int:
    """The one sample count of arrays with these shapes, each counted on its declared sample axis."""
    if not shapes:
        raise InputError(f"data {source} holds no arrays", "give one array per input")
    given = sorted(set(shapes) & set(dict(spec.values)))
    if given:
        raise InputError(
            f"data {source} holds array {given[0]!r}, which also has a constant value",
            "give it one way: in the data or by {input_value=NAME=V}",
        )
    counts: dict[str, int | None] = {}
    for name, shape in shapes.items():
        axis = spec.axis(name)
        counts[name] = shape[axis] if axis < len(shape) else None
    bad = [n for n, c in counts.items() if c is None]
    if bad:
        name, shape = bad[0], shapes[bad[0]]
        raise InputError(
            f"data {source}: array {name!r} of shape {list(shape)} has no sample axis {spec.axis(name)}",
            "a constant goes in {input_value=NAME=VALUE}; else declare its axis, {input_layout=NAME=AXIS}",
        )
    if len(set(counts.values())) != 1:
        told = {n: f"{c} on axis {spec.axis(n)}" for n, c in counts.items()}
        raise InputError(
            f"data {source}: arrays have different sample counts {told}",
            "each array holds the same samples on its sample axis (axis 0, or the one "
            "{input_layout=NAME=AXIS} declares); a constant goes in {input_value=NAME=VALUE}",
        )
    return int(next(c for c in counts.values() if c is not None))  # (all are: a None count raised above)


def _npz_stream(path: Path, spec: DataSpec) -> Iterator[Feeds]:
    # Arrays are read one file at a time; a sample is a view, so no sample is copied twice.
    with _open_npz(path) as z:
        arrays = {name: z[name] for name in z.files}
    yield from _split_samples(arrays, str(path), spec)


def _npz_file(path: Path, limit: int | None, spec: DataSpec) -> CalibrationData:
    if path.suffix == ".npy":
        return _npy_files([path], str(path), limit, spec)
    count = _npz_sample_count(path, spec)
    return CalibrationData(lambda: _npz_stream(path, spec), source=str(path), count=count, limit=limit, spec=spec)


def _npy_files(files: list[Path], source: str, limit: int | None, spec: DataSpec) -> CalibrationData:
    def stream() -> Iterator[Feeds]:
        for f in files:
            try:
                arr = np.load(f, allow_pickle=False, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise InputError(
                    f"data file {f} is not a readable .npy ({type(e).__name__})", "save it with numpy.save"
                ) from e
            if arr.ndim == 0:
                raise InputError(f"data file {f} holds a scalar", "first axis = samples")
            for i in range(arr.shape[0]):
                # name filled in by _NpyData.bind once the model is known
                yield {"": np.array(arr[i : i + 1])}

    return _NpyData(stream, source=source, limit=limit, spec=spec)


class _NpyData(CalibrationData):
    """Bare .npy arrays carry no input name: valid only for single-input models."""

    @property
    def needs_model(self) -> bool:
        return self._specs is None

    def bind(self, model) -> CalibrationData:
        specs = graph_inputs(model)
        if len(specs) != 1:
            raise InputError(
                f"data {self.source} is .npy (one unnamed array) but the model has {len(specs)} inputs",
                "save an .npz with one array per input name",
            )
        name = specs[0].name
        raw = self._open_stream
        self._open_stream = lambda: ({name: f[""]} for f in raw())
        return super().bind(model)


class _ImageData(CalibrationData):
    """Image files: which input they feed, at what size and layout, is known once bound to the model."""

    def __init__(self, files: list[Path], source: str, limit: int | None, spec: DataSpec):
        super().__init__(self._unbound, source=source, count=len(files), limit=limit, spec=spec)
        self.files, self.image = files, spec.image or ImagePreprocess()
        self.target: ImageTarget | None = None

    @property
    def needs_model(self) -> bool:
        return self.target is None

    def _unbound(self) -> Iterator[Feeds]:
        raise InputError(
            f"the images in {self.source} are read for a model: bind them to it first",
            "pass the model to load_data(spec, model)",
        )

    def bind(self, model) -> CalibrationData:
        target = self.target = image_target(model, self.image, self.source)
        self._open_stream = lambda: image_feeds(self.files, target, self.image)
        return super().bind(model)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.target is not None:
            described["images"] = {
                "input": self.target.name,
                "layout": self.target.layout,
                "size": list(self.target.size),
                "channels": self.target.channels,
                "preprocess": config_to_dict(self.image),
            }
        return described


def _folder(path: Path, limit: int | None, spec: DataSpec) -> CalibrationData:
    npz = sorted(path.glob("*.npz"))
    npy = sorted(path.glob("*.npy"))
    images = image_files(path)
    if sum(map(bool, (npz, npy, images))) > 1:
        raise InputError(f"data folder {path} mixes .npz, .npy and image files", "use one kind")
    if npy:
        return _npy_files(npy, str(path), limit, spec)
    if images:
        return _ImageData(images, str(path), limit, spec)
    if not npz:
        raise InputError(
            f"data folder {path} holds no .npz, .npy or image files",
            "put one .npz per sample (arrays named by input), or images (.jpg/.png), in it",
        )
    count = sum(_npz_sample_count(f, spec) for f in npz)

    def stream() -> Iterator[Feeds]:
        for f in npz:
            yield from _npz_stream(f, spec)

    return CalibrationData(stream, source=str(path), count=count, limit=limit, spec=spec)


# -- constants ------------------------------------------------------------------------------------
def _unbound_constant(values: tuple[float, ...]) -> np.ndarray:
    """A value before the model is known: int64 when every number is whole, else float32."""
    array = np.asarray(values if len(values) > 1 else values[0])
    return array.astype(np.int64 if np.all(np.mod(array, 1) == 0) else np.float32)


def _constant(values: tuple[float, ...], spec: InputSpec, source: str) -> np.ndarray:
    """A declared value in the input's dtype and rank: free dimensions are 1, one number fills them all."""
    dtype = spec.dtype if spec.dtype is not None else _unbound_constant(values).dtype
    if np.issubdtype(dtype, np.integer) and not all(float(v).is_integer() for v in values):
        raise InputError(
            f"data {source}: the value {list(values)} of input {spec.name!r} is not whole, and the model takes {dtype}",
            "give whole numbers",
        )
    shape = tuple(spec.fixed(a) or 1 for a in range(len(spec.shape)))
    size = int(np.prod(shape, dtype=np.int64))
    array = np.asarray(values, dtype=np.float64)
    if array.size == 1:
        array = np.full(shape, array[0])
    elif array.size == size:
        array = array.reshape(shape)
    else:
        raise InputError(
            f"data {source}: input {spec.name!r} {spec.shape_text()} takes {size} value(s), {array.size} were given",
            "give one number, or one per element",
        )
    return array.astype(dtype)


# -- stacked arrays (verbs that run batches) ------------------------------------------------------
class SampleArrays(dict):
    """{input name: samples stacked on that input's sample axis} (constants kept as they are), with
    `axes` (input name -> sample axis, None for a constant) and `count`; `take(start, stop)` slices
    samples. What bench, gate, eval and package time or evaluate in batches."""

    def __init__(self, arrays: Mapping[str, np.ndarray], axes: Mapping[str, int | None], count: int, source: str):
        super().__init__(arrays)
        self.axes = dict(axes)
        self.count = count
        self.source = source

    @classmethod
    def from_mapping(cls, arrays: Mapping[str, Any], source: str = "data") -> SampleArrays:
        """Plain arrays: axis 0 holds the samples, a 0-d array is a constant."""
        if isinstance(arrays, SampleArrays):
            return arrays
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        axes = {k: (0 if v.ndim else None) for k, v in arrays.items()}
        counts = {v.shape[0] for v in arrays.values() if v.ndim}
        return cls(arrays, axes, min(counts) if counts else 0, source)

    def with_arrays(self, arrays: Mapping[str, np.ndarray]) -> SampleArrays:
        """Other arrays (e.g. these cast to a model's dtypes) with the same sample axes and count."""
        return SampleArrays(arrays, {k: self.axes.get(k, 0) for k in arrays}, self.count, self.source)

    def take(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {
            k: v
            if self.axes.get(k) is None
            else np.take(v, np.arange(start, min(stop, v.shape[self.axes[k]])), axis=self.axes[k])
            for k, v in self.items()
        }


def sample_arrays(data: CalibrationData, *, limit: int | None = None) -> SampleArrays:
    """The samples of `data` stacked along each input's sample axis (its layout, axis 0 by default);
    constants (`values`) are kept once. Samples must agree in shape off their sample axis (pad them,
    or give a Python reader and run one sample at a time)."""
    spec = data.spec
    constants = set(dict(spec.values))
    stacks: dict[str, list[np.ndarray]] = {}
    count = 0
    for feeds in iter(data) if limit is None else itertools.islice(data, limit):
        for name, array in feeds.items():
            stacks.setdefault(name, []).append(array)
        count += 1
    if not count:
        raise InputError(f"data {data.source} holds no samples", "give at least one sample")
    arrays: dict[str, np.ndarray] = {}
    axes: dict[str, int | None] = {}
    for name, parts in stacks.items():
        if name in constants or parts[0].ndim == 0:
            arrays[name], axes[name] = parts[0], None
            continue
        axis = spec.axis(name)
        shapes = {tuple(s for a, s in enumerate(p.shape) if a != axis) for p in parts}
        if len(shapes) > 1:
            raise InputError(
                f"data {data.source}: the samples of input {name!r} differ in shape "
                f"({', '.join(str(list(s)) for s in sorted(shapes)[:3])}), so they cannot be batched",
                "pad them to one shape",
            )
        arrays[name], axes[name] = np.concatenate(parts, axis=axis), axis
    return SampleArrays(arrays, axes, count, data.source)


def data_arrays(
    data: str | os.PathLike | DataSpec | Mapping[str, Any] | None,
    model: str | os.PathLike,
    *,
    samples: int | None = None,
    seq_len: int = 128,
    extra: Iterable[str] = (),
):
    """A verb's data as arrays with the samples on each input's sample axis (a SampleArrays): arrays
    given stay as they are; a plain model:NAME is that reference model's benchmark inputs (padded to
    `seq_len`, dlopt.bench.load_data); any other source is read for `model`'s inputs (an .onnx path)
    and stacked (at most `samples` samples). `extra`: names of arrays an .npz may hold besides the
    inputs (eval's labels, expected outputs), returned as they are."""
    if data is None or isinstance(data, Mapping):
        return data
    spec = as_spec(data)
    if spec.source and spec.source.startswith("model:") and spec == DataSpec(source=spec.source):
        from dlopt.models import get_reference_model

        return get_reference_model(spec.source[len("model:") :]).benchmark_inputs(samples or 64, seq_len=seq_len)
    graph = None
    if str(model).endswith(".onnx") and Path(model).is_file():
        from dlopt.fileio import load_onnx

        graph = load_onnx(model, load_external_data=False)
    inputs = {s.name for s in graph_inputs(graph)} if graph is not None else set()
    extras: dict[str, np.ndarray] = {}
    wanted = set(extra) - inputs
    npz = Path(spec.source) if spec.is_path and spec.source else None
    if wanted and npz is not None and npz.is_file() and npz.suffix == ".npz":
        with _open_npz(npz) as z:
            extras = {k: z[k] for k in z.files if k in wanted}
    loaded = load_data(spec, None, ignore=extras)
    loaded.finite = False  # eval warns about NaN inputs (dlopt.evaluate.data_warnings); timing does not care
    stacked = sample_arrays(loaded.bind(graph) if graph is not None else loaded, limit=samples)
    if not extras:
        return stacked
    merged = SampleArrays(
        {**stacked, **extras}, {**stacked.axes, **{k: None for k in extras}}, stacked.count, stacked.source
    )
    return merged


# -- checks ---------------------------------------------------------------------------------------
def _sample_count(arrays: Mapping[str, np.ndarray], source: str, spec: DataSpec) -> int:
    return _count_from_shapes({name: a.shape for name, a in arrays.items()}, source, spec)


def _split_samples(arrays: Mapping[str, np.ndarray], source: str, spec: DataSpec) -> Iterator[Feeds]:
    count = _sample_count(arrays, source, spec)
    for i in range(count):
        yield {name: np.ascontiguousarray(_sample(a, i, spec.axis(name))) for name, a in arrays.items()}


def _sample(array: np.ndarray, index: int, axis: int) -> np.ndarray:
    if axis == 0:
        return array[index : index + 1]
    return array[(slice(None),) * axis + (slice(index, index + 1),)]


def _check_sample(
    feeds: MutableMapping[str, np.ndarray], specs: list[InputSpec], source: str, index: int, *, finite: bool = True
) -> None:
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(feeds))
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputError(
            f"data {source} (sample {index}) does not match the model's inputs: missing {missing}, unknown {unknown}",
            f"name the arrays after the model's inputs: {', '.join(expected)}"
            + ("; give a constant with {input_value=NAME=VALUE}" if missing else ""),
        )
    for name, arr in feeds.items():
        spec = expected[name]
        if arr.ndim != len(spec.shape):
            raise InputError(
                f"data {source} (sample {index}): input {name!r} has shape {list(arr.shape)}, "
                f"the model expects rank {len(spec.shape)} {spec.shape_text()}",
                "each sample keeps the model's rank, with 1 on its sample axis (axis 0, or {input_layout=NAME=AXIS})",
            )
        for axis, got in enumerate(arr.shape):
            want = spec.fixed(axis)
            if want is not None and got != want:
                raise InputError(
                    f"data {source} (sample {index}): input {name!r} has shape {list(arr.shape)}, "
                    f"the model expects {spec.shape_text()} (axis {axis} must be {want})",
                    "resize or re-export the samples to the model's input shape, or declare the sample axis "
                    "with {input_layout=NAME=AXIS}",
                )
        if spec.dtype is not None and arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(
                    f"data {source} (sample {index}): input {name!r} is {arr.dtype}, the model expects {spec.dtype}",
                    f"convert the arrays with .astype({spec.dtype.name!r})",
                )
            feeds[name] = arr = arr.astype(spec.dtype)
        if finite and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise InputError(
                f"data {source} (sample {index}): input {name!r} holds {bad} NaN or infinite value(s)",
                "remove or fix those samples; calibration needs finite inputs",
            )


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr over calibration samples; yields advance(). Off: a no-op."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


__all__ = [
    "CalibrationData",
    "DEFAULT_SAMPLE_COUNT",
    "DataSpec",
    "Feeds",
    "InputSpec",
    "SampleArrays",
    "as_spec",
    "data_arrays",
    "data_spec",
    "graph_inputs",
    "load_data",
    "parse_layout",
    "parse_values",
    "progress_bar",
    "local_modules",
    "read_spec_file",
    "source_path",
    "reader_hash",
    "sample_arrays",
    "spec_from_keys",
    "spec_hash",
]
