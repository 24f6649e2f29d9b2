"""Every ``Model.train`` call, through one wrap that all who need the calls share.

The progress line of ``pet-hooks run`` adds a callback to each call; run checkpoints add theirs and,
when resuming, change where a call starts (``pet_hooks.doors.resume``). Each registers a handler::

    def handler(model, bound, proceed):      # bound: Model.train's arguments, may be changed
        bound.arguments["callbacks"] = ...   # then
        return proceed()                     # the next handler, and last Model.train itself

    remove = add_handler(handler)            # Model.train wrapped while any handler is registered
    ...
    remove()

Handlers run in the order they were added. One ``wrapt`` patch (``utils.patching``) is installed with
the first handler and taken off with the last, whatever order they are removed in, so that two
parties never wrap ``Model.train`` twice.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional

from ..utils.patching import PatchSet

__all__ = ["add_handler", "callbacks_of"]

_HANDLERS: List[Callable] = []
_PATCHES = PatchSet()
_SIGNATURE: Optional[inspect.Signature] = None


def callbacks_of(bound: inspect.BoundArguments) -> list:
    """The call's callbacks as a list (None, one callback, or a list/tuple of them)."""
    given = bound.arguments.get("callbacks")
    return [] if given is None else (list(given) if isinstance(given, (list, tuple)) else [given])


def _train(wrapped, instance, args, kwargs):
    bound = _SIGNATURE.bind(instance, *args, **kwargs)
    handlers = list(_HANDLERS)

    def proceed(index: int = 0):
        if index == len(handlers):
            return wrapped(*bound.args[1:], **bound.kwargs)
        return handlers[index](instance, bound, lambda: proceed(index + 1))

    return proceed()


def add_handler(handler: Callable) -> Callable[[], None]:
    """Register ``handler`` for every ``Model.train`` call from now on; returns what removes it (twice is harmless)."""
    global _SIGNATURE  # pylint: disable=global-statement
    from mindspore.train import Model

    if not _HANDLERS:
        _SIGNATURE = inspect.signature(Model.train)
        _PATCHES.wrap(Model, "train", _train)
    _HANDLERS.append(handler)

    def remove() -> None:
        if handler in _HANDLERS:
            _HANDLERS.remove(handler)
            if not _HANDLERS:
                _PATCHES.undo()

    return remove
