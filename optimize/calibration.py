"""Calibration data: where samples come from, checked against the model, streamed one sample at a time.

A `CalibrationData` is a re-iterable source of feeds (`{input name: np.ndarray}`, batch 1, one sample
per item). It never holds more than one sample in memory beyond what its source holds (an .npz is
read lazily, array by array; a reference model's set is a generator), so statistics computed over it
cost the same memory for 100 or 10,000 samples. Samples may differ in shape (sequence length): every
consumer in dlopt handles one sample at a time.

Sources (`load_calibration(spec, model)`):
- `data.npz`: arrays named by input, first axis = samples (all samples of one array share a shape);
- a folder of `.npz` files (each like the above, read in sorted name order; use one file per sample
  when lengths vary), or of `.npy` files (single-input models only: first axis = samples), or of
  images (.jpg, .png ...: single-input image models; one sample per file, pre-processed as an
  `ImagePreprocess` declares, see dlopt.images);
- `model:NAME`: a reference model's own calibration set (`dlopt.models`), e.g. `model:minilm`.
"""

from __future__ import annotations

import contextlib
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.images import ImagePreprocess, ImageTarget, image_feeds, image_files, image_target
from dlopt.inputs import Feeds, InputSpec, graph_inputs
from dlopt.stage import config_to_dict

DEFAULT_SAMPLE_COUNT = 100


class CalibrationData:
    """A re-iterable, validated stream of calibration feeds, one sample (batch 1) per item.

    Build one with `load_calibration`, `CalibrationData.from_arrays` or `CalibrationData.from_feeds`.
    Iterating twice yields the same samples in the same order (quantization is deterministic)."""

    def __init__(self, open_stream: Callable[[], Iterator[Feeds]], *, source: str,
                 count: int | None = None, limit: int | None = None):
        self._open_stream = open_stream
        self.source = source  # how the data was named by the user, for messages and reports
        self._count = count
        self.limit = limit
        self._specs: list[InputSpec] | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, source: str = "arrays",
                    limit: int | None = None) -> CalibrationData:
        """Arrays named by input, first axis = samples."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        count = _sample_count(arrays, source)
        return cls(lambda: _split_samples(arrays, source), source=source, count=count, limit=limit)

    @classmethod
    def from_feeds(cls, feeds: Iterable[Mapping[str, np.ndarray]], *, source: str = "feeds",
                   limit: int | None = None) -> CalibrationData:
        """A list of feeds, each one sample with a leading batch axis of 1 (shapes may differ)."""
        items = [{k: np.asarray(v) for k, v in f.items()} for f in feeds]
        return cls(lambda: iter(items), source=source, count=len(items), limit=limit)

    # -- use ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Feeds]:
        for index, feeds in enumerate(self._open_stream()):
            if self.limit is not None and index >= self.limit:
                return
            if self._specs is not None:
                _check_sample(feeds, self._specs, self.source, index)
            yield feeds

    def __len__(self) -> int:
        if self._count is None:
            return self.limit if self.limit is not None else sum(1 for _ in self._open_stream())
        return min(self._count, self.limit) if self.limit is not None else self._count

    def bind(self, model) -> CalibrationData:
        """Check the first sample now (names, ranks, dtypes, fixed dims) and every later one as it is
        read; returns self. Mismatches raise InputError naming the data source and the input."""
        self._specs = graph_inputs(model)
        first = next(iter(self), None)
        if first is None:
            raise InputError(f"calibration data {self.source} holds no samples",
                             "give at least one sample")
        return self

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self)}

    @property
    def needs_model(self) -> bool:
        """True when samples can be read only once bound to the model (images, bare .npy arrays)."""
        return False


def load_calibration(spec: str | Path | CalibrationData | None, model=None, *,
                     limit: int | None = None, image: ImagePreprocess | None = None) -> CalibrationData | None:
    """Turn a user's `--calibration` value into CalibrationData, checked against `model` if given.

    `limit` caps the number of samples read (and sets how many a `model:NAME` set generates);
    `image` is how a folder of images becomes the model's input (dlopt.images; default: pixels/255,
    RGB, the model's size and layout)."""
    if spec is None or isinstance(spec, CalibrationData):
        data = spec
    elif str(spec).startswith("model:"):
        data = _reference_set(str(spec)[len("model:"):], limit)
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"calibration data {path} does not exist",
                             "give an .npz file, a folder of .npy/.npz files, or model:NAME")
        data = _folder(path, limit, image) if path.is_dir() else _npz_file(path, limit)
    if data is not None and model is not None:
        data.bind(model)
    return data


