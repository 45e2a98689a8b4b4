"""Where `dlopt optimize` runs its work: candidate transforms and accuracy checks fan out over workers,
latency is measured on one machine of the target's class, never while other work shares its cores.

Two kinds of work, two calls:
- `map(fn, items)`: independent, CPU-heavy jobs (quantize a candidate, measure its fidelity). They may
  run at once, in any worker; results come back in the order of `items`.
- `measure(fn, *args, target_class=...)`: a latency measurement. It runs alone on one worker of the
  target's class (the local executor: in this process, after every `map` has finished), so the
  interleaved FP32-vs-candidate timings of one call all come from the same cores.

`fn` must be a module-level function and its arguments and result picklable (they cross processes).
Artifacts are exchanged as paths under the stage cache folder (`cache_dir`, by default
dlopt.stagecache.default_cache_dir()) or as bare cache keys; a job that makes an artifact commits it
as an entry of that folder, which it finds in the paths it was given. The process pool shares the
folder; the Ray executor ships entries to and from nodes that do not see it, rebases the paths in
items and results, and sets $DLOPT_CACHE_DIR for the job (dlopt.ray_executor).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from dlopt.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

EXECUTOR_KINDS = ("local", "ray")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn(item) for every item, possibly at once; results in the order of `items`."""

    def measure(self, fn: Callable[..., R], *args: Any, target_class: str) -> R:
        """fn(*args) alone on one worker of `target_class` (timings must not share cores with other work)."""

    def describe(self) -> dict[str, Any]:
        """What ran the work, for reports: kind, workers, address, nodes."""

    def close(self) -> None: ...


class LocalExecutor:
    """A pool of worker processes on this machine (spawned, not forked: forking a process that has
    started ONNX Runtime or torch thread pools can deadlock the child)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
                initargs=(os.getpid(),),
            )
        return list(self._pool.map(fn, items))

    def measure(self, fn: Callable[..., R], *args: Any, target_class: str) -> R:
        # `map` returns only when all its jobs are done, so nothing else runs on this machine's workers now.
        return fn(*args)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "workers": self.workers, "address": None, "nodes": 1}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the process that started it dies, however it dies.

    A pool's workers wait on their task queue and never notice a parent killed by SIGKILL (or the OOM
    killer): they, and through their copies of its pipe the multiprocessing resource tracker, lived on
    for 15+ minutes holding the caller's stderr open. Linux: the kernel sends SIGKILL to this process
    when its parent exits (PR_SET_PDEATHSIG, via ctypes: the standard library has no binding). A parent
    already gone before the call is caught by comparing getppid() with the pid it was started from.
    Elsewhere (macOS, Windows) workers still end with the pool's shutdown on a normal exit."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (a static or exotic libc): nothing more to do here
            return
    if os.getppid() != parent_pid:
        os._exit(1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def make_executor(
    kind: str = "local",
    *,
    address: str | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Executor:
    """The executor `--executor KIND [--address ADDR] [--workers N]` asks for; `cache_dir` is the stage
    cache folder the jobs' artifacts live in (the Ray executor moves entries between it and its nodes)."""
    if workers is not None:
        from dlopt.limits import check_number

        check_number(
            workers, "{workers=N}", minimum=1, integer=True, hint="give 1 or more, or leave it out for one per core"
        )
    if kind == "local":
        if address:
            raise InputError("--address is for --executor ray", "drop --address, or add --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        from dlopt.ray_executor import RayExecutor  # Ray is an optional extra: imported only when asked for

        return RayExecutor(address=address, workers=workers, cache_dir=cache_dir)
    raise InputError(f"unknown executor {kind!r}", f"choose one of: {', '.join(EXECUTOR_KINDS)}")
