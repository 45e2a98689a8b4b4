"""dlopt.ray_executor on a local two-node Ray cluster (this host, one CPU per node, 2 CPUs in all).

The head node sees the driver's stage cache folder; the other node declares `dlopt-target-cpu` and sets
its own DLOPT_CACHE_DIR, so it stands for a remote machine: entries reach it and come back as bytes.
The cluster starts once for the module and is shut down after it, with no Ray process left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'dlopt[ray]') is not installed")

from dlopt.errors import InputError, MissingDependencyError, TargetUnavailableError  # noqa: E402
from dlopt.executor import LocalExecutor, make_executor  # noqa: E402
from dlopt.ray_executor import RayExecutor  # noqa: E402
from dlopt.stagecache import StageCache, cache_key  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = "dlopt-target-cpu"


# -- jobs (module-level: Ray workers import this module by name; the cluster's PYTHONPATH has tests/) --


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def slow_square(item: tuple[int, float]) -> int:
    value, delay = item
    time.sleep(delay)
    return value * value


def fail(item: tuple[str, str]) -> None:
    kind, message = item
    if kind == "input":
        raise InputError(message, "fix {calibration=DATA}")
    if kind == "dependency":
        raise MissingDependencyError(message, "pip install 'dlopt[models]'")
    raise ValueError(message)


def timed(seconds: float) -> tuple[str, float, float]:
    start = time.time()
    time.sleep(seconds)
    return node_id(), start, time.time()


def commit_payload(cache: StageCache, payload: bytes):
    key = cache_key({"payload": payload.hex()})
    with cache.building(key) as staging:
        (staging / "model.onnx").write_bytes(payload)
        return cache.commit(key, staging, {"kind": "test", "artifact": "model.onnx"})


def make_entry(item: tuple[str, bytes, float]) -> tuple[str, Path, bytes]:
    """Commit an entry holding `payload` in the cache folder the item names; its model's path, and the
    task's cache folder (as bytes: the executor rebases str and Path results onto the driver's folder)."""
    root, payload, delay = item
    time.sleep(delay)  # long enough that the two jobs of a map run at once, one on each node
    entry = commit_payload(StageCache(root), payload)
    return node_id(), entry.path / "model.onnx", os.environ["DLOPT_CACHE_DIR"].encode()


def model_of(key: str) -> Path:
    """The model of entry `key` in the task's cache (a cache hit: nothing is made)."""
    return StageCache(os.environ["DLOPT_CACHE_DIR"]).get(key).path / "model.onnx"


def read_artifact(path: Path) -> tuple[str, bytes, Path]:
    return node_id(), Path(path).read_bytes(), path


def deterministic(seed: int) -> tuple[int, float, str]:
    x = np.random.default_rng(seed).standard_normal(4096)
    return seed, float(np.sort(x)[::7].sum()), hashlib.sha256(np.cumsum(x).tobytes()).hexdigest()


# -- fixtures ----------------------------------------------------------------------------------------


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _gone(text: str, timeout: float = 15.0) -> list[int]:
    deadline = time.time() + timeout
    while (left := _processes_mentioning(text)) and time.time() < deadline:
        time.sleep(0.2)
    return left


@dataclass(frozen=True)
class LocalCluster:
    nodes: Any  # ray.cluster_utils.Cluster
    worker_cache: Path  # the DLOPT_CACHE_DIR of the labelled ("remote") node


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    worker_cache = tmp_path_factory.mktemp("worker-node-cache")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)}
    common = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "env_vars": env}
    nodes = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False})
    nodes.add_node(**{**common, "env_vars": {**env, "DLOPT_CACHE_DIR": str(worker_cache)}},
                   resources={TARGET: 1})
    nodes.wait_for_nodes()
    session = nodes.head_node.get_session_dir_path()
    try:
        yield LocalCluster(nodes, worker_cache)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()
        left = _gone(session)
        assert not left, f"Ray processes of {session} still running after shutdown: {left}"


