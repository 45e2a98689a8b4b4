"""How close a model's outputs are to a reference's: the one implementation of SQNR, cosine, top-1
agreement and the largest difference that quantize, fp16, int4, eval, gate and package report.

The rules, per output:
- a *sample* is one item of the output's first (batch) axis, flattened: an output of shape
  [N, ...] holds N samples, each the vector of its other N-1 axes. A rank-0 or rank-1 output is one
  sample per run. So a detector's [1, 1, H, W] map is one sample per image, and a batch of N images
  run at once gives the same numbers as the N images run one at a time;
- cosine: per sample, the cosine similarity of the output and reference vectors (two zero vectors
  are identical, 1; a zero against a non-zero vector shares no direction, 0); reported as the mean
  and the minimum over samples;
- SQNR: 10·log10(Σ‖reference‖² / Σ‖reference − output‖²) in dB over every sample and element;
  inf when they are equal, -inf when the output has NaN/Inf or the reference is all zeros;
- top-1 agreement: the fraction of samples whose argmax over the flattened sample equals the
  reference's; reported for [N, classes] outputs (classes > 1; not for L2-normalized embeddings);
- max_abs_diff: the largest |output − reference| over every element.
Only floating-point outputs are compared; integer outputs (indices, labels) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dlopt.errors import InputError


def sample_rows(array: np.ndarray) -> np.ndarray:
    """The samples of one output as rows of a 2-D float64 array (the flattening rule above)."""
    a = np.asarray(array, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def _pair(output: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, r = np.asarray(output), np.asarray(reference)
    if y.shape != r.shape:
        raise InputError(
            f"output shape {list(y.shape)} differs from the reference's {list(r.shape)}",
            "compare models with the same outputs",
        )
    return y, r


def cosine_per_sample(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    y, r = _pair(output, reference)
    y, r = sample_rows(y), sample_rows(r)
    ny, nr = np.linalg.norm(y, axis=1), np.linalg.norm(r, axis=1)
    norms = ny * nr
    dots = np.sum(y * r, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where((ny == 0) & (nr == 0), 1.0, 0.0))


def cosine(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean over samples of the cosine similarity (the rule in the module doc)."""
    return float(np.mean(cosine_per_sample(output, reference)))


def sqnr_from_energy(signal: float, noise: float) -> float:
    """10·log10(signal / noise) in dB from summed squares; inf when noise is 0."""
    if noise <= 0:
        return float("inf")
    if signal <= 0 or not np.isfinite(noise):
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def sqnr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖reference‖ / ‖reference − output‖) in dB."""
    y, r = _pair(output, reference)
    y, r = y.astype(np.float64), r.astype(np.float64)
    return sqnr_from_energy(float(np.sum(r * r)), float(np.sum((r - y) ** 2)))


def mse(output: np.ndarray, reference: np.ndarray) -> float:
    y, r = _pair(output, reference)
    return float(np.mean((y.astype(np.float64) - r.astype(np.float64)) ** 2))


def top1_agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose argmax over the flattened sample equals the reference's."""
    y, r = _pair(output, reference)
    return float(np.mean(sample_rows(y).argmax(axis=1) == sample_rows(r).argmax(axis=1)))


def looks_like_classes(reference: np.ndarray) -> bool:
    """[N, classes] scores (classes > 1) that are not L2-normalized embeddings (unit-norm rows with
    negative entries; a confident softmax also has rows of norm ~1, but no negative entries)."""
    r = np.asarray(reference, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        return False
    return not (np.allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-3) and bool((r < 0).any()))


@dataclass(frozen=True)
class OutputFidelity:
    """One output of a model against the reference's, over every sample compared."""

    samples: int
    sqnr_db: float
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    finite: bool  # the output has no NaN/Inf
    top1_agreement: float | None = None  # [N, classes] outputs only

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        if self.top1_agreement is None:
            del body["top1_agreement"]
        return body