# -- sources --------------------------------------------------------------------------------------
def _reference_set(name: str, limit: int | None) -> CalibrationData:
    from dlopt.models import get_reference_model

    ref = get_reference_model(name)
    count = limit if limit is not None else DEFAULT_SAMPLE_COUNT

    def stream() -> Iterator[Feeds]:
        for feeds in ref.calibration_data(count):
            yield {k: np.asarray(v) for k, v in feeds.items()}

    return CalibrationData(stream, source=f"model:{name}", count=count, limit=limit)


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"calibration file {path} is not a readable .npz ({type(e).__name__})",
                         "save it with numpy.savez(path, input_name=array, ...)") from e


def _npz_sample_count(path: Path) -> int:
    with _open_npz(path) as z:
        if not z.files:
            raise InputError(f"calibration file {path} holds no arrays", "save arrays named by input")
        counts = set()
        for name in z.files:
            try:
                counts.add(int(z[name].shape[0]) if z[name].ndim else -1)
            except ValueError as e:  # object arrays need pickle
                raise InputError(f"calibration file {path}: array {name!r} is not numeric",
                                 "store numeric arrays, one per input, first axis = samples") from e
    if len(counts) != 1 or -1 in counts:
        raise InputError(f"calibration file {path}: arrays have different sample counts {sorted(counts)}",
                         "the first axis of every array is the sample axis; give all arrays the same length")
    return counts.pop()


def _npz_stream(path: Path) -> Iterator[Feeds]:
    # Arrays are read one file at a time; a sample is a view, so no sample is copied twice.
    with _open_npz(path) as z:
        arrays = {name: z[name] for name in z.files}
    yield from _split_samples(arrays, str(path))


def _npz_file(path: Path, limit: int | None) -> CalibrationData:
    if path.suffix == ".npy":
        return _npy_files([path], str(path), limit)
    count = _npz_sample_count(path)
    return CalibrationData(lambda: _npz_stream(path), source=str(path), count=count, limit=limit)