@pytest.fixture(scope="module")
def ex(cluster, tmp_path_factory):
    executor = make_executor("ray", address=cluster.nodes.address, cache_dir=tmp_path_factory.mktemp("driver-cache"))
    try:
        yield executor
    finally:
        executor.close()


def _labelled_node() -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(TARGET))


# -- tests -------------------------------------------------------------------------------------------


def test_without_ray_installed_the_ray_executor_is_a_missing_dependency(monkeypatch, tmp_path):
    # first in the file: no cluster is running yet whose threads could import ray meanwhile
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs Ray.*pip install 'dlopt\[ray\]'") as raised:
        make_executor("ray", cache_dir=tmp_path)
    assert raised.value.exit_code == 2


def test_describe_reports_the_cluster(ex, cluster):
    info = ex.describe()
    assert (info["kind"], info["nodes"], info["cpus"], info["address"]) == ("ray", 2, 2, cluster.nodes.address)
    assert sorted(n["targets"] for n in info["node_list"]) == [[], ["cpu"]]


def test_map_returns_results_in_item_order(ex):
    # the first items sleep longest, so they finish last
    items = [(value, 0.4 - 0.1 * value) for value in range(4)]
    assert ex.map(slow_square, items) == [0, 1, 4, 9]
    assert ex.map(slow_square, []) == []


@pytest.mark.parametrize("kind, error", [("input", InputError), ("dependency", MissingDependencyError),
                                         ("other", ValueError)])
def test_an_error_in_a_task_is_raised_again_as_itself(ex, kind, error):
    with pytest.raises(error) as raised:
        ex.map(fail, [(kind, f"{kind} job 1 is bad"), (kind, "job 2 too")])
    assert type(raised.value) is error
    assert raised.value.args[0] == f"{kind} job 1 is bad"  # the first failing item, in item order
    if kind == "input":
        assert raised.value.hint == "fix {calibration=DATA}" and raised.value.exit_code == 2
        assert str(raised.value) == "input job 1 is bad (fix calibration=DATA)"
    assert "Traceback" in str(raised.value.__cause__) and "def fail" not in str(raised.value)


def test_measure_runs_alone_on_the_labelled_node(ex):
    labelled = _labelled_node()
    spans: list[tuple[str, float, float]] = []
    mapper = threading.Thread(target=lambda: spans.extend(ex.map(timed, [0.8] * 4)))
    mapper.start()
    time.sleep(0.3)  # the map's first tasks are running on both nodes
    node, start, end = ex.measure(timed, 0.4, target_class="cpu")
    mapper.join()
    assert node == labelled
    beside = [(s, e) for n, s, e in spans if n == labelled]
    assert beside, "no map task ran on the labelled node: the test would prove nothing"
    overlapping = [(s, e) for s, e in beside if s < end and e > start]
    assert not overlapping, f"measure [{start:.2f}, {end:.2f}] overlapped map tasks {overlapping}"


def test_measure_without_a_node_of_the_class_says_which_resource_to_declare(ex):
    with pytest.raises(TargetUnavailableError,
                       match=r"""ray start --resources '\{"dlopt-target-cuda": 1\}'""") as raised:
        ex.measure(timed, 0.0, target_class="cuda")
    assert raised.value.exit_code == 2 and "'dlopt-target-cuda'" in str(raised.value)


