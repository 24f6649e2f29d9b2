"""The one place pet_hooks touches MindSpore internals, and the version check run at ``apply``.

Graph mode caches a compiled graph per cell under a key that includes a global "hook
version" (``mindspore/graph/api.py``); a cell whose structure changes after its first run
keeps the stale graph unless that version moves. Registering a forward hook bumps it, and so
does :func:`force_recompile`, which every structural change in pet_hooks calls::

    cell.__class__ = patched_class
    force_recompile()          # the next call compiles the new structure

Everything pet_hooks relies on inside MindSpore and MindFormers (this function, the copied
``construct`` bodies, private attributes) is listed in ``pet_hooks/utils/internals.py`` with the
version it was checked against; ``tests/test_ms_compat.py`` checks each entry.
:func:`warn_unchecked_versions` (called by ``surgery.apply``) warns once per process and
package when the installed version is not the checked one.

Warning, not refusal: most releases leave these internals alone, and refusing would block
every upgrade (even a patch release) until pet_hooks is re-released. The warning names the
package, both versions and, when the source can be read, which copied computations really
changed. Whoever wants refusal turns the warning into an error::

    warnings.simplefilter("error", pet_hooks.utils.ms_compat.UncheckedVersionWarning)
"""
from __future__ import annotations

import warnings
from typing import Optional, Set

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import hook_handle as _hook_handle
from mindspore.graph.api import _cell_graph_executor  # pylint: disable=no-name-in-module

from . import internals as _internals

__all__ = ["force_recompile", "hook_version", "write_values", "release_compiled_graphs", "UncheckedVersionWarning", "warn_unchecked_versions",
           "unchecked_version"]


def write_values(param: Parameter, values) -> None:
    """Write ``values`` (an array or Tensor of ``param``'s shape) into ``param`` in place.

    ``Parameter.set_data`` gives the Parameter a new tensor: a cell picks that up on its next
    call, but a function graph compiled before (``mindspore.value_and_grad`` of a function in
    graph mode) keeps reading the old one. ``ops.assign`` writes into the same memory, which
    every compiled graph reads, so switching (the LoRA scale), merging and hot-swapping values
    need no recompile (``tests/test_no_recompile.py`` guards this).
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


def force_recompile() -> None:
    """Make every cell compiled in graph mode recompile on its next call."""
    _hook_handle._update_hook_version()  # pylint: disable=protected-access


def hook_version() -> int:
    """The current global hook version (part of MindSpore's graph cache key)."""
    return _hook_handle._hook_version()  # pylint: disable=protected-access


class UncheckedVersionWarning(UserWarning):
    """The installed MindSpore or MindFormers is not the version pet_hooks' copies were checked against."""


# Packages already looked at in this process: the check (and its warning) happens once each.
_LOOKED_AT: Set[str] = set()


def unchecked_version(package: str) -> Optional[str]:
    """Why ``package`` as installed is not what pet_hooks was checked against; None when it is (or not imported)."""
    installed = _internals.installed_version(package)
    if installed is None:
        return None  # not imported: nothing of it can be in use
    stale = [e for e in _internals.checked_versions().get(package, []) if e.checked != installed]
    if not stale:
        return None
    checked = ", ".join(sorted({e.checked for e in stale}))
    drift = _internals.source_drift(package)
    if drift:
        detail = "these copied or relied-on sources differ from the checked ones: " + "; ".join(
            f"{entry.target} (used in {', '.join(entry.sites)})" for entry, _ in drift)
    else:
        detail = "its copied and relied-on sources still read the same, but were not tested with this version"
    return (f"pet_hooks was checked against {package} {checked}, but {package} {installed} is installed; "
            f"{detail}. tests/test_ms_compat.py shows what changed (pet_hooks/utils/internals.py lists each "
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
