"""A set of attribute patches that always undoes itself, exactly.

Each patch is a record ``(owner, attribute, original)``, the original looked up in the
owner's own ``__dict__`` (never with ``getattr``, which would hand back a bound method, or
an inherited attribute that was never the owner's). ``undo`` restores in reverse order: an
attribute the owner had is set back to the identical object, one it only inherited is
deleted again. What pet_hooks installs carries ``_pet_hooks_patched`` so nothing is
wrapped twice. The front doors (``hooks/``), the optimizer recorder (``recorder``), ``progress``
and ``inspection`` all patch through this one mechanism; it imports nothing of pet_hooks::

    patches = PatchSet()
    patches.wrap(nn.Optimizer, "__init__", wrapper)      # a wrapt.FunctionWrapper
    try:
        ...
    finally:
        patches.undo()
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import wrapt

__all__ = ["PatchSet", "MarkedWrapper", "MARK", "is_patched"]

MARK = "_pet_hooks_patched"
_MISSING = object()


class MarkedWrapper(wrapt.FunctionWrapper):
    """A ``wrapt.FunctionWrapper`` that says it is pet_hooks'. The mark is a class attribute:
    setting it on a proxy instance would land on the wrapped original instead."""

    _pet_hooks_patched = True


def is_patched(obj: Any) -> bool:
    """True for anything pet_hooks installed (a marked wrapper or function)."""
    try:
        return bool(getattr(obj, MARK, False))
    except Exception:  # pylint: disable=broad-except
        return False


class PatchSet:
    """Patches applied in order and undone in reverse; ``undo`` twice is harmless."""

    def __init__(self) -> None:
        self._records: List[Tuple[Any, str, Any]] = []

    def set(self, owner: Any, attribute: str, value: Any) -> None:
        """``owner.attribute = value``, remembering what the owner itself held before."""
        original = owner.__dict__.get(attribute, _MISSING)
        if is_patched(original):
            raise RuntimeError(f"{getattr(owner, '__name__', owner)}.{attribute} is already patched by pet_hooks")
        setattr(owner, attribute, value)
        self._records.append((owner, attribute, original))

    def wrap(self, owner: type, attribute: str, wrapper: Callable) -> None:
        """Wrap ``owner.attribute`` (looked up along the MRO) with a marked ``wrapt.FunctionWrapper``."""
        target = None
        for klass in getattr(owner, "__mro__", (owner,)):
            if attribute in vars(klass):
                target = vars(klass)[attribute]
                break
        if target is None:
            raise AttributeError(f"{owner!r} has no attribute {attribute!r} to wrap")
        proxy = MarkedWrapper(target, wrapper)
        self.set(owner, attribute, proxy)

    def undo(self) -> None:
        """Restore every patched attribute, newest first."""
        while self._records:
            owner, attribute, original = self._records.pop()
            if original is _MISSING:
                if attribute in owner.__dict__:
                    delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
