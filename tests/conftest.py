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
