"""The constructor arguments of an optimizer, to rebuild "the same optimizer over the deltas".

MindSpore optimizers do not keep all their constructor arguments as attributes (``nn.Momentum`` needs
``momentum`` back), so ``flow.rebuild_optimizer`` asks :func:`constructor_arguments`, which has two
sources:

- MindSpore's own record: its optimizers' ``__init__`` carry ``opt_init_args_register``, which keeps
  ``init_params``, ``init_learning_rate`` and ``init_args`` on the instance. That needs no patch, so an
  optimizer built before anything of pet_hooks ran is rebuilt from it.
- the recorder, for the others (MindFormers' AdamW, a user's own class): one ``wrapt`` patch of
  ``nn.Optimizer.__new__`` (``nn.Cell.__new__`` sees the subclass's own arguments) in the project's patch
  set. ``import pet_hooks`` does not install it: the doors that rebuild optimizers do (``PetCallback``
  when it is built), from then on::

    install_when_imported()              # patched once mindspore.nn is imported (at once if it is)
    opt = nn.Momentum(params, 0.1, momentum=0.9)
    constructor_arguments(opt)           # ((params, 0.1), {"momentum": 0.9})
    uninstall()                          # nn.Optimizer as it was; install() puts it back

Importing this module imports neither MindSpore nor the rest of pet_hooks.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any, Dict, Optional, Tuple

import wrapt

from ..utils.patching import PatchSet, is_patched

__all__ = ["install", "init_signature", "uninstall", "install_when_imported", "is_installed", "recorded_arguments",
           "constructor_arguments"]

_RECORDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PATCHES = PatchSet()
_WANTED = False        # install_when_imported() was called and uninstall() since then was not
_HOOK_REGISTERED = False


def _record(wrapped, instance, args, kwargs):
    """``nn.Optimizer.__new__(cls, *args, **kwargs)``: build, then remember ``args`` / ``kwargs``."""
    this = wrapped(*args, **kwargs)
    try:
        _RECORDED[this] = (tuple(args[1:]), dict(kwargs))
    except TypeError:  # not weak-referenceable: nothing to record, nothing breaks
        pass
    return this


def _optimizer_class():
    from mindspore import nn
    return nn.Optimizer


def is_installed() -> bool:
    """True while ``nn.Optimizer.__new__`` is the recorder (False when MindSpore is not imported yet)."""
    module = sys.modules.get("mindspore.nn")
    optimizer = getattr(module, "Optimizer", None)
    return optimizer is not None and is_patched(optimizer.__dict__.get("__new__"))


def install() -> None:
    """Record the constructor arguments of every optimizer built from now on (idempotent; imports MindSpore)."""
    global _WANTED  # pylint: disable=global-statement
    _WANTED = True
    optimizer = _optimizer_class()
    if not is_patched(optimizer.__dict__.get("__new__")):
        _PATCHES.wrap(optimizer, "__new__", _record)


def uninstall() -> None:
    """Undo ``install`` (and a pending ``install_when_imported``); optimizers built later are not recorded."""
    global _WANTED  # pylint: disable=global-statement
    _WANTED = False
    _PATCHES.undo()


def _on_nn_imported(_module) -> None:
    if _WANTED:
        install()


def install_when_imported() -> None:
    """``install`` as soon as ``mindspore.nn`` is imported (now, when it already is): what the doors that
    rebuild optimizers do when they are built (``PetCallback``)."""
    global _WANTED, _HOOK_REGISTERED  # pylint: disable=global-statement
    _WANTED = True
    if not _HOOK_REGISTERED:
        _HOOK_REGISTERED = True
        wrapt.register_post_import_hook(_on_nn_imported, "mindspore.nn")
    elif "mindspore.nn" in sys.modules:
        install()


def recorded_arguments(optimizer: Any) -> Optional[Tuple[tuple, Dict[str, Any]]]:
    """``(args, kwargs)`` the optimizer was built with (``args`` without the class), or None if not recorded."""
    try:
        return _RECORDED.get(optimizer)
    except TypeError:
        return None


def init_signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.__init__``, seen through MindSpore's ``opt_init_args_register``
    decorator, which hides it behind ``(self, *args, **kwargs)`` without ``functools.wraps``."""
    init = cls.__init__
    signature = inspect.signature(init)
    kinds = [p.kind for p in signature.parameters.values()][1:]
    if kinds == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        # Breadth-first through nested closures: LazyAdam's __init__ is wrapped twice
        # (deprecated around opt_init_args_register), so the original is two closures deep.
        pending, seen = [init], set()
        while pending:
            func = pending.pop(0)
            for cell in getattr(func, "__closure__", None) or ():
                inner = cell.cell_contents
                if inspect.isfunction(inner) and id(inner) not in seen:
                    if inner.__name__ == "__init__":
                        return inspect.signature(inner)
                    seen.add(id(inner))
                    pending.append(inner)
    return signature


def _mindspore_record(optimizer: Any) -> Optional[Tuple[tuple, Dict[str, Any]]]:
    """``(args, kwargs)`` from MindSpore's own ``opt_init_args_register`` record on ``optimizer``, if it has one.

    The decorator keeps the parameters (``init_params``), the learning rate (``init_learning_rate``; None when
    it was a schedule Cell, which the optimizer keeps as ``learning_rate``) and every other argument with its
    default applied (``init_args``)."""
    init_args = getattr(optimizer, "init_args", None)
    init_params = getattr(optimizer, "init_params", None)
    if not isinstance(init_args, dict) or not isinstance(init_params, dict) or "params" not in init_params:
        return None
    kwargs = dict(init_args)
    # The decorator binds the original signature: a ``**kwargs`` of it is kept as one dict under its name
    # (nn.Adam's 'kwargs': {}), a ``*args`` as a tuple; spread them back as they were passed.
    for param in init_signature(type(optimizer)).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(kwargs.get(param.name), dict):
            kwargs.update(kwargs.pop(param.name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and param.name in kwargs:
            if kwargs.pop(param.name):
                return None     # positional extras cannot be placed by name: not known
    if hasattr(optimizer, "init_learning_rate"):
        rate = optimizer.init_learning_rate
        kwargs["learning_rate"] = optimizer.learning_rate if rate is None else rate
    return (init_params["params"],), kwargs


def constructor_arguments(optimizer: Any) -> Optional[Tuple[tuple, Dict[str, Any]]]:
    """``(args, kwargs)`` to build ``optimizer`` again (without the class): what the recorder saw, else
    MindSpore's own record of its optimizers; None when neither knows them."""
    return recorded_arguments(optimizer) or _mindspore_record(optimizer)