def test_entries_made_on_both_kinds_of_node_reach_the_drivers_cache(ex, cluster):
    worker_cache = cluster.worker_cache
    driver_root = ex.cache.root
    payloads = [b"made-on-one-node", b"made-on-the-other"]
    results = ex.map(make_entry, [(str(driver_root), p, 1.0) for p in payloads])
    assert len({node for node, _, _ in results}) == 2, "the two jobs did not run on two nodes"
    labelled = _labelled_node()
    for (node, path, task_cache), payload in zip(results, payloads):
        key = cache_key({"payload": payload.hex()})
        assert path == driver_root / key / "model.onnx"  # rebased onto the driver's folder
        assert path.read_bytes() == payload
        entry = ex.cache.get(key)
        assert entry is not None and entry.info["kind"] == "test" and entry.bytes == len(payload)
        if node == labelled:  # the "remote" node worked in its own folder; the entry came back as bytes
            assert task_cache == str(worker_cache).encode()
            assert (worker_cache / key / "model.onnx").read_bytes() == payload
        else:  # the head node shares the host: it wrote the driver's folder directly
            assert task_cache == str(driver_root).encode()
            assert not (worker_cache / key).exists()


def test_an_entry_the_driver_has_is_shipped_to_a_remote_node(ex, cluster):
    worker_cache = cluster.worker_cache
    payload = b"only-the-driver-has-this"
    key = commit_payload(ex.cache, payload).key
    assert not (worker_cache / key).exists()
    node, data, path = ex.measure(read_artifact, ex.cache.root / key / "model.onnx", target_class="cpu")
    assert node == _labelled_node() and data == payload
    assert path == ex.cache.root / key / "model.onnx"
    assert (worker_cache / key / "model.onnx").read_bytes() == payload


def test_an_entry_only_a_remote_node_has_is_fetched_when_a_result_names_it(ex, cluster):
    # made on that node by an earlier run, and since pruned from the driver's cache (or never in it)
    payload = b"only-the-remote-node-has-this"
    key = commit_payload(StageCache(cluster.worker_cache), payload).key
    assert ex.cache.get(key) is None
    path = ex.measure(model_of, key, target_class="cpu")
    assert path == ex.cache.root / key / "model.onnx" and path.read_bytes() == payload
    assert ex.cache.get(key).info["kind"] == "test"


def test_local_and_ray_executors_give_identical_results(ex):
    seeds = list(range(6))
    with LocalExecutor(workers=2) as local:
        expected = local.map(deterministic, seeds)
    assert ex.map(deterministic, seeds) == expected
    assert [seed for seed, _, _ in expected] == seeds


def test_an_executor_joining_this_drivers_connection_leaves_it_open(ex, tmp_path):
    with RayExecutor(cache_dir=tmp_path) as joined:
        assert joined.map(slow_square, [(3, 0.0)]) == [9]
    assert ray.is_initialized()
    assert ex.map(slow_square, [(2, 0.0)]) == [4]


