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


def load_data(path: str | os.PathLike, *, samples: int = 64, seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, np.ndarray]:
    """Arrays from an .npz file (keys = input names), with errors that name the file; or, for
    `model:NAME`, `samples` real inputs of that reference model (dlopt.models: padded sentences at
    seq_len, photos, test images)."""
    if str(path).startswith("model:"):
        from dlopt.models import get_reference_model

        return get_reference_model(str(path)[len("model:") :]).benchmark_inputs(samples, seq_len=seq_len)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} does not exist", "give an .npz file with one array per model input")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zlib.error) as e:
        raise InputError(f"{p} is not a readable .npz file ({e})", "write it with numpy.savez") from e


MAX_DATA_BATCHES = 32  # real batches bound per model and cycled through (device memory stays small)


def data_batches(
    specs: Sequence[Any], data: Mapping[str, np.ndarray], source: str, batch: int | None
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
    rows = {
        int(np.shape(arrays[s.name])[arrays.axes[s.name]])
        for s in specs
        if s.name in arrays and arrays.axes.get(s.name) is not None
    }
    if len(rows) > 1:
        raise InputError(
            f"{source}: the model's input arrays hold different numbers of samples {sorted(rows)}",
            "give every input the same number of samples on its sample axis",
        )
    count = rows.pop() if rows else 0
    if count < batch:
        raise InputError(
            f"{source} holds {count} sample(s), fewer than batch {batch}", "give more samples, or a smaller batch size"
        )
    return [
        feeds_from_arrays(specs, arrays.take(i * batch, (i + 1) * batch), source)
        for i in range(min(count // batch, MAX_DATA_BATCHES))
    ]


def model_feed_batches(
    model: LoadedModel,
    *,
    batch: int | None,
    seq_len: int,
    seed: int,
    data: Mapping[str, np.ndarray] | None,
    data_source: str = "the data",
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The inputs a model is measured on: real batches of `batch` samples from `data` (one per timed call,
    in turn), or one generated (seeded) batch (model_feeds)."""
    if data is not None:
        from dlopt.inputs import session_inputs

        return data_batches(session_inputs(model.handle.session), data, data_source, batch)
    return [model_feeds(model, batch=batch, seq_len=seq_len, seed=seed, data=None, input_shapes=input_shapes)]


def model_feeds(
    model: LoadedModel,
    *,
    batch: int | None,
    seq_len: int,
    seed: int,
    data: Mapping[str, np.ndarray] | None,
    data_source: str = "the data",
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
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
    return synthetic_feeds(
        specs,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        overrides=input_shapes,
        ranges=ranges,
        run=lambda feeds: trial_run(session, feeds),
    )[0]


def padding_share(feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """The share of padding tokens (attention mask 0) over `feeds_list`; None when no integer input is
    named like a mask."""
    masks = [
        np.asarray(v)
        for f in feeds_list
        for k, v in f.items()
        if "mask" in k.lower() and np.issubdtype(np.asarray(v).dtype, np.integer)
    ]
    if not masks:
        return None
    return float(1 - np.mean(np.concatenate([m.ravel() != 0 for m in masks])))


def _real_lengths(data: Mapping[str, np.ndarray] | None) -> tuple[np.ndarray, int] | None:
    """Each sample's real length (the last position whose mask is non-zero, + 1; 1 for an all-padding
    row) and the padded length, from the first integer [samples, T] input named like a mask; None without one."""
    axes = getattr(data, "axes", {})  # a dlopt.data.SampleArrays says where its samples are: axis 0 here
    masks = [
        np.asarray(v)
        for k, v in (data or {}).items()
        if "mask" in k.lower()
        and np.ndim(v) == 2
        and np.issubdtype(np.asarray(v).dtype, np.integer)
        and axes.get(k, 0) == 0
    ]
    if not masks:
        return None
    real = masks[0] != 0
    return np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 1), int(real.shape[1])


def length_sorting(data: Mapping[str, np.ndarray] | None, batch: int | None) -> dict[str, Any] | None:
    """Where batches mix lengths: the tokens a padding-trimmed model (dlopt.optimize.trim_padding) computes
    per sample, each batch cut to its longest real length, with the data's order as given and with the
    samples sorted by real length first, against the padded length. None without a mask input, for one
    sample per batch, or when every sample has the same real length (sorting changes nothing)."""
    found = _real_lengths(data)
    if found is None or batch is None or batch < 2:
        return None
    lengths, padded = found
    count = min(len(lengths) // batch, MAX_DATA_BATCHES) * batch
    if count == 0 or len(set(lengths[:count].tolist())) < 2:
        return None

    def tokens(order: np.ndarray) -> float:
        groups = order[:count].reshape(-1, batch)
        return float(np.mean(lengths[groups].max(axis=1)))  # per sample: its batch's longest real length

    return {
        "padded_length": padded,
        "mean_real_length": float(np.mean(lengths[:count])),
        "tokens_as_given": tokens(np.arange(count)),
        "tokens_sorted": tokens(np.argsort(lengths[:count], kind="stable")),
    }


def sorted_by_length(data: Mapping[str, np.ndarray], batch: int) -> Mapping[str, np.ndarray]:
    """`data` with the samples that data_batches cuts into batches of `batch` reordered by real length
    (stable; the rest after them as given): what a server that sorts its queue by length would batch.
    Only for data length_sorting describes."""
    found = _real_lengths(data)
    if found is None:
        raise ValueError("sorted_by_length needs data with a [samples, T] mask input")
    lengths = found[0]
    count = min(len(lengths) // batch, MAX_DATA_BATCHES) * batch
    order = np.concatenate([np.argsort(lengths[:count], kind="stable"), np.arange(count, len(lengths))])
    from dlopt.data import SampleArrays

    arrays = SampleArrays.from_mapping(data)
    return arrays.with_arrays(
        {k: v if arrays.axes.get(k) is None else np.take(v, order, axis=arrays.axes[k]) for k, v in arrays.items()}
    )


def padding_note(padding: float | None) -> str:
    return f", {100 * padding:.0f} % of tokens padding" if padding else ""
