"""Statistics for latency samples: summaries, warm-up detection, and bootstrap confidence intervals.

Every random draw takes an explicit seed, so a report can be recomputed bit for bit from its samples.

Why medians and a paired bootstrap: latency distributions on shared machines are skewed with long
right tails (preemption, frequency changes), so the median is the robust centre and the mean is
reported beside it. When several models are measured interleaved (A B A B …), sample i of A and
sample i of B come from the same moment of the machine's life; resampling whole rounds (pairs)
keeps that pairing, so slow phases of the machine move both numerator and denominator together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 2000


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Order statistics and moments of one sample (same unit as the input)."""

    n: int
    median: float
    p90: float
    p99: float
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for a single value
    min: float
    max: float

    def as_dict(self, scale: float = 1.0) -> dict[str, float | int]:
        return {
            "n": self.n,
            "median": self.median * scale,
            "p90": self.p90 * scale,
            "p99": self.p99 * scale,
            "mean": self.mean * scale,
            "std": self.std * scale,
            "min": self.min * scale,
            "max": self.max * scale,
        }


@dataclass(frozen=True, kw_only=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n: int  # samples (or rounds, for paired estimates) it rests on
    method: str

    @property
    def relative_width(self) -> float:
        """(high - low) / estimate: the CI width as a fraction of the estimate."""
        return (self.high - self.low) / abs(self.estimate) if self.estimate else float("inf")

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "n": self.n,
            "method": self.method,
            "relative_width": self.relative_width,
        }


def _as_samples(samples: Sequence[float] | np.ndarray, what: str = "samples") -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{what}: no samples")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: samples contain NaN or infinity")
    return x


def summarize(samples: Sequence[float] | np.ndarray) -> Summary:
    """Median, p90, p99 (linear interpolation between order statistics, numpy's default), mean, std, min, max."""
    x = _as_samples(samples)
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return Summary(
        n=int(x.size),
        median=float(p50),
        p90=float(p90),
        p99=float(p99),
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        min=float(x.min()),
        max=float(x.max()),
    )


def has_settled(samples: Sequence[float] | np.ndarray, *, window: int = 5, tolerance: float = 0.05) -> bool:
    """True when latency has stopped falling: the median of the last `window` samples is no more than
    `tolerance` (relative) below the median of the `window` before them.

    One-sided on purpose: first-run costs (allocation, caches, lazy kernels, autotuning) only ever
    make early runs slower, so warm-up is over once runs stop getting faster. A two-sided test
    would also wait for the noise of a busy machine to calm down, which may never happen."""
    x = np.asarray(samples, dtype=np.float64)
    if window < 1:
        raise ValueError("window must be at least 1")
    if x.size < 2 * window:
        return False
    last = float(np.median(x[-window:]))
    before = float(np.median(x[-2 * window : -window]))
    return last >= before * (1.0 - tolerance)


def _bootstrap_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)


def _percentile_interval(estimate: float, replicates: np.ndarray, confidence: float, n: int, method: str) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Interval(
        estimate=float(estimate), low=float(low), high=float(high), confidence=confidence, n=n, method=method
    )