def test_without_an_address_it_starts_a_local_head_and_close_stops_it(tmp_path):
    code = """
import json, sys, ray
from dlopt.ray_executor import RayExecutor
ex = RayExecutor(workers=2, cache_dir=sys.argv[1])
info, squares = ex.describe(), ex.map(abs, [-3, 4, -5])
info["resources"] = ray.cluster_resources()
session = ray._private.worker._global_node.get_session_dir_path()
ex.close()
print(json.dumps({"info": info, "out": squares, "session": session, "connected": ray.is_initialized()}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["out"] == [3, 4, 5] and report["connected"] is False
    assert (report["info"]["nodes"], report["info"]["cpus"], report["info"]["workers"]) == (1, 2, 2)
    # the head it starts is a node of this host's target class, so `measure` (latency) can run on it
    assert report["info"]["resources"].get("dlopt-target-cpu") == 1
    assert not _gone(report["session"]), "the head RayExecutor started is still running after close()"


@pytest.mark.parametrize("address, message", [
    ("nowhere", r"Ray address 'nowhere' is not HOST:PORT or ray://HOST:PORT"),
    ("127.0.0.1:{port}", r"cannot reach the Ray cluster at 127.0.0.1:\d+: .*--address ADDR"),
    ("ray://127.0.0.1:{port}", r"cannot reach the Ray cluster at ray://127.0.0.1:\d+"),
])
def test_an_address_nothing_listens_on_is_an_input_error(address, message, tmp_path):
    port = _free_port()  # nothing listens there
    with pytest.raises(InputError) as raised:
        RayExecutor(address=address.format(port=port), cache_dir=tmp_path)
    assert re.search(message, raised.value.cli_text()) and raised.value.exit_code == 2


def test_paths_in_items_are_rebased_and_their_entries_found_through_containers():
    from dataclasses import dataclass
    from typing import NamedTuple

    from dlopt.ray_executor import _entry_keys, _rebase

    @dataclass(frozen=True)
    class Job:
        cache_root: str
        models: tuple
        note: str = "fp32"

    class Pair(NamedTuple):
        path: Path
        weight: int

    driver, worker = Path("/driver/cache"), Path("/node/cache")
    a, b = "a" * 64, "b" * 64
    job = [Job(str(driver), (driver / a / "model.onnx", Pair(driver / b / "model.onnx", 3))), {"key": b},
           "/elsewhere/data.npz"]
    moved = _rebase(job, driver, worker)
    assert moved == [Job(str(worker), (worker / a / "model.onnx", Pair(worker / b / "model.onnx", 3))),
                     {"key": b}, "/elsewhere/data.npz"]
    assert isinstance(moved[0].models[1], Pair) and isinstance(moved[0].models[0], Path)
    assert _rebase(moved, worker, driver) == job
    assert _entry_keys(job, str(driver)) == {a, b}
    assert _entry_keys(["/elsewhere/" + a, "not-a-key"], str(driver)) == set()


def test_optimize_on_a_two_node_cluster_scores_like_the_local_executor(ex, cluster, tmp_path):
    """`dlopt optimize --executor ray`: the same candidates, the same held-out drops and sizes as the local
    process pool for every candidate whose graph does not depend on kernel timings, the latency measured
    on the labelled node (whose cache folder is not the driver's: its entries come back as bytes), and a
    verified bundle. Candidates that time kernels (node forms) may differ between any two runs: near the
    threshold the timing noise decides, so they are left out of the comparison."""
    import onnx
    from test_optimize import run_optimize
    from test_quantize_int8 import cnn_model

    from dlopt.search.candidates import base_candidates

    onnx.save(cnn_model(), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", image=rng.standard_normal((24, 3, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", image=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    for name in ("cnn.onnx", "calib.npz", "eval.npz"):
        for run in ("local", "ray"):
            (tmp_path / run / name).write_bytes((tmp_path / name).read_bytes())
    local = run_optimize(tmp_path / "local", "out.bundle")
    on_ray = run_optimize(tmp_path / "ray", "out.bundle", "--executor", "ray", "--address", cluster.nodes.address)
    assert local.exit_code == 0 and on_ray.exit_code == 0, (local.stderr[-800:], on_ray.stderr[-800:])
    a, b = json.loads(local.stdout), json.loads(on_ray.stdout)
    assert b["executor"]["kind"] == "ray" and b["executor"]["nodes"] == 2 and b["verified"] is True
    timed_kernels = {c.name for c in base_candidates(target="cpu", transformer=False) if c.times_kernels}
    assert timed_kernels and "int8-static-minmax-allint8" not in timed_kernels

    def untimed(result):
        # a retry with float nodes ("X+float-nodes") is made from the over-budget candidates nearest the
        # budget, whose ranking timed-kernel candidates' noisy drops can change: only base candidates compare
        return [c for c in result["candidates"] if "+" not in c["name"] and c["name"] not in timed_kernels]

    assert [c["name"] for c in a["candidates"] if "+" not in c["name"]] == \
        [c["name"] for c in b["candidates"] if "+" not in c["name"]]
    for x, y in zip(untimed(a), untimed(b)):
        if x["status"] == "skipped":
            continue
        assert (x["name"], x["drop_points"], x["bytes"]) == (y["name"], y["drop_points"], y["bytes"])
        assert (x["status"] == "over-budget") == (y["status"] == "over-budget")
    assert b["chosen"] in b["front"] and "fp32" in b["front"]
