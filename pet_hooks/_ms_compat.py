"""The one place pet_hooks touches MindSpore internals.

Graph mode caches a compiled graph per cell under a key that includes a global "hook
version" (``mindspore/graph/api.py``); a cell whose structure changes after its first run
keeps the stale graph unless that version moves. Registering a forward hook bumps it, and so
does :func:`force_recompile`, which every structural change in pet_hooks calls::

    cell.__class__ = patched_class
    force_recompile()          # the next call compiles the new structure

``tests/test_ms_compat.py`` fails if MindSpore renames or drops the function.
"""
from __future__ import annotations

from mindspore.common import hook_handle as _hook_handle

__all__ = ["force_recompile", "hook_version"]


def force_recompile() -> None:
    """Make every cell compiled in graph mode recompile on its next call."""
    _hook_handle._update_hook_version()  # pylint: disable=protected-access


def hook_version() -> int:
    """The current global hook version (part of MindSpore's graph cache key)."""
    return _hook_handle._hook_version()  # pylint: disable=protected-access