def _check(confidence: float, n_boot: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100, got {n_boot}")


def bootstrap_ci(
    samples: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[..., np.ndarray] = np.median,
    confidence: float = 0.95,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap CI of `statistic` (a numpy reducer taking `axis=`) of one sample."""
    _check(confidence, n_boot)
    x = _as_samples(samples)
    rng = np.random.default_rng(seed)
    replicates = statistic(x[_bootstrap_indices(rng, x.size, n_boot)], axis=1)
    return _percentile_interval(
        float(statistic(x)),
        replicates,
        confidence,
        x.size,
        f"percentile bootstrap of the {getattr(statistic, '__name__', 'statistic')}",
    )


def resampled_sums(
    rows: Sequence[Sequence[float]] | np.ndarray, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> np.ndarray:
    """[n_boot, k]: the column sums of `rows` ([n, k]: one row of additive counts per sample, e.g. a
    detector's FP32 boxes, candidate boxes and matched boxes on one image) over n_boot bootstrap resamples
    of the samples (drawn with replacement). A metric that is a function of such sums (a ratio of them:
    Jaccard, agreement shares) gets its bootstrap replicates by applying the function to each row: the
    resampling unit is the sample (an image, a sentence), the unit new data arrives in."""
    _check(0.5, n_boot)
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"rows: expected [samples, counts] with at least one sample, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    # per resample, how often each sample was drawn: the same draws as indexing, without n_boot x n x k
    draws = _bootstrap_indices(rng, x.shape[0], n_boot)
    weights = np.zeros((n_boot, x.shape[0]))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    return weights @ x


RATIO_METHODS = ("round-median", "round-geomean", "median-ratio")


def ratio_ci(
    baseline: Sequence[float] | np.ndarray,
    other: Sequence[float] | np.ndarray,
    *,
    method: str = "round-median",
    paired: bool = True,
    confidence: float = 0.95,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Interval:
    """The latency ratio other / baseline (e.g. INT8 / FP32) with a percentile-bootstrap CI.

    Methods (the first two need paired samples: baseline[i] and other[i] from one interleaved round):
    - "round-median" (default): the median over rounds of other[i] / baseline[i]. Each round's two
      runs happened a few milliseconds apart, so a slow phase of the machine slows both and cancels
      in their quotient; on a busy 2-core box this CI was about half as wide as the ratio of medians'
      (per-model spreads 12-16 %, per-round quotient 8.5 %, correlation 0.82). Robust to outliers.
    - "round-geomean": exp(mean(log(other[i] / baseline[i]))). Tighter still, but one outlier round
      moves it: use it with the thread-CPU clock, which does not see preemption.
    - "median-ratio": median(other) / median(baseline); rounds are resampled together when `paired`,
      else the two samples independently (the only choice for samples not taken interleaved).
    """
    _check(confidence, n_boot)
    if method not in RATIO_METHODS:
        raise ValueError(f"unknown ratio method {method!r} (choose {', '.join(RATIO_METHODS)})")
    a = _as_samples(baseline, "baseline")
    b = _as_samples(other, "other")
    if (paired or method != "median-ratio") and a.size != b.size:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    # Resample in chunks so a long run (thousands of rounds) does not allocate n_boot x n at once.
    chunk = max(1, min(n_boot, 20_000_000 // max(a.size, b.size)))
    replicates = np.empty(n_boot)
    if method == "median-ratio":
        if float(np.median(a)) <= 0:
            raise ValueError("baseline median is not positive: a ratio is undefined")
        estimate = float(np.median(b)) / float(np.median(a))
        for start in range(0, n_boot, chunk):
            count = min(chunk, n_boot - start)
            ia = _bootstrap_indices(rng, a.size, count)
            ib = ia if paired else _bootstrap_indices(rng, b.size, count)
            replicates[start : start + count] = np.median(b[ib], axis=1) / np.median(a[ia], axis=1)
        kind = "paired" if paired else "independent"
        name = f"{kind} percentile bootstrap of median(other) / median(baseline)"
    else:
        if np.any(a <= 0) or np.any(b <= 0):
            raise ValueError("per-round ratios need positive latencies")
        log_q = np.log(b) - np.log(a)
        reduce = np.median if method == "round-median" else np.mean
        estimate = float(np.exp(reduce(log_q)))
        for start in range(0, n_boot, chunk):
            count = min(chunk, n_boot - start)
            replicates[start : start + count] = np.exp(reduce(log_q[_bootstrap_indices(rng, a.size, count)], axis=1))
        which = "median" if method == "round-median" else "geometric mean"
        name = f"percentile bootstrap over rounds of the {which} of per-round ratios"
    return _percentile_interval(estimate, replicates, confidence, int(min(a.size, b.size)), name)


__all__ = [
    "DEFAULT_BOOTSTRAP",
    "RATIO_METHODS",
    "Interval",
    "Summary",
    "bootstrap_ci",
    "has_settled",
    "ratio_ci",
    "resampled_sums",
    "summarize",
]
