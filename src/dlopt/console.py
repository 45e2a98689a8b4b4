"""Console helpers the CLI shares: a progress bar on stderr and plain-text tables. No library code
prints; these are for the command line (and for scripts that want the same look)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from dlopt.tables import format_table

ProgressFn = Callable[[str, float], None]
LogFn = Callable[[str], None]

# Where stderr is not a terminal (CI logs, `2> log`, a pipe), long verbs print at least one line this often,
# so that a quiet minute of calibration or a search candidate does not read as a hang.
HEARTBEAT_INTERVAL_S = 10.0


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr; yields the (description, fraction) callback the harness takes.
    Off where stderr is not a terminal (CI logs), so logs get no control characters."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda description, fraction: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=1.0)
        yield lambda description, fraction: progress.update(task, description=description, completed=fraction)


@dataclass
class _BeatState:
    """When the last line was written (on the heartbeat's clock), and the last step a line named."""

    last_line: float
    step: str = "starting"


@contextlib.contextmanager
def heartbeat(
    verb: str,
    log: LogFn,
    *,
    interval_s: float | None = None,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[LogFn]:
    """Yields a log function that forwards each message to `log` and remembers it as the running step.
    Where `stream` (default: stderr) is not a terminal, a thread writes, through `log`, a line such as
    `dlopt quantize: still running, 40 s elapsed; last step: calibrating (minmax)` whenever `interval_s`
    (default HEARTBEAT_INTERVAL_S) has passed without a line. On a terminal the progress bars show that
    work goes on, and nothing is added."""
    interval = HEARTBEAT_INTERVAL_S if interval_s is None else interval_s
    target = stream if stream is not None else sys.stderr
    started = clock()
    lock = threading.Lock()
    state = _BeatState(last_line=started)

    def forward(message: str) -> None:
        with lock:
            log(message)
            state.last_line = clock()
            text = " ".join(str(message).split())
            if text:
                state.step = text if len(text) <= 120 else text[:117] + "..."

    is_terminal = getattr(target, "isatty", lambda: False)()
    if is_terminal or interval <= 0:
        yield forward
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.0, state.last_line + interval - clock())):
            with lock:
                now = clock()
                if now - state.last_line >= interval and not stop.is_set():
                    log(f"dlopt {verb}: still running, {now - started:.0f} s elapsed; last step: {state.step}")
                    state.last_line = now

    thread = threading.Thread(target=beat, name=f"dlopt-{verb}-heartbeat", daemon=True)
    thread.start()
    try:
        yield forward
    finally:
        stop.set()
        thread.join(timeout=1.0)


__all__ = ["HEARTBEAT_INTERVAL_S", "LogFn", "ProgressFn", "format_table", "heartbeat", "progress_bar"]
