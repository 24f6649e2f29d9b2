"""The one place pet_hooks touches MindSpore internals, and the version check run at ``apply``.

Graph mode caches a compiled graph per cell (and per ``mindspore.jit`` function) under a key
that includes a global "hook version" (``mindspore/graph/api.py``); a cell whose structure
changes after its first run keeps the stale graph unless that version moves. Registering a
forward hook bumps it, and so does :func:`force_recompile`, which every structural change in
pet_hooks calls::

    cell.__class__ = patched_class
    force_recompile()          # the next call compiles the new structure

MindSpore 2.10 puts the hook version in the key only when the environment variable
``MS_DEV_JIT_AST_ENABLE_GUARD`` is ``"1"`` (2.9 always does); :func:`force_recompile` sets it.

Everything pet_hooks relies on inside MindSpore and MindFormers (this function, the copied
``construct`` bodies, private attributes) is listed in ``pet_hooks/utils/internals.py`` with the
versions it was checked against; ``tests/project/test_ms_compat.py`` checks each entry.
:func:`warn_unchecked_versions` (called by ``surgery.apply``) warns once per process and
package when the installed version is none of the checked ones (MindSpore 2.9.0 and 2.10.0,
MindFormers 1.9.0).

Warning, not refusal: most releases leave these internals alone, and refusing would block
every upgrade (even a patch release) until pet_hooks is re-released. The warning names the
package, both versions and, when the source can be read, which copied computations really
changed. Whoever wants refusal turns the warning into an error::

    warnings.simplefilter("error", pet_hooks.utils.ms_compat.UncheckedVersionWarning)
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Set

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import hook_handle as _hook_handle
from mindspore.graph.api import _cell_graph_executor  # pylint: disable=no-name-in-module

from . import internals as _internals

__all__ = ["force_recompile", "HOOK_VERSION_IN_KEY", "hook_version", "write_values", "release_compiled_graphs", "UncheckedVersionWarning", "warn_unchecked_versions",
           "unchecked_version", "set_compile_cache_entry"]


def write_values(param: Parameter, values) -> None:
    """Write ``values`` (an array or Tensor of ``param``'s shape) into ``param`` in place.

    ``Parameter.set_data`` gives the Parameter a new tensor: a cell picks that up on its next
    call, but a function graph compiled before (``mindspore.value_and_grad`` of a function in
    graph mode) keeps reading the old one. ``ops.assign`` writes into the same memory, which
    every compiled graph reads, so switching (the LoRA scale), merging and hot-swapping values
    need no recompile (``tests/surgery/test_no_recompile.py`` guards this).
    """
    tensor = values if isinstance(values, Tensor) else Tensor(np.asarray(values))
    if tensor.dtype != param.dtype:
        tensor = tensor.astype(param.dtype)
    ops.assign(param, tensor)


def release_compiled_graphs(net: nn.Cell) -> int:
    """Free the graph-mode graphs compiled for ``net`` and its sub-cells; returns how many phases.

    A structural change makes them stale for good (their cache key holds the old hook version),
    yet MindSpore keeps them: about 8 of the 13 MB a recompile of a small Llama adds. This is
    what ``Cell.__del__`` does for a cell that goes away (``del_net_res`` on its ``compile_cache``),
    done for the cells of ``net`` only, so other nets keep their graphs. The next call compiles
    again, as it would after ``force_recompile`` anyway. What MindSpore's compiler keeps beyond
    that (about 5.5 MB per compile, also for a new net) no API frees: see BENCHMARKS.md.
    """
    released = 0
    for _, cell in net.cells_and_names():
        phases = cell.compile_cache
        if phases:
            _cell_graph_executor.del_net_res(cell, set(phases))
            released += len(phases)
            phases.clear()
    return released


# MindSpore 2.10 reads this on every graph-mode compile (of a cell or of a mindspore.jit function) and
# puts the hook version in the compiled-graph key only when it is "1"; 2.9 always puts it there and
# never reads the variable. Nothing else in either version reads it (internals: graph_key_of_a_cell,
# graph_key_of_a_function), so setting it gives 2.10 exactly 2.9's key.
HOOK_VERSION_IN_KEY = "MS_DEV_JIT_AST_ENABLE_GUARD"


def force_recompile() -> None:
    """Make every cell and ``mindspore.jit`` function compiled in graph mode recompile on its next call.

    Set first, the variable also invalidates the graphs compiled before it was set (their keys lack
    the version), so a train step compiled around the net before ``apply`` recompiles too.
    """
    os.environ[HOOK_VERSION_IN_KEY] = "1"
    _hook_handle._update_hook_version()  # pylint: disable=protected-access


def set_compile_cache_entry(script: str) -> None:
    """Make MindSpore's compile cache judge the graphs by ``script`` and the files it imports.

    The cache keeps, beside each compiled graph, a hash of the entry script and of every non-installed
    file it imports, found from ``mindspore.graph.api.entry_script_path`` (``sys.argv[0]`` when MindSpore
    was imported). Under ``pet-hooks run`` that is the launcher (``python -m pet_hooks``, whose relative
    import the scan cannot even resolve), so it is pointed at the user's script, and the script's folder
    is taken out of the paths the scan treats as installed, as MindSpore does for its own entry script.
    """
    from mindspore.graph import api  # internals: compile_cache_entry_script
    path = os.path.realpath(script)
    api.entry_script_path = path
    folder = os.path.dirname(path)
    while folder in api.sys_path:
        api.sys_path.remove(folder)


def hook_version() -> int:
    """The current global hook version (part of MindSpore's graph cache key)."""
    return _hook_handle._hook_version()  # pylint: disable=protected-access


class UncheckedVersionWarning(UserWarning):
    """The installed MindSpore or MindFormers is not the version pet_hooks' copies were checked against."""


# Packages already looked at in this process: the check (and its warning) happens once each.
_LOOKED_AT: Set[str] = set()


def unchecked_version(package: str) -> Optional[str]:
    """Why ``package`` as installed is not what pet_hooks was checked against; None when it is (or not imported).

    Checked means: every entry of ``package`` in the registry lists the installed version.
    """
    installed = _internals.installed_version(package)
    if installed is None:
        return None  # not imported: nothing of it can be in use
    stale = [e for e in _internals.checked_versions().get(package, []) if installed not in e.checked]
    if not stale:
        return None
    checked = ", ".join(sorted({v for e in stale for v in e.checked}, key=_internals.version_key))
    drift = _internals.source_drift(package)
    if drift:
        detail = "these copied or relied-on sources differ from the checked ones: " + "; ".join(
            f"{entry.target} (used in {', '.join(entry.sites)})" for entry, _ in drift)
    else:
        detail = ("its copied and relied-on sources still read as in a checked version, but were not tested "
                  "with this version")
    return (f"pet_hooks was checked against {package} {checked}, but {package} {installed} is installed; "
            f"{detail}. tests/project/test_ms_compat.py shows what changed (pet_hooks/utils/internals.py lists each "
            f"internal relied on).")


def warn_unchecked_versions() -> None:
    """Warn once per process and package when the installed version is not the checked one.

    A package is looked at the first time this runs after it was imported (MindFormers is
    often imported after the first ``apply``), and never again.
    """
    for package in _internals.checked_versions():
        if package in _LOOKED_AT or _internals.installed_version(package) is None:
            continue
        _LOOKED_AT.add(package)
        message = unchecked_version(package)
        if message is not None:
            warnings.warn(message, UncheckedVersionWarning, stacklevel=3)  # points at the caller of apply
