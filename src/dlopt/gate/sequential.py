"""The sequential latency test: Bonferroni-corrected looks on a geometric schedule, each judging the
ratio CI against 1 + max_slowdown (see dlopt.gate for why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dlopt.stats import Interval


@dataclass(frozen=True, kw_only=True)
class Look:
    seconds: float  # since sampling started
    rounds: int
    interval: Interval
    verdict: str  # "pass", "fail" or "undecided"


@dataclass(frozen=True, kw_only=True)
class LatencyOutcome:
    verdict: str  # "pass", "fail" or "inconclusive"
    limit: float  # the ratio candidate / baseline allowed: 1 + max_slowdown
    interval: Interval | None  # at the deciding (or last) look, at the per-look confidence
    looks: tuple[Look, ...]
    rounds: int
    seconds: float  # sampling time (after warm-up)
    look_confidence: float
    reason: str


def look_schedule(budget_s: float, looks: int, first_fraction: float = 1 / 32) -> tuple[float, ...]:
    """Times (seconds from the start of sampling) of the planned looks: geometric from
    budget * first_fraction up to the budget, so clear cases stop early and close ones get the most
    data. The count is fixed in advance, which the Bonferroni correction needs."""
    if looks == 1:
        return (budget_s,)
    ratio = first_fraction ** (1 / (looks - 1))
    return tuple(budget_s * ratio ** (looks - 1 - k) for k in range(looks))


def look_confidence(confidence: float, looks: int) -> float:
    """The two-sided CI level of each look, so that all looks together keep `confidence`."""
    return 1 - (1 - confidence) / looks


def judge(interval: Interval, limit: float) -> str:
    """pass: even the CI's upper bound is within the limit; fail: even its lower bound is above it."""
    if interval.high <= limit:
        return "pass"
    if interval.low > limit:
        return "fail"
    return "undecided"


def sequential_test(
    add_round: Callable[[], None],
    rounds: Callable[[], int],
    ratio_interval: Callable[[float], Interval],
    *,
    limit: float,
    budget_s: float,
    looks: int = 8,
    confidence: float = 0.95,
    first_look_fraction: float = 1 / 32,
    min_rounds: int = 20,
    now: Callable[[], float] = time.perf_counter,
    progress: Callable[[float, Look | None], None] | None = None,
) -> LatencyOutcome:
    """Add rounds until a look decides or the budget is spent.

    `add_round()` measures one more round; `rounds()` counts them; `ratio_interval(level)` is the CI
    of the ratio at that two-sided level from everything measured so far. `now` is the clock that
    the budget is counted on (injected, so that tests can run on synthetic samples without timing).
    """
    schedule = look_schedule(budget_s, looks, first_look_fraction)
    level = look_confidence(confidence, looks)
    start = now()
    done = 0  # planned looks consumed (a look whose time passed while rounds were too few is merged)
    history: list[Look] = []
    while True:
        add_round()
        elapsed = now() - start
        due = sum(1 for t in schedule if t <= elapsed)
        final = due >= len(schedule)
        if progress is not None:
            progress(min(1.0, elapsed / budget_s), None)
        if due <= done or (rounds() < min_rounds and not final):
            continue
        done = due
        n = rounds()

        def outcome(
            verdict: str, interval: Interval | None, reason: str, n: int = n, elapsed: float = elapsed
        ) -> LatencyOutcome:  # this look's n and elapsed, bound now
            return LatencyOutcome(
                verdict=verdict,
                limit=limit,
                interval=interval,
                looks=tuple(history),
                rounds=n,
                seconds=elapsed,
                look_confidence=level,
                reason=reason,
            )

        if n < 3:  # a bootstrap of 1-2 rounds means nothing
            return outcome(
                "inconclusive",
                None,
                f"only {n} round(s) fit in the {budget_s:.3g} s left for sampling: raise the time budget",
            )
        interval = ratio_interval(level)
        verdict = judge(interval, limit)
        history.append(Look(seconds=elapsed, rounds=n, interval=interval, verdict=verdict))
        if progress is not None:
            progress(min(1.0, elapsed / budget_s), history[-1])
        ci = f"[{interval.low:.3f}, {interval.high:.3f}]"
        if verdict == "pass":
            return outcome("pass", interval, f"ratio CI {ci} lies within {limit:.3f} after {n} rounds")
        if verdict == "fail":
            return outcome("fail", interval, f"ratio CI {ci} lies above {limit:.3f} after {n} rounds")
        if final:
            return outcome(
                "inconclusive",
                interval,
                f"ratio CI {ci} still contains {limit:.3f} after {n} rounds and the {budget_s:.3g} s "
                "left for sampling: the difference is within noise of the threshold (raise the time budget "
                "to resolve it)",
            )
