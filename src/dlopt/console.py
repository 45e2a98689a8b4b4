"""Console helpers the CLI shares: a progress bar on stderr and plain-text tables. No library code
prints; these are for the command line (and for scripts that want the same look)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from dlopt.report import format_table

ProgressFn = Callable[[str, float], None]


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
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting", total=1.0)
        yield lambda description, fraction: progress.update(task, description=description, completed=fraction)


__all__ = ["ProgressFn", "format_table", "progress_bar"]
