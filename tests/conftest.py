"""Tests marked `heavy` run only with DLOPT_HEAVY=1 (they load large reference models)."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DLOPT_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set DLOPT_HEAVY=1 to run it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train many times faster on one thread than two on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_decision_cache(tmp_path_factory, monkeypatch):
    """Each test its own stage cache ($DLOPT_CACHE_DIR): quantize caches its timed kernel decisions there,
    and a test's faked timings must never reach another test, or the user's cache."""
    monkeypatch.setenv("DLOPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
