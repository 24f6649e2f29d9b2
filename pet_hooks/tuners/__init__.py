"""The PET methods, one module each, found by ``pet_type``: the tuners of the method registry.

Each method is a :class:`~pet_hooks.tuners.base.Tuner` (the contract: select, inject, eject,
deltas, switches, merging; its file layouts in ``file_layouts.py``) in its own module, tied to its
config class by one :func:`~pet_hooks.config.methods.register_method` line (``config/pet_config.py``
for the methods pet_hooks ships). The rest of pet_hooks asks this module for a tuner and talks to the
contract only::

    tuner = get_tuner(cfg.pet_type)
    injections = tuner.inject(tuner.select_targets(net, cfg), cfg)
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

from ..config.methods import method, registered
from .base import Injection, Tuner
from .file_layouts import MindFormersLayout, PeftLayout

__all__ = ["Tuner", "Injection", "PeftLayout", "MindFormersLayout", "get_tuner", "all_tuners", "peft_tuner"]

# A tuner named by its import path is built once and shared by every pet_type that names it.
_BUILT: Dict[str, Tuner] = {}


def _build(path: str) -> Tuner:
    if path not in _BUILT:
        module, name = path.split(":")
        _BUILT[path] = getattr(importlib.import_module(module), name)()
    return _BUILT[path]


def get_tuner(pet_type: str) -> Tuner:
    """The tuner for ``pet_type``; PetConfigError naming it when there is none, TypeError naming the
    registration when what was registered is not a tuner for it."""
    entry = method(pet_type)
    tuner = _build(entry.tuner) if isinstance(entry.tuner, str) else entry.tuner
    if not isinstance(tuner, Tuner) or entry.pet_type not in tuner.pet_types:
        raise TypeError(f"register_method({entry.config_class.__name__}, {entry.tuner!r}): "
                        f"{tuner!r} is not a pet_hooks.tuners.Tuner whose pet_types include {entry.pet_type!r}")
    return tuner


def all_tuners() -> List[Tuner]:
    """Every registered tuner once, in registration order."""
    return list({id(t): t for t in map(get_tuner, registered())}.values())


def peft_tuner(peft_type: object) -> Optional[Tuner]:
    """The tuner that reads and writes Hugging Face PEFT's ``peft_type``, if any."""
    return next((t for t in all_tuners() if t.peft is not None and t.peft.peft_type == peft_type), None)
