"""Shared fixtures, constants and markers: the execution mode (every feature runs in graph and PyNative
mode), the small sample GPT, the common LoRA config, the MindFormers skip marker, the fast lane.

Test modules import the constants from here (``from tests.conftest import ROOT, SMALL, ...``);
the nets are in ``tests/nets.py``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import mindspore as ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# CI=true: a test that skips for a missing extra (the markers below, importorskip) fails instead
from tests.ci_extras import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401

ms.set_device("CPU")
MODES = [pytest.param(0, id="graph"), pytest.param(1, id="pynative")]

#: keyword arguments of ``samples.tiny_gpt.build`` for a GPT small enough to compile in a moment
SMALL = dict(num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
#: LoRA on the sample GPT's query, value and first MLP layers
GPT_LORA = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3|.*mapping"}
#: a valid LoRA block that the config and bad-input tests vary
SEED_CONFIG = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1,
               "target_modules": ".*dense1|.*dense2|.*dense3"}

HAS_MINDFORMERS = importlib.util.find_spec("mindformers") is not None
NEEDS_MINDFORMERS = pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
HAS_TORCH_PEFT = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
NEEDS_TORCH_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")


@pytest.fixture(params=MODES)
def mode(request):
    """Run the test once in graph mode (mode=0) and once in PyNative mode (mode=1); the mode before comes back."""
    before = ms.get_context("mode")
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=before)


def _in_mcore_graph_mode():
    """Graph mode and MindFormers' ``use_legacy: False`` while the generator is suspended; both restored after."""
    from tests.mcore_cpu import mcore_context, restore_legacy_context
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    mcore_context()
    yield
    restore_legacy_context()
    ms.set_context(mode=before)


@pytest.fixture(scope="module")
def mcore_graph_mode():
    """Graph mode and MindFormers' ``use_legacy: False`` for one module of mcore tests (the mcore
    layers run only in graph mode); both restored after it. ``pytestmark = pytest.mark.usefixtures(...)``."""
    yield from _in_mcore_graph_mode()


@pytest.fixture
def mcore_graph():
    """The same for one test (a module that also runs legacy models)."""
    yield from _in_mcore_graph_mode()


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