class _Accumulator:
    """Sums over samples for one output, so streams of any length cost one sample's memory."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.cosines: list[np.ndarray] = []
        self.agree = self.classified = 0
        self.worst = 0.0
        self.finite = True
        self.class_like = True

    def add(self, output: np.ndarray, reference: np.ndarray) -> None:
        y, r = _pair(output, reference)
        y64, r64 = y.astype(np.float64), r.astype(np.float64)
        finite = bool(np.all(np.isfinite(y64)))
        self.finite &= finite
        self.signal += float(np.sum(r64 * r64))
        self.noise += float(np.sum((r64 - y64) ** 2)) if finite else float("inf")
        if y64.size:
            self.worst = max(self.worst, float(np.max(np.abs(r64 - y64))) if finite else float("inf"))
        self.cosines.append(cosine_per_sample(y64, r64))
        self.class_like &= looks_like_classes(r64)
        if self.class_like:
            self.agree += int(np.sum(sample_rows(y64).argmax(1) == sample_rows(r64).argmax(1)))
            self.classified += r64.shape[0]

    def result(self) -> OutputFidelity:
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        return OutputFidelity(
            samples=int(cos.size),
            sqnr_db=sqnr_from_energy(self.signal, self.noise),
            cosine_mean=float(cos.mean()),
            cosine_min=float(cos.min()),
            max_abs_diff=self.worst,
            finite=self.finite,
            top1_agreement=self.agree / self.classified if self.class_like and self.classified else None,
        )


def compare_runs(
    reference_runs: Sequence[Sequence[np.ndarray]], runs: Sequence[Sequence[np.ndarray]], names: Sequence[str]
) -> dict[str, OutputFidelity]:
    """Per floating-point output: `runs[k][i]` (output i on sample k) against `reference_runs[k][i]`."""
    result = {}
    for i, name in enumerate(names):
        if not reference_runs or not np.issubdtype(np.asarray(reference_runs[0][i]).dtype, np.floating):
            continue
        acc = _Accumulator()
        for ref, got in zip(reference_runs, runs):
            acc.add(got[i], ref[i])
        result[name] = acc.result()
    return result


def compare_sessions(
    reference_session, session, feeds_list: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, OutputFidelity]:
    """Run both sessions on each sample (one at a time) and compare their outputs by name."""
    from dlopt.sessions import feeds_for

    names = [o.name for o in reference_session.get_outputs()]
    accs: dict[str, _Accumulator] = {}
    for sample in feeds_list:
        ref = dict(zip(names, reference_session.run(None, feeds_for(reference_session, sample))))
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds_for(session, sample))))
        for name in names:
            if name in got and np.issubdtype(np.asarray(ref[name]).dtype, np.floating):
                accs.setdefault(name, _Accumulator()).add(got[name], ref[name])
    return {name: acc.result() for name, acc in accs.items()}


def compare_arrays(output: np.ndarray, reference: np.ndarray) -> OutputFidelity:
    """One output array against its reference (first axis = samples)."""
    acc = _Accumulator()
    acc.add(output, reference)
    return acc.result()


def report(fidelity: Mapping[str, OutputFidelity]) -> dict[str, dict[str, Any]]:
    """Plain dicts for a JSON report."""
    return {name: f.to_dict() for name, f in fidelity.items()}


def within_tolerance(
    expected_runs: Sequence[Sequence[np.ndarray]], actual_runs: Sequence[Sequence[np.ndarray]], atol: float, rtol: float
) -> tuple[bool, float]:
    """(every output of every sample within atol + rtol·|expected|, the largest absolute difference);
    integer outputs must be equal, shapes and NaN/Inf positions must match."""
    ok, worst = True, 0.0
    for exp_outs, act_outs in zip(expected_runs, actual_runs):
        for e, a in zip(exp_outs, act_outs):
            if e.shape != a.shape:
                return False, float("inf")
            if not np.issubdtype(e.dtype, np.floating):
                ok &= bool(np.array_equal(e, a))
                continue
            if not np.all(np.isfinite(a) == np.isfinite(e)):
                return False, float("inf")
            diff = np.nan_to_num(np.abs(e.astype(np.float64) - a.astype(np.float64)))
            worst = max(worst, float(diff.max(initial=0.0)))
            ok &= bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(e))))
    return ok, worst


__all__ = [
    "OutputFidelity",
    "compare_arrays",
    "compare_runs",
    "compare_sessions",
    "cosine",
    "cosine_per_sample",
    "looks_like_classes",
    "mse",
    "report",
    "sample_rows",
    "sqnr_db",
    "sqnr_from_energy",
    "top1_agreement",
    "within_tolerance",
]
