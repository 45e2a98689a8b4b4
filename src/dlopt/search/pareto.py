"""The Pareto front of latency x accuracy drop x size, and the choice of one point within a budget.

All three objectives are minimized: latency (the interleaved ratio to the FP32 source, or ms), the
accuracy drop in the metric's own unit, and the size in bytes. A point dominates another when it is no worse in every
objective and better in at least one; identical points do not dominate each other, so both stay on
the front (the choice then breaks the tie).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Latencies within this share of the fastest are a tie, broken by size: two sessions of the same file
# measure about 1 % apart in the interleaved harness (dlopt.bench), so a smaller gap is not a result.
LATENCY_TIE = 0.01


@dataclass(frozen=True)
class Point:
    name: str
    latency: float
    drop: float
    size: int


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b in every objective and strictly better in one."""
    no_worse = a.latency <= b.latency and a.drop <= b.drop and a.size <= b.size
    better = a.latency < b.latency or a.drop < b.drop or a.size < b.size
    return no_worse and better


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates, in input order (O(n^2): a search has tens of points)."""
    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def dominated_by(point: Point, points: Sequence[Point]) -> Point | None:
    """The first point that dominates `point`, for the report's reason; None on the front."""
    return next((q for q in points if q is not point and dominates(q, point)), None)


def choose(
    points: Sequence[Point], max_drop: float, *, max_latency: float | None = None, tie: float = LATENCY_TIE
) -> Point | None:
    """The best point within the budget: on the front, drop <= max_drop (and latency <= max_latency
    when given); the fastest, latencies within `tie` of it counting as equal and decided by size,
    then by drop, then by name (so the choice is deterministic). None when nothing is within budget."""
    front = pareto_front(points)
    allowed = [p for p in front if p.drop <= max_drop and (max_latency is None or p.latency <= max_latency)]
    if not allowed:
        return None
    fastest = min(p.latency for p in allowed)
    tied = [p for p in allowed if p.latency <= fastest * (1 + tie)]
    return min(tied, key=lambda p: (p.size, p.drop, p.latency, p.name))
