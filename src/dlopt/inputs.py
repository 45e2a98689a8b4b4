"""Model inputs: what a model takes (specs), the shapes its free dimensions get, and synthetic inputs.

Every verb that has to make inputs when the user gives none (quantize, bench, gate, package, the
pre-processing and fp16 checks) makes them here, with one rule:

- Shapes. A fixed dimension keeps its value. `--input-shape name=1x3x640x640` gives an input's
  whole shape (repeatable, one per input); its free dimensions take those values, and a named
  free dimension (an ONNX `dim_param`) takes the same value in every input that shares the name.
  A verb with a batch option (bench, gate, package) sets a free batch axis (axis 0) to it, also
  in a given shape; otherwise it is 1. The height and width of a 4-D float input (NCHW when axis
  1 is a fixed 1, 3 or 4 channels, NHWC when axis 3 is) get an image size, and every other free
  axis the sequence length.
- Sizes that run. A model may accept only some sizes (a detector with two downsampling paths
  added together needs multiples of 32). With a way to run the float model, the candidates are
  tried in order, images 224, 256, 320, 640 and sequences the verb's length then 32, 64, 128, 256,
  and the first that the model runs on is taken. Where none runs, an InputError names the input
  and asks for `--input-shape` or data, with the input's real name and declared sizes (`shape_hint`).
- Values, seeded by (seed, input name) so that two variants of one model get identical inputs:
  floats ~ N(0, 1); bools True; integers named *mask* ones, *type_ids* zeros, *position* 0..T-1;
  other integers uniform in the range the graph reads them with (indices of a Gather over a table
  of V rows or a OneHot of depth V: [0, V); compared with a constant table: its min..max), else
  token-like ids in [0, 1000).
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlopt.errors import InputError

Feeds = dict[str, np.ndarray]
Shape = tuple[int, ...]
Dim = int | str | None  # int > 0: fixed; a string: a named free dimension; None or int <= 0: a free one

DEFAULT_BATCH = 1
TOKEN_VOCAB = 1000  # token ids drawn from [0, 1000): inside every real vocabulary
IMAGE_SIZES = (224, 256, 320, 640)  # multiples of 32: what strided CNNs (and FPN-style heads) accept
SEQUENCE_FALLBACKS = (32, 64, 128, 256)
_IMAGE_CHANNELS = (1, 3, 4)
_UNNAMED = ("", "?")  # ONNX Runtime's and some exporters' spelling of an unnamed free dimension

# ONNX TensorProto element type -> numpy dtype, and ONNX Runtime's type strings
_ONNX_TO_NUMPY = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, element type (None: one dlopt cannot make, e.g. strings) and shape."""

    name: str
    dtype: np.dtype | None
    shape: tuple[Dim, ...]
    type_name: str = ""  # as the model spells it, for messages

    def fixed(self, axis: int) -> int | None:
        dim = self.shape[axis]
        return dim if isinstance(dim, (int, np.integer)) and dim > 0 else None

    def shape_text(self) -> str:
        return (
            "["
            + ", ".join(
                str(d) if self.fixed(a) else (d if isinstance(d, str) and d not in _UNNAMED else "?")
                for a, d in enumerate(self.shape)
            )
            + "]"
        )


