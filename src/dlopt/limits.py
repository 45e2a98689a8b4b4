"""Checks on the numbers users give (options, recipe keys, API arguments), and bounds on the work they ask for.

Every number is checked before any work: NaN and infinity are refused everywhere (a NaN tolerance makes
every comparison false, a NaN duration never ends), and so are values outside the option's range.

Some numbers ask for work in proportion to their size: samples to generate, a batch to allocate, seconds
to measure. Each of those has a limit, checked before anything is allocated or started, so that a typo
(`samples = 1000000000000`, `--measure 1e308`) is one line and exit 2 instead of an OOM kill or a hang. The
limits are far above real use; an environment variable raises one for a run that truly needs more.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from dlopt.errors import InputError


@dataclass(frozen=True)
class Limit:
    env: str  # the environment variable that raises it
    default: float
    unit: str  # what is counted, for messages: "samples", "seconds", "bytes"

    def value(self) -> float:
        """The limit in force: $ENV when set (a positive number), else the default."""
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise InputError(
                f"${self.env}={text!r} is not a positive number", f"unset it, or set e.g. {self.env}={self.default:g}"
            )
        return value

    def check(self, amount: float, what: str) -> None:
        """InputError when `amount` (of `what`, e.g. "package samples") is above the limit."""
        limit = self.value()
        if amount > limit:
            raise InputError(
                f"{what} {_number_text(amount)} is above the limit of {_number_text(limit)} {self.unit}",
                f"give a smaller value, or raise the limit with {self.env}=N if you mean it",
            )


# Generated or read samples of one run (package's verification samples, calibration samples).
MAX_SAMPLES = Limit("DLOPT_MAX_SAMPLES", 100_000, "samples")
# A batch size (bench --batch, gate --batch, package's batch, eval --batch-size).
MAX_BATCH = Limit("DLOPT_MAX_BATCH", 65_536, "samples per batch")
# The bytes of one set of generated inputs (all inputs of one call at their shapes and dtypes).
MAX_INPUT_BYTES = Limit("DLOPT_MAX_INPUT_BYTES", 4 * 2**30, "bytes")
# One measurement (package --measure, recipe measure_s, bench/gate --budget).
MAX_MEASURE_S = Limit("DLOPT_MAX_MEASURE_S", 3600.0, "seconds")
# A whole search (optimize --time-budget).
MAX_TIME_BUDGET_S = Limit("DLOPT_MAX_TIME_BUDGET_S", 7 * 86400.0, "seconds")


def _number_text(value: float) -> str:
    if isinstance(value, int):
        digits = len(str(abs(value)))
        return str(value) if digits <= 15 else f"{float(value):.3g}" if digits < 300 else f"a {digits}-digit number"
    return f"{value:g}"


def check_number(
    value: Any,
    what: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    integer: bool = False,
    hint: str | None = None,
) -> None:
    """InputError unless `value` is a finite number (an int when `integer`) >= minimum (> minimum when
    `above`) and <= maximum. `what` names it for the reader, e.g. "{atol=TOL}" or "measure_s"."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
        raise InputError(f"{what} must be {kind}, not {value!r}", hint or f"give {kind}")
    if not integer and not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, not {value}", hint or "give a finite number")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise InputError(
            f"{what} must be {'>' if above else '>='} {minimum:g}, not {_number_text(value)}",
            hint or f"give a value {'above' if above else 'of at least'} {minimum:g}",
        )
    if maximum is not None and value > maximum:
        raise InputError(
            f"{what} must be <= {maximum:g}, not {_number_text(value)}", hint or f"give a value of at most {maximum:g}"
        )


def check_input_bytes(shapes: dict[str, tuple[int, ...]], itemsizes: dict[str, int], what: str) -> None:
    """Refuse generated inputs of these shapes when they would take more than MAX_INPUT_BYTES, before
    numpy tries to allocate them (a 99999999999x16 shape is a MemoryError, or the OOM killer)."""
    total = sum(math.prod(shape) * itemsizes.get(name, 4) for name, shape in shapes.items())
    limit = MAX_INPUT_BYTES.value()
    if total > limit:
        shown = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())
        raise InputError(
            f"{what} of shape {shown} would take {_bytes_text(total)}, above the limit of {_bytes_text(limit)}",
            f"give smaller shapes, or raise the limit with {MAX_INPUT_BYTES.env}=BYTES if you mean it",
        )


def _bytes_text(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}" if count < 1e15 else f"{count:.3g} bytes"
    return f"{count:.0f} bytes"


__all__ = [
    "Limit",
    "MAX_BATCH",
    "MAX_INPUT_BYTES",
    "MAX_MEASURE_S",
    "MAX_SAMPLES",
    "MAX_TIME_BUDGET_S",
    "check_input_bytes",
    "check_number",
]
