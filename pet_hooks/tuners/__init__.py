"""The PET methods, one module each, found by ``pet_type``.

A tuner module provides ``select_targets(net, cfg)`` (validate and choose cells, changing
nothing), ``inject(targets, cfg)`` (all or nothing), ``eject(record)``, ``set_active(record, on)``,
``deltas_of(record)`` and, where the method can fold into the base, ``merge_weight(record, sign)``.
"""
from __future__ import annotations

from types import ModuleType

from . import lora, prefix

__all__ = ["get_tuner", "SUPPORTED"]

_TUNERS = {"lora": lora, "ptuning2": prefix, "prefixtuning": prefix}
SUPPORTED = tuple(_TUNERS)


def get_tuner(pet_type: str) -> ModuleType:
    """The tuner module for ``pet_type``; ValueError naming it when there is none."""
    if pet_type in _TUNERS:
        return _TUNERS[pet_type]
    raise ValueError(f"unknown pet_type {pet_type!r}; supported: {list(SUPPORTED)}")