def graph_inputs(model) -> list[InputSpec]:
    """The real inputs of an onnx.ModelProto (initializers listed as inputs in old opsets excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        dtype = _ONNX_TO_NUMPY.get(tt.elem_type) if vi.type.HasField("tensor_type") else None
        specs.append(
            InputSpec(vi.name, np.dtype(dtype) if dtype is not None else None, dims, f"tensor elem_type {tt.elem_type}")
        )
    return specs


def session_inputs(session) -> list[InputSpec]:
    """The inputs of an onnxruntime.InferenceSession."""
    specs = []
    for i in session.get_inputs():
        dtype = _ORT_TO_NUMPY.get(i.type)
        specs.append(InputSpec(i.name, np.dtype(dtype) if dtype is not None else None, tuple(i.shape), i.type))
    return specs


# --------------------------------------------------------------------------- input shapes (--input-shape)
def parse_input_shapes(texts: Iterable[str]) -> dict[str, Shape]:
    """`["x=1x3x640x640", "mask=1x128"]` -> {"x": (1, 3, 640, 640), "mask": (1, 128)}."""
    shapes: dict[str, Shape] = {}
    for text in texts:
        name, sep, dims = str(text).rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise InputError(f"input shape {text!r} is not NAME=DxDx...", "e.g. {input_shape=x=1x3x640x640}")
        if name in shapes:
            raise InputError(f"input shape of {name!r} given twice", "give each input once")
        shapes[name] = shape
    return shapes


def check_input_shapes(specs: Sequence[InputSpec], shapes: Mapping[str, Shape]) -> None:
    """Each override names an input, has its rank and keeps its fixed dimensions."""
    by_name = {s.name: s for s in specs}
    for name, shape in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputError(
                f"{{input_shape={name}=...}} names {name!r}, which is not an input of the model",
                f"its inputs: {', '.join(by_name) or 'none'}",
            )
        if len(shape) != len(spec.shape):
            raise InputError(
                f"{{input_shape={name}={'x'.join(map(str, shape))}}} has rank {len(shape)}, "
                f"the input is {spec.shape_text()}",
                "give one size per axis",
            )
        for axis, size in enumerate(shape):
            if spec.fixed(axis) not in (None, size):
                raise InputError(
                    f"{{input_shape={name}={'x'.join(map(str, shape))}}}: axis {axis} of "
                    f"{spec.shape_text()} is fixed at {spec.fixed(axis)}",
                    "keep the model's fixed sizes",
                )


# --------------------------------------------------------------------------- shapes
def image_axes(spec: InputSpec) -> tuple[int, int] | None:
    """(height axis, width axis) of a 4-D float input that looks like an image batch, else None."""
    if len(spec.shape) != 4 or spec.dtype is None or not np.issubdtype(spec.dtype, np.floating):
        return None
    if spec.fixed(1) in _IMAGE_CHANNELS:
        return 2, 3
    if spec.fixed(3) in _IMAGE_CHANNELS:
        return 1, 2
    return None


def _group(spec: InputSpec, axis: int) -> str:
    dim = spec.shape[axis]
    return f"dim:{dim}" if isinstance(dim, str) and dim not in _UNNAMED else f"axis:{spec.name}:{axis}"


def _shape_candidates(
    specs: Sequence[InputSpec], *, batch: int | None, seq_len: int, overrides: Mapping[str, Shape]
) -> list[dict[str, Shape]]:
    """Candidate shape assignments for all inputs, in the order to try them (see the module doc)."""
    known: dict[str, int] = {}  # free-dimension group -> size fixed by an override or the batch
    for spec in specs:
        for axis, size in enumerate(overrides.get(spec.name, ())):
            if spec.fixed(axis) is None:
                known[_group(spec, axis)] = size
    roles: dict[str, str] = {}  # group -> "image" | "sequence"
    for spec in specs:
        if spec.name in overrides:
            continue
        images = image_axes(spec) or ()
        for axis in range(len(spec.shape)):
            group = _group(spec, axis)
            if spec.fixed(axis) is not None or group in known:
                continue
            if axis == 0 and batch is not None:
                known[group] = batch
            elif axis == 0:
                known[group] = DEFAULT_BATCH
            elif axis in images:
                roles[group] = "image"
            else:
                roles.setdefault(group, "sequence")
    sequences = tuple(dict.fromkeys((seq_len,) + SEQUENCE_FALLBACKS))
    rounds = max(len(IMAGE_SIZES), len(sequences)) if roles else 1
    candidates = []
    for k in range(rounds):
        sizes = dict(known)
        for group, role in roles.items():
            options = IMAGE_SIZES if role == "image" else sequences
            sizes[group] = options[min(k, len(options) - 1)]
        assignment = {}
        for spec in specs:
            if spec.name in overrides:
                shape = list(overrides[spec.name])
                if batch is not None and spec.fixed(0) is None and shape:
                    shape[0] = batch  # the batch axis follows the verb's batch (bench --batch 1,8,32)
                assignment[spec.name] = tuple(shape)
            else:
                assignment[spec.name] = tuple(spec.fixed(a) or sizes[_group(spec, a)] for a in range(len(spec.shape)))
        if assignment not in candidates:
            candidates.append(assignment)
    return candidates


def resolve_shapes(
    specs: Sequence[InputSpec],
    *,
    batch: int | None = None,
    seq_len: int = 16,
    overrides: Mapping[str, Shape] | None = None,
) -> dict[str, Shape]:
    """The first candidate shapes (no model run): what `synthetic_feeds` tries first."""
    overrides = dict(overrides or {})
    check_input_shapes(specs, overrides)
    _check_fixed_batch(specs, batch)
    return _shape_candidates(specs, batch=batch, seq_len=seq_len, overrides=overrides)[0]


def _check_fixed_batch(specs: Sequence[InputSpec], batch: int | None) -> None:
    if batch is None:
        return
    for spec in specs:
        if spec.shape and spec.fixed(0) not in (None, batch):
            raise InputError(
                f"input {spec.name!r} has a fixed batch of {spec.fixed(0)}, cannot run batch {batch}",
                f"use {{batch={spec.fixed(0)}}}, or export the model with a dynamic batch axis",
            )


# --------------------------------------------------------------------------- values
_PASS_THROUGH = {
    "Reshape",
    "Expand",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Transpose",
    "Identity",
    "Slice",
    "Gather",
    "Concat",
    "Tile",
}  # ops whose output holds values of (one of) their inputs


def value_ranges(model) -> dict[str, tuple[int, int]]:
    """[low, high) of the integer inputs of an onnx.ModelProto where the graph says it: indices of a
    Gather over a table of V rows or of a OneHot of depth V -> [0, V); compared (Equal) with a
    constant table -> [min, max + 1). Values are followed through reshapes, casts and the like."""
    from onnx import numpy_helper

    graph = model.graph
    constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranges: dict[str, tuple[int, int]] = {}
    for spec in graph_inputs(model):
        if spec.dtype is None or not np.issubdtype(spec.dtype, np.integer):
            continue
        found: list[tuple[int, int]] = []
        seen, frontier = set(), [spec.name]
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node in consumers.get(tensor, []):
                position = list(node.input).index(tensor)
                found += _range_from_use(node, position, constants)
                if (
                    node.op_type in _PASS_THROUGH
                    and (position == 0 or node.op_type == "Concat")
                    or node.op_type == "Cast"
                    and _cast_is_integer(node)
                ):
                    frontier += [o for o in node.output if o]
        if found:
            ranges[spec.name] = (min(low for low, _ in found), max(high for _, high in found))
    return ranges


def _cast_is_integer(node) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), 0)
    return to in (2, 3, 4, 5, 6, 7, 12, 13)


def _range_from_use(node, position: int, constants: Mapping[str, np.ndarray]) -> list[tuple[int, int]]:
    op = node.op_type
    if op == "Gather" and position == 1 and node.input[0] in constants:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = constants[node.input[0]]
        return [(0, int(table.shape[axis]))] if table.ndim else []
    if op == "OneHot" and position == 0 and len(node.input) > 1 and node.input[1] in constants:
        return [(0, int(np.asarray(constants[node.input[1]]).reshape(-1)[0]))]
    if op == "Equal":
        other = node.input[1 - position] if len(node.input) == 2 else None
        compared = constants.get(other) if other else None
        if compared is not None and compared.size > 1 and np.issubdtype(compared.dtype, np.integer):
            return [(int(compared.min()), int(compared.max()) + 1)]
    return []


def make_feeds(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Shape],
    *,
    seed: int = 0,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> Feeds:
    """Seeded values of the given shapes (the value rule in the module doc)."""
    from dlopt.limits import check_input_bytes

    check_input_bytes(
        {s.name: tuple(shapes[s.name]) for s in specs},
        {s.name: np.dtype(s.dtype).itemsize for s in specs if s.dtype is not None},
        "generated inputs",
    )
    feeds = {}
    for spec in specs:
        if spec.dtype is None:
            raise InputError(
                f"input {spec.name!r} has type {spec.type_name}, which dlopt cannot generate",
                "pass real inputs ({data=DATA} / {calibration=DATA})",
            )
        dtype, shape = spec.dtype, shapes[spec.name]
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        lowered = spec.name.lower()
        if dtype == np.bool_:
            value = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif ranges and spec.name in ranges:
            low, high = ranges[spec.name]
            value = rng.integers(low, max(high, low + 1), size=shape).astype(dtype)
        elif "mask" in lowered:
            value = np.ones(shape, dtype)
        elif "type" in lowered:
            value = np.zeros(shape, dtype)
        elif "position" in lowered and len(shape) >= 1:
            value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            high = min(TOKEN_VOCAB, int(np.iinfo(dtype).max) + 1)
            value = rng.integers(0, high, size=shape, dtype=dtype)
        feeds[spec.name] = value
    return feeds


def synthetic_feeds(
    specs: Sequence[InputSpec],
    *,
    count: int = 1,
    batch: int | None = None,
    seq_len: int = 16,
    seed: int = 0,
    overrides: Mapping[str, Shape] | None = None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    run: Callable[[Feeds], object] | None = None,
) -> list[Feeds]:
    """`count` seeded samples (seeds seed, seed+1, ...). With `run` (runs the float model on one
    sample), the first shape candidate it runs on is taken; an InputError when none runs."""
    overrides = dict(overrides or {})
    check_input_shapes(specs, overrides)
    _check_fixed_batch(specs, batch)
    candidates = _shape_candidates(specs, batch=batch, seq_len=seq_len, overrides=overrides)
    chosen, failures = None, []
    for shapes in candidates:
        first = make_feeds(specs, shapes, seed=seed, ranges=ranges)
        if run is None:
            chosen = shapes
            break
        try:
            run(first)
        except Exception as e:  # onnxruntime raises its own exception types on shapes it cannot run
            failures.append((shapes, _run_error(e)))
            continue
        chosen = shapes
        break
    if chosen is None:
        free = [s for s in specs if s.name not in overrides and any(s.fixed(a) is None for a in range(len(s.shape)))]
        names = ", ".join(f"{s.name} {s.shape_text()}" for s in free) or ", ".join(s.name for s in specs)
        tried = "; ".join(
            " ".join(f"{n}={'x'.join(map(str, sh))}" for n, sh in shapes.items()) for shapes, _ in failures[:4]
        )
        if len(candidates) == 1 and overrides:
            raise InputError(
                f"the float model does not run on {{input_shape={tried}}} ({failures[-1][1]})",
                "give a shape the model accepts, or real data",
            )
        raise InputError(
            f"the float model runs on none of the synthetic input shapes tried for {names} "
            f"(tried {tried}; last error: {failures[-1][1]})",
            shape_hint(free or specs, batch),
        )
    return [make_feeds(specs, chosen, seed=seed + k, ranges=ranges) for k in range(count)]


def shape_hint(specs: Sequence[InputSpec], batch: int | None = None) -> str:
    """The fix for inputs whose free sizes dlopt could not choose: an `{input_shape=...}` per input, with
    the model's own name and declared sizes, and a letter where the size is the user's to give
    (`x=1x3x48xW` for a text recogniser's [N, 3, 48, W]); never a made-up 640x640 the model may reject."""
    shapes, letters = [], []
    for spec in specs:
        images = image_axes(spec) or ()
        dims = []
        for axis, dim in enumerate(spec.shape):
            if spec.fixed(axis) is not None:
                dims.append(str(spec.fixed(axis)))
            elif axis == 0:
                dims.append(str(batch or DEFAULT_BATCH))
            else:
                letter = (
                    dim
                    if isinstance(dim, str) and dim not in _UNNAMED and re.fullmatch(r"\w+", dim)
                    else "HW"[images.index(axis)]
                    if axis in images
                    else f"D{axis}"
                )
                dims.append(letter)
                letters.append(letter)
        shapes.append(f"{{input_shape={spec.name}={'x'.join(dims)}}}")
    unique = list(dict.fromkeys(letters))
    sizes = f" ({', '.join(unique)}: the size{'s' if len(unique) > 1 else ''} of your data)" if unique else ""
    return f"give the shape with {' '.join(shapes)}" + sizes + ", or real data"


def _run_error(error: Exception) -> str:
    """ONNX Runtime's failure in a few words: the node and the status message, without the source
    path and C++ signature it starts with."""
    text = " ".join(str(error).split()) or type(error).__name__
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    status = re.sub(r"^\S+:\d+ [^()]*\([^)]*\) ", "", text.split("Status Message:")[-1].strip())
    return (f"{node.group(1)} node {node.group(2)!r}: " if node else "") + status[:200]


def model_feeds(
    model,
    *,
    count: int = 1,
    batch: int | None = None,
    seq_len: int = 16,
    seed: int = 0,
    overrides: Mapping[str, Shape] | None = None,
    check: bool = True,
) -> list[Feeds]:
    """Synthetic samples for an onnx.ModelProto that its float model runs on (`check`: tried through
    a CPU session of the model, see `synthetic_feeds`)."""
    from dlopt.sessions import cpu_session, trial_run

    specs = graph_inputs(model)
    run = None
    if check and (overrides or _has_free_dims(specs, overrides)):  # a user's shape is tried too
        session = cpu_session(
            model, graph_opt_level="basic", error=InputError, hint="check the model with `python -m onnx.checker`"
        )
        run = lambda feeds: trial_run(session, feeds)  # noqa: E731
    return synthetic_feeds(
        specs,
        count=count,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        overrides=overrides,
        ranges=value_ranges(model),
        run=run,
    )


def _has_free_dims(specs: Sequence[InputSpec], overrides: Mapping[str, Shape] | None) -> bool:
    return any(s.fixed(a) is None for s in specs if s.name not in (overrides or {}) for a in range(1, len(s.shape)))


def feeds_from_arrays(
    specs: Sequence[InputSpec],
    data: Mapping[str, np.ndarray],
    source: str,
    sample_axes: Mapping[str, int | None] | None = None,
) -> Feeds:
    """The model's inputs taken from `data` (e.g. an .npz's arrays), cast to the model's types where
    that loses nothing; names, ranks and fixed dimensions checked. `sample_axes` (input name -> the axis
    that holds the samples) marks arrays that are run in chunks: their sample axis may hold any number of
    samples, however a fixed batch size of the model's splits it (6 samples for a batch-1 model)."""
    sample_axes = sample_axes or {}
    feeds = {}
    for spec in specs:
        if spec.name not in data:
            raise InputError(
                f"{source} has no array {spec.name!r} for the model's input",
                f"its arrays: {', '.join(sorted(data)) or 'none'}; the model needs {', '.join(s.name for s in specs)}",
            )
        array = np.asarray(data[spec.name])
        want = spec.dtype if spec.dtype is not None else array.dtype
        if array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise InputError(
                    f"{source}: array {spec.name!r} is {array.dtype}, the model wants {want}",
                    "save it with the model's dtype",
                )
            array = array.astype(want)
        if array.ndim != len(spec.shape) or any(
            spec.fixed(a) not in (None, n) for a, n in enumerate(array.shape) if a != sample_axes.get(spec.name)
        ):
            raise InputError(
                f"{source}: array {spec.name!r} has shape {list(array.shape)}, the model wants {spec.shape_text()}",
                "fix the data's shape",
            )
        feeds[spec.name] = array
    return feeds


def take_samples(data: Iterable[Mapping[str, np.ndarray]] | None, count: int) -> list[Feeds]:
    """Up to `count` samples from `data` (calibration data, a list of feeds), copied into dicts."""
    return [dict(f) for f in itertools.islice(data, count)] if data is not None else []


__all__ = [
    "DEFAULT_BATCH",
    "Feeds",
    "IMAGE_SIZES",
    "InputSpec",
    "Shape",
    "TOKEN_VOCAB",
    "check_input_shapes",
    "feeds_from_arrays",
    "graph_inputs",
    "image_axes",
    "make_feeds",
    "model_feeds",
    "parse_input_shapes",
    "resolve_shapes",
    "session_inputs",
    "shape_hint",
    "synthetic_feeds",
    "take_samples",
    "value_ranges",
]
