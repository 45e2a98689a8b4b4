"""The inputs a benchmark times: real arrays from a file (load_data), cut into bound batches, or
generated from the model's input specs; the share of padding tokens in them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.bench.config import DEFAULT_SEQ_LEN
from dlopt.bench.results import LoadedModel
from dlopt.errors import InputError


def load_data(path: str | os.PathLike, *, samples: int = 64, seq_len: int = DEFAULT_SEQ_LEN
              ) -> dict[str, np.ndarray]:
    """Arrays from an .npz file (keys = input names), with errors that name the file; or, for
    `model:NAME`, `samples` real inputs of that reference model (dlopt.models: padded sentences at
    seq_len, photos, test images)."""
    if str(path).startswith("model:"):
        from dlopt.models import get_reference_model

        return get_reference_model(str(path)[len("model:"):]).benchmark_inputs(samples, seq_len=seq_len)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} does not exist", "give an .npz file with one array per model input")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zlib.error) as e:
        raise InputError(f"{p} is not a readable .npz file ({e})", "write it with numpy.savez") from e


MAX_DATA_BATCHES = 32  # real batches bound per model and cycled through (device memory stays small)


def data_batches(specs: Sequence[Any], data: Mapping[str, np.ndarray], source: str, batch: int | None
                 ) -> list[dict[str, np.ndarray]]:
    """`data` cut along each input's sample axis (axis 0, or the one its dlopt.data.SampleArrays
    declares; constants whole) into consecutive batches of `batch` samples (at most MAX_DATA_BATCHES;
    a remainder shorter than `batch` is left out), each checked against the model's inputs (`specs`:
    dlopt.inputs.session_inputs). `batch` None: all of `data` as one batch."""
    from dlopt.data import SampleArrays
    from dlopt.inputs import feeds_from_arrays

    if batch is None:
        return [feeds_from_arrays(specs, data, source)]
    arrays = SampleArrays.from_mapping(data, source)
    rows = {int(np.shape(arrays[s.name])[arrays.axes[s.name]]) for s in specs
            if s.name in arrays and arrays.axes.get(s.name) is not None}
    if len(rows) > 1:
        raise InputError(f"{source}: the model's input arrays hold different numbers of samples {sorted(rows)}",
                         "give every input the same number of samples on its sample axis")
    count = rows.pop() if rows else 0
    if count < batch:
        raise InputError(f"{source} holds {count} sample(s), fewer than batch {batch}",
                         "give more samples, or a smaller batch size")
    return [feeds_from_arrays(specs, arrays.take(i * batch, (i + 1) * batch), source)
            for i in range(min(count // batch, MAX_DATA_BATCHES))]


def model_feed_batches(model: LoadedModel, *, batch: int | None, seq_len: int, seed: int,
                       data: Mapping[str, np.ndarray] | None, data_source: str = "the data",
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[dict[str, np.ndarray]]:
    """The inputs a model is measured on: real batches of `batch` samples from `data` (one per timed call,
    in turn), or one generated (seeded) batch (model_feeds)."""
    if data is not None:
        from dlopt.inputs import session_inputs

        return data_batches(session_inputs(model.handle.session), data, data_source, batch)
    return [model_feeds(model, batch=batch, seq_len=seq_len, seed=seed, data=None, input_shapes=input_shapes)]


def model_feeds(model: LoadedModel, *, batch: int | None, seq_len: int, seed: int,
                data: Mapping[str, np.ndarray] | None, data_source: str = "the data",
                input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The inputs of one timed call: the first batch of `data` (see model_feed_batches), or generated
    (seeded) for `batch` by dlopt.inputs (free sizes that the model runs on, `input_shapes` as
    --input-shape gives them)."""
    from dlopt.fileio import load_onnx
    from dlopt.inputs import session_inputs, synthetic_feeds, value_ranges
    from dlopt.sessions import trial_run

    session = model.handle.session
    specs = session_inputs(session)
    if data is not None:
        return data_batches(specs, data, data_source, batch)[0]
    # an ORT-format file has no ONNX graph to read the integer inputs' ranges from
    ranges = {} if model.path.suffix == ".ort" else value_ranges(load_onnx(model.path, load_external_data=False))
    return synthetic_feeds(specs, batch=batch, seq_len=seq_len, seed=seed, overrides=input_shapes, ranges=ranges,
                           run=lambda feeds: trial_run(session, feeds))[0]


def padding_share(feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """The share of padding tokens (attention mask 0) over `feeds_list`; None when no integer input is
    named like a mask."""
    masks = [np.asarray(v) for f in feeds_list for k, v in f.items()
             if "mask" in k.lower() and np.issubdtype(np.asarray(v).dtype, np.integer)]
    if not masks:
        return None
    return float(1 - np.mean(np.concatenate([m.ravel() != 0 for m in masks])))


def padding_note(padding: float | None) -> str:
    return f", {100 * padding:.0f} % of tokens padding" if padding else ""