def _npy_files(files: list[Path], source: str, limit: int | None) -> CalibrationData:
    def stream() -> Iterator[Feeds]:
        for f in files:
            try:
                arr = np.load(f, allow_pickle=False, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise InputError(f"calibration file {f} is not a readable .npy ({type(e).__name__})",
                                 "save it with numpy.save") from e
            if arr.ndim == 0:
                raise InputError(f"calibration file {f} holds a scalar", "first axis = samples")
            for i in range(arr.shape[0]):
                # name filled in by _single_input below once the model is known
                yield {"": np.array(arr[i:i + 1])}

    return _NpyData(stream, source=source, limit=limit)


class _NpyData(CalibrationData):
    """Bare .npy arrays carry no input name: valid only for single-input models."""

    @property
    def needs_model(self) -> bool:
        return self._specs is None

    def bind(self, model) -> CalibrationData:
        specs = graph_inputs(model)
        if len(specs) != 1:
            raise InputError(f"calibration data {self.source} is .npy (one unnamed array) but the model has "
                             f"{len(specs)} inputs", "save an .npz with one array per input name")
        name = specs[0].name
        raw = self._open_stream
        self._open_stream = lambda: ({name: f[""]} for f in raw())
        return super().bind(model)


class _ImageData(CalibrationData):
    """Image files: which input they feed, at what size and layout, is known once bound to the model."""

    def __init__(self, files: list[Path], source: str, limit: int | None, config: ImagePreprocess):
        super().__init__(self._unbound, source=source, count=len(files), limit=limit)
        self.files, self.image = files, config
        self.target: ImageTarget | None = None

    @property
    def needs_model(self) -> bool:
        return self.target is None

    def _unbound(self) -> Iterator[Feeds]:
        raise InputError(f"the images in {self.source} are read for a model: bind them to it first",
                         "pass the model to load_calibration(spec, model)")

    def bind(self, model) -> CalibrationData:
        self.target = image_target(model, self.image, self.source)
        self._open_stream = lambda: image_feeds(self.files, self.target, self.image)
        return super().bind(model)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.target is not None:
            described["images"] = {"input": self.target.name, "layout": self.target.layout,
                                   "size": list(self.target.size), "channels": self.target.channels,
                                   "preprocess": config_to_dict(self.image)}
        return described


def _folder(path: Path, limit: int | None, image: ImagePreprocess | None = None) -> CalibrationData:
    npz = sorted(path.glob("*.npz"))
    npy = sorted(path.glob("*.npy"))
    images = image_files(path)
    if sum(map(bool, (npz, npy, images))) > 1:
        raise InputError(f"calibration folder {path} mixes .npz, .npy and image files", "use one kind")
    if npy:
        return _npy_files(npy, str(path), limit)
    if images:
        return _ImageData(images, str(path), limit, image or ImagePreprocess())
    if not npz:
        raise InputError(f"calibration folder {path} holds no .npz, .npy or image files",
                         "put one .npz per sample (arrays named by input), or images (.jpg/.png), in it")
    count = sum(_npz_sample_count(f) for f in npz)

    def stream() -> Iterator[Feeds]:
        for f in npz:
            yield from _npz_stream(f)

    return CalibrationData(stream, source=str(path), count=count, limit=limit)


# -- checks ---------------------------------------------------------------------------------------
def _sample_count(arrays: Mapping[str, np.ndarray], source: str) -> int:
    if not arrays:
        raise InputError(f"calibration data {source} holds no arrays", "give one array per input")
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise InputError(f"calibration data {source}: arrays have different sample counts {counts}",
                         "the first axis of every array is the sample axis")
    return next(iter(counts.values()))


def _split_samples(arrays: Mapping[str, np.ndarray], source: str) -> Iterator[Feeds]:
    count = _sample_count(arrays, source)
    for i in range(count):
        yield {name: np.ascontiguousarray(a[i:i + 1]) for name, a in arrays.items()}


def _check_sample(feeds: Mapping[str, np.ndarray], specs: list[InputSpec], source: str, index: int) -> None:
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(feeds))
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputError(
            f"calibration data {source} (sample {index}) does not match the model's inputs: "
            f"missing {missing}, unknown {unknown}",
            f"name the arrays after the model's inputs: {', '.join(expected)}")
    for name, arr in feeds.items():
        spec = expected[name]
        if arr.ndim != len(spec.shape):
            raise InputError(
                f"calibration data {source} (sample {index}): input {name!r} has shape {list(arr.shape)}, "
                f"the model expects rank {len(spec.shape)} {spec.shape_text()}",
                "the first axis of each array is the sample axis; each sample keeps the model's rank")
        for axis, got in enumerate(arr.shape):
            want = spec.fixed(axis)
            if want is not None and got != want:
                raise InputError(
                    f"calibration data {source} (sample {index}): input {name!r} has shape {list(arr.shape)}, "
                    f"the model expects {spec.shape_text()} (axis {axis} must be {want})",
                    "resize or re-export the samples to the model's input shape")
        if spec.dtype is not None and arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(
                    f"calibration data {source} (sample {index}): input {name!r} is {arr.dtype}, "
                    f"the model expects {spec.dtype}", f"convert the arrays with .astype({spec.dtype.name!r})")
            feeds[name] = arr = arr.astype(spec.dtype)  # type: ignore[index]
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise InputError(f"calibration data {source} (sample {index}): input {name!r} holds {bad} NaN or "
                             "infinite value(s)", "remove or fix those samples; calibration needs finite inputs")


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr over calibration samples; yields advance(). Off: a no-op."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


__all__ = ["CalibrationData", "DEFAULT_SAMPLE_COUNT", "Feeds", "InputSpec", "graph_inputs", "load_calibration",
           "progress_bar"]

