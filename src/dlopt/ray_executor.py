"""`--executor ray [--address ADDR]`: the executor contract (dlopt.executor) on a Ray 2.x cluster.

- `map(fn, items)`: one Ray task per item, each taking one CPU; results come back in the order of `items`.
- `measure(fn, *args, target_class=C)`: one task, on one node that declares the custom resource
  `dlopt-target-C` (`ray start --resources '{"dlopt-target-cpu": 1}'`), holding every CPU of that node
  (see `_measure_options`). All measurements of one executor go to the same node.
- Errors raised in a task re-raise in the driver as the same exception (class, message, hint); the
  worker's traceback is chained as the cause, for `--debug`.

The stage cache is shared between nodes. Items and results carry paths under the driver's cache folder
(`cache_dir`). A worker that sees that folder (the same host, or a shared file system: it finds the
folder's id file with the driver's id) reads and writes it directly. Any other worker, or one whose node
sets its own DLOPT_CACHE_DIR, works in its own cache folder: the entries an item refers to (paths under
the cache folder, or bare keys) that the node lacks are sent as bytes through Ray's object store, the
paths in the item are rebased onto the worker's folder, and the entries the task commits there come back
as bytes with its result and are stored in the driver's cache before `map` returns (the returned paths
are rebased back onto the driver's folder; an entry they name that the driver lacks is fetched from the
node). Inputs outside the cache folder are read at their own paths on every node.

`fn` must be a module-level function of a module the workers can import (Ray pickles it by reference);
its arguments and result must be picklable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import tarfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path, PurePath
from typing import Any, TypeVar

from dlopt.errors import InputError, MissingDependencyError, StageError, TargetUnavailableError
from dlopt.stagecache import ENTRY_NAME, StageCache, default_cache_dir

T = TypeVar("T")
R = TypeVar("R")

TARGET_RESOURCE = "dlopt-target-{}"


def local_target_classes() -> list[str]:
    """The targets this host runs with their own kernels (the CPU; a GPU where its provider works), which a
    head started here declares as `dlopt-target-NAME`. Simulated targets (mobile, xnnpack on a desktop CPU)
    are not declared: timings here would not be theirs."""
    from dlopt.targets import TARGETS, capabilities

    return [
        name
        for name, target in TARGETS.items()
        if (capabilities(name).kernels_measurable_here or capabilities(name).device_type != "cpu")
        and target.is_available()[0]
    ]


CACHE_ID_FILE = ".dlopt-cache-id"
_KEY = re.compile(r"[0-9a-f]{64}")


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(
            "the ray executor needs Ray, which is not installed", "pip install 'dlopt[ray]'"
        ) from e
    return ray


def target_resource(target_class: str) -> str:
    """The Ray custom resource a node declares to take latency measurements for `target_class`."""
    return TARGET_RESOURCE.format(target_class)


class RayExecutor:
    name = "ray"

    def __init__(
        self, address: str | None = None, workers: int | None = None, cache_dir: str | os.PathLike | None = None
    ) -> None:
        ray = _ray()
        self.address = address
        self.workers = workers
        self.cache = StageCache(cache_dir or default_cache_dir())
        self._owns_connection = False  # we connected: close() disconnects (and stops the head if we started it)
        self._measure_nodes: dict[str, str] = {}
        if address and address != "auto":
            _check_reachable(address)
        if ray.is_initialized():
            pass  # this process is already a Ray driver (a notebook, a test): use it, leave it open at close()
        elif address:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise InputError(
                    f"cannot connect to the Ray cluster at {address}: {e}",
                    "start one with `ray start --head`, or fix {address=ADDR} (ray://HOST:10001 or HOST:6379)",
                ) from e
            self._owns_connection = True
        else:
            # a local head, sized to this machine (or to `workers`); address="local" never attaches to a
            # cluster another process left running on this host. On Linux Ray listens on the host's own
            # address even when asked for 127.0.0.1 (services.resolve_ip_for_localhost); its token
            # authentication (on by default in Ray 2.60: RAY_AUTH_MODE) guards it.
            # It is a node of the target classes this host runs natively, so `measure` can time on it.
            ray.init(
                address="local",
                num_cpus=workers or os.cpu_count() or 1,
                include_dashboard=False,
                resources={TARGET_RESOURCE.format(name): 1 for name in local_target_classes()},
                logging_level=logging.WARNING,
            )
            self._owns_connection = True
        self._spec = _CacheSpec(str(self.cache.root.absolute()), _cache_id(self.cache))
        self._task = ray.remote(_run_task)
        self._fetch = ray.remote(_packed_entries)

    # -- the contract ------------------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return self._run(fn, [(item,) for item in items], {"num_cpus": 1})

    def measure(self, fn: Callable[..., R], *args: Any, target_class: str) -> R:
        return self._run(fn, [args], self._measure_options(target_class))[0]

    def describe(self) -> dict[str, Any]:
        ray = _ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
        return {
            "kind": self.name,
            "workers": self.workers or cpus,
            "address": self.address or _gcs_address(),
            "nodes": len(nodes),
            "cpus": cpus,
            "node_list": [
                {
                    "node": n["NodeID"][:12],
                    "host": n["NodeManagerAddress"],
                    "cpus": int(n["Resources"].get("CPU", 0)),
                    "targets": sorted(
                        r[len(TARGET_RESOURCE.format("")) :]
                        for r in n["Resources"]
                        if r.startswith(TARGET_RESOURCE.format(""))
                    ),
                }
                for n in sorted(nodes, key=lambda n: n["NodeID"])
            ],
        }

    def close(self) -> None:
        ray = _ray()
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()  # stops a head this executor started; only disconnects from a cluster it joined
        self._owns_connection = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _measure_options(self, target_class: str) -> dict[str, Any]:
        """Pin the task to one node of the class and take every CPU of that node.

        Every dlopt task asks Ray for CPUs (a map task for one), so a task holding all of a node's CPUs
        starts only when no other dlopt task runs there, and none starts there until it ends: the
        interleaved timings of one measurement never share the node's cores with other dlopt work (from
        this driver or another). The node is chosen once per executor (the first by id), so every
        candidate of a search is timed on the same machine; one task never spans nodes."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = _ray()
        resource = target_resource(target_class)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0) > 0}
        node_id = self._measure_nodes.get(target_class)
        if node_id is None or node_id not in nodes:
            if not nodes:
                raise TargetUnavailableError(
                    f"no node of the Ray cluster declares the resource {resource!r}, so latency for target "
                    f"{target_class!r} has nowhere to be measured",
                    f"start one node of that class with `ray start --resources '{{\"{resource}\": 1}}'`",
                )
            node_id = self._measure_nodes[target_class] = min(nodes)
        cpus = nodes[node_id]["Resources"].get("CPU", 0)
        if cpus < 1:
            raise TargetUnavailableError(
                f"the Ray node {node_id[:12]} declares {resource!r} but no CPUs",
                "start it with --num-cpus set to its cores",
            )
        return {"num_cpus": cpus, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

    def _run(self, fn: Callable[..., R], calls: list[tuple], options: Mapping[str, Any]) -> list[R]:
        ray = _ray()
        task = self._task.options(**options)
        window = self.workers or len(calls)  # at most `workers` tasks in flight
        # The entries each call refers to. Their bytes enter the object store only when a task lands on a
        # node that lacks them (it answers with the keys it needs and is sent again with them), so work on
        # the driver's host or a shared file system copies nothing.
        wanted = [
            {key for key in _entry_keys(args, self._spec.root) if self.cache.get(key) is not None} for args in calls
        ]
        shipped: dict[str, Any] = {}  # key -> ObjectRef of the entry's bytes, put once per call of _run
        refs: list[Any] = []
        outcomes: dict[int, _Outcome] = {}

        def submit(index: int) -> Any:
            entries = {key: shipped.get(key) for key in wanted[index]}
            return task.remote(fn, calls[index], self._spec, entries)

        def settle() -> None:
            for index in self._collect(refs, outcomes):  # sent again, with the entries it asked for
                for key in outcomes.pop(index).needs:
                    if key not in shipped:
                        shipped[key] = ray.put(_pack(self.cache.root / key))
                refs[index] = submit(index)

        try:
            for index in range(len(calls)):
                while len(refs) - len(outcomes) >= window:
                    settle()
                refs.append(submit(index))
            while len(outcomes) < len(refs):
                settle()
        except BaseException:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise
        for index in range(len(refs)):
            failure = outcomes[index].failure
            if failure is not None:
                failure.reraise()
        return [outcomes[index].value for index in range(len(refs))]

    def _collect(self, refs: list[Any], outcomes: dict[int, _Outcome]) -> list[int]:
        """Wait for a running task to end; store the entries it made in the driver's cache. Returns its
        index if it asks for entries (its outcome holds the keys)."""
        ray = _ray()
        index = {r: i for i, r in enumerate(refs)}
        done, _ = ray.wait([r for i, r in enumerate(refs) if i not in outcomes], num_returns=1)
        asking = []
        for ref in done:
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died (out of memory, killed): not fn's error
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise StageError(
                    f"a Ray task failed outside dlopt: {type(e).__name__}: {first}",
                    "see the Ray logs of the node (ray logs, /tmp/ray/session_latest/logs)",
                ) from e
            for key, data in outcome.entries:
                _install(self.cache, key, data)
            if outcome.node is not None:
                self._fetch_missing(outcome)
            outcomes[index[ref]] = outcome
            if outcome.needs:
                asking.append(index[ref])
        return asking

    def _fetch_missing(self, outcome: _Outcome) -> None:
        """Entries a remote task's value names that the driver lacks: the task found them in its node's
        cache (made by an earlier run, since pruned here). Fetched from that node, so the paths hold."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = _ray()
        missing = sorted(k for k in _entry_keys(outcome.value, self._spec.root) if self.cache.get(k) is None)
        if not missing or outcome.node is None:  # a local task's entries are the driver's own
            return
        fetch = self._fetch.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(outcome.node, soft=False)
        )
        for key, data in ray.get(fetch.remote(outcome.root, missing)):
            _install(self.cache, key, data)


# -- the task, on the worker -------------------------------------------------------------------------


@dataclass(frozen=True)
class _CacheSpec:
    root: str  # the driver's cache folder, absolute, as the driver spells it in items
    cache_id: str  # the token in its id file: a worker that reads the same token sees the same folder


class _RemoteTraceback(Exception):
    """The worker's traceback, chained as the cause of an error re-raised in the driver."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class _Failure:
    error: BaseException
    remote_traceback: str

    def reraise(self) -> None:
        raise self.error from _RemoteTraceback(self.remote_traceback)


@dataclass
class _Outcome:
    value: Any
    entries: list[tuple[str, bytes]] = field(default_factory=list)  # entries made on a remote worker
    failure: _Failure | None = None
    needs: list[str] = field(default_factory=list)  # entries a remote worker lacks: send them, run again
    node: str | None = None  # a remote worker's node and cache folder, to fetch entries the value names
    root: str | None = None


def _run_task(fn: Callable[..., Any], args: tuple, spec: _CacheSpec, entries: Mapping[str, Any]) -> _Outcome:
    """fn(*args) on a worker, in the driver's cache folder or (remote) in its own; `entries`: the driver's
    entries the args refer to, each with the ObjectRef of its bytes, or None when not sent yet."""
    root, remote = _task_root(spec)
    driver = Path(spec.root)
    cache = StageCache(root)
    before: dict[str, float] | None = None  # the worker cache's entries before fn (remote only)
    try:
        if remote:
            ray = _ray()
            lacking = [key for key in entries if cache.get(key) is None]
            if any(entries[key] is None for key in lacking):
                return _Outcome(None, needs=[key for key in lacking if entries[key] is None])
            for key in lacking:
                _install(cache, key, ray.get(entries[key]))
            args = _rebase(args, driver, root)
            before = _stamps(cache)
        with _cache_env(root):
            value = fn(*args)
        if not remote or before is None:
            return _Outcome(value)
        node = _ray().get_runtime_context().get_node_id()
        return _Outcome(_rebase(value, root, driver), _made(cache, before), node=node, root=str(root))
    except Exception as e:  # every error crosses back to the driver, where it is raised again
        made = _made(cache, before) if before is not None else []
        return _Outcome(None, made, _Failure(_portable(e), traceback.format_exc()))


def _packed_entries(root: str, keys: Sequence[str]) -> list[tuple[str, bytes]]:
    cache = StageCache(root)
    return [(key, _pack(cache.root / key)) for key in keys if cache.get(key) is not None]


def _task_root(spec: _CacheSpec) -> tuple[Path, bool]:
    """The cache folder this task works in, and whether it is not the driver's (entries travel as bytes)."""
    own = os.environ.get("DLOPT_CACHE_DIR")
    if own and Path(own).expanduser().resolve() != Path(spec.root).resolve():
        return Path(own).expanduser(), True  # this node has its own cache folder
    if _read_id(Path(spec.root)) == spec.cache_id:
        return Path(spec.root), False
    return default_cache_dir(), True


@contextlib.contextmanager
def _cache_env(root: Path) -> Iterator[None]:
    """DLOPT_CACHE_DIR names the task's cache for the duration of fn (a worker process runs one task at a time)."""
    old = os.environ.get("DLOPT_CACHE_DIR")
    os.environ["DLOPT_CACHE_DIR"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DLOPT_CACHE_DIR", None)
        else:
            os.environ["DLOPT_CACHE_DIR"] = old


def _portable(error: Exception) -> Exception:
    """The error itself when it survives pickling (its class, message and hint reach the driver), else a
    StageError that names it."""
    from ray import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(error))
        return error
    except Exception:
        return StageError(f"{type(error).__name__}: {error}")


# -- cache entries as bytes --------------------------------------------------------------------------


def _cache_id(cache: StageCache) -> str:
    """The token in the cache folder's id file, written once (atomically) when the folder has none."""
    existing = _read_id(cache.root)
    if existing:
        return existing
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        staging = cache.root / f"{CACHE_ID_FILE}.{os.getpid()}"
        staging.write_text(token + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(staging, cache.root / CACHE_ID_FILE)  # another process may have won: its token stands
        staging.unlink()
    except OSError as e:
        raise InputError(
            f"cannot write to the cache folder {cache.root}: {e.strerror or e}",
            "pass a writable {cache_dir=DIR} (or set DLOPT_CACHE_DIR)",
        ) from e
    return _read_id(cache.root)


def _read_id(root: Path) -> str:
    try:
        return (root / CACHE_ID_FILE).read_text().strip()
    except OSError:
        return ""


def _stamps(cache: StageCache) -> dict[str, float]:
    return {e.key: e.created for e in cache.entries()}


def _made(cache: StageCache, before: Mapping[str, float]) -> list[tuple[str, bytes]]:
    """The entries committed since `before` (new keys, or keys re-made by a forced run), packed."""
    return [(key, _pack(cache.root / key)) for key, created in _stamps(cache).items() if before.get(key) != created]


def _pack(folder: Path) -> bytes:
    # tar without compression: the payload is mostly ONNX weights, which do not compress well
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def _install(cache: StageCache, key: str, data: bytes) -> None:
    """Store a packed entry under `key`, through the cache's staging folder and rename."""
    import json

    if not _KEY.fullmatch(key):
        raise StageError(f"a Ray task returned a cache entry with a malformed key {key!r}")
    with cache.building(key) as staging, tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            parts = PurePath(member.name).parts
            if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
                raise StageError(f"a Ray task returned cache entry {key[:12]} with an unsafe member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the safe filter, besides the checks above
            tar.extractall(staging, filter="data")
        else:
            tar.extractall(staging)
        info = json.loads((staging / ENTRY_NAME).read_text())
        for stamp in ("key", "created", "created_unix", "bytes"):  # commit writes them anew for this cache
            info.pop(stamp, None)
        (staging / ENTRY_NAME).unlink()
        cache.commit(key, staging, info)


# -- paths and keys inside items and results ---------------------------------------------------------


def _walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with `leaf` applied to every str and path inside lists, tuples, dicts and dataclasses."""
    if isinstance(value, (str, PurePath)):
        return leaf(value)
    if isinstance(value, list):
        return [_walk(v, leaf) for v in value]
    if isinstance(value, tuple):
        items = [_walk(v, leaf) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {_walk(k, leaf): _walk(v, leaf) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _walk(getattr(value, f.name), leaf) for f in fields(value) if f.init}
        return replace(value, **changes)
    return value


def _rebase(value: Any, old: Path, new: Path) -> Any:
    """Every path (or str of one) under `old` moved under `new`, keeping its type."""
    if old == new:
        return value

    def leaf(text: str | PurePath) -> Any:
        try:
            rest = Path(text).relative_to(old)
        except ValueError:
            return text
        moved = new / rest
        return moved if isinstance(text, PurePath) else str(moved)

    return _walk(value, leaf)


def _entry_keys(value: Any, root: str) -> set[str]:
    """The cache keys an item refers to: paths under the cache folder, and bare keys."""
    found: set[str] = set()

    def leaf(text: str | PurePath) -> Any:
        if isinstance(text, str) and _KEY.fullmatch(text):
            found.add(text)
        else:
            try:
                rest = Path(text).relative_to(root).parts
            except ValueError:
                rest = ()
            if rest and _KEY.fullmatch(rest[0]):
                found.add(rest[0])
        return text

    _walk(value, leaf)
    return found


def _check_reachable(address: str) -> None:
    """A clear error now for an address nothing listens on: ray.init itself retries for minutes."""
    import socket

    m = re.fullmatch(r"(?:ray://)?(\[[^\]]+\]|[^:/\s]+):(\d+)/?", address)
    if not m:
        raise InputError(
            f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT",
            "e.g. {address=HEAD:6379} (ray start --head) or {address=ray://HEAD:10001} (Ray Client)",
        )
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise InputError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e}",
            "start its head with `ray start --head`, or fix {address=ADDR}",
        ) from e


def _gcs_address() -> str | None:
    with contextlib.suppress(Exception):
        return _ray().get_runtime_context().gcs_address
    return None
