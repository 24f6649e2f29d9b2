"""The one registry of PET methods: ``pet_type`` -> its config class and its tuner.

A method is known to pet_hooks by one call, :func:`register_method`, which ties the dataclass that
reads its ``pet_config`` block to the :class:`~pet_hooks.tuners.Tuner` that applies it. The methods
pet_hooks ships are registered at the end of ``config/pet_config.py``, one line each, naming the
tuner by its import path (``"pet_hooks.tuners.ia3:IA3Tuner"``): reading a config never imports the
tuners, and this layer never imports a layer above it. ``pet_hooks.tuners.get_tuner`` imports the
tuner at first use. A user's own method passes the tuner itself::

    pet_hooks.register_method(MyConfig, MyTuner())

This module holds records only; it checks what it can without the tuner layer (the config class and
the spelling of the path), and ``get_tuner`` checks the tuner when it builds it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..errors import PetConfigError

__all__ = ["Method", "register_method", "unregister_method", "method", "registered", "config_types"]


@dataclass
class Method:
    """One registered method. ``tuner`` is the tuner object, or ``"module:Class"`` until first use."""

    pet_type: str
    config_class: type
    tuner: Any


_METHODS: Dict[str, Method] = {}


def register_method(config_class: type, tuner: Any) -> None:
    """Make ``config_class.PET_TYPE`` a ``pet_type`` pet_hooks knows, applied by ``tuner`` (a Tuner, or
    ``"package.module:TunerClass"`` imported at first use). Registering a ``pet_type`` again replaces it."""
    pet_type = getattr(config_class, "PET_TYPE", None)
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)) or not isinstance(pet_type, str):
        raise TypeError(f"register_method: {config_class!r} is not a config dataclass with a PET_TYPE "
                        f"(a subclass of pet_hooks.PetConfig)")
    if isinstance(tuner, str) and (tuner.count(":") != 1 or not all(tuner.split(":"))):
        raise TypeError(f"register_method: tuner path {tuner!r} is not 'package.module:TunerClass'")
    _METHODS[pet_type.lower()] = Method(pet_type.lower(), config_class, tuner)


def unregister_method(pet_type: str) -> None:
    """Forget a method registered by :func:`register_method` (the built-in ones included)."""
    if _METHODS.pop(str(pet_type).lower(), None) is None:
        raise PetConfigError(f"unregister_method: unknown pet_type {pet_type!r}; registered: {config_types()}")


def method(pet_type: object) -> Method:
    """The record of ``pet_type`` (any case); PetConfigError naming it and the known ones when there is none."""
    found = _METHODS.get(pet_type.lower()) if isinstance(pet_type, str) else None
    if found is None:
        raise PetConfigError(f"unknown pet_type {pet_type!r}; expected one of {list(config_types())}")
    return found


def registered() -> Tuple[str, ...]:
    """The ``pet_type`` values in the order they were registered (the built-in ones first)."""
    return tuple(_METHODS)


def config_types() -> Tuple[str, ...]:
    """The ``pet_type`` values pet_hooks knows, sorted."""
    return tuple(sorted(_METHODS))
