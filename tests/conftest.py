"""Shared fixtures: the execution mode (every feature runs in graph and PyNative mode) and tiny nets."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import mindspore as ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ms.set_device("CPU")
MODES = [pytest.param(0, id="graph"), pytest.param(1, id="pynative")]


@pytest.fixture(params=MODES)
def mode(request):
    """Run the test once in graph mode (mode=0) and once in PyNative mode (mode=1)."""
    ms.set_context(mode=request.param)
    yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def snapshot(net) -> dict:
    """name -> copy of every parameter's value (for bit-for-bit comparisons)."""
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def assert_params_equal(before: dict, net, names=None) -> None:
    """Every parameter listed in ``before`` (or ``names``) is bit-for-bit what it was."""
    now = {p.name: p for p in net.get_parameters()}
    for name in names or before:
        assert name in now, f"parameter {name} disappeared"
        np.testing.assert_array_equal(now[name].asnumpy(), before[name], err_msg=name)


# ----------------------------------------------------------------------------- the fast lane
_SLOW_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")


def _slow_entries() -> set:
    with open(_SLOW_LIST, encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Mark as ``slow`` the modules and tests listed in tests/slow_tests.txt (``-m "not slow"`` skips them).

    A test not listed runs in the fast lane; one that grows slow is added to the list.
    """
    slow = _slow_entries()
    for item in items:
        module = os.path.basename(str(item.fspath))
        if module in slow or item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
