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
