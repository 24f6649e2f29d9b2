"""The PET methods, one module each, found by ``pet_type``: the tuner registry.

Each method is a :class:`~pet_hooks.tuners.base.Tuner` (the contract: select, inject, eject,
deltas, switches, merging, file layouts) in its own module, registered by one line below.
The rest of pet_hooks asks this registry for a tuner and talks to the contract only::

    tuner = get_tuner(cfg.pet_type)
    records = tuner.inject(tuner.select_targets(net, cfg), cfg)
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..errors import PetConfigError
from .bottleneck import AdapterTuner, LowRankAdapterTuner
from .base import Injection, Tuner
from .bitfit import BitFitTuner
from .ia3 import IA3Tuner
from .lora.tuner import LoraTuner
from .prefix.tuner import PrefixTuner

__all__ = ["Tuner", "Injection", "get_tuner", "register_tuner", "all_tuners", "peft_tuner"]

_TUNERS: Dict[str, Tuner] = {}


def register_tuner(tuner: Tuner) -> None:
    """Make ``tuner`` serve every ``pet_type`` it names."""
    if not isinstance(tuner, Tuner):
        raise TypeError(f"register_tuner: {tuner!r} is not a pet_hooks.tuners.Tuner")
    for pet_type in tuner.pet_types:
        _TUNERS[pet_type] = tuner


# One line per method.
register_tuner(LoraTuner())
register_tuner(PrefixTuner())
register_tuner(IA3Tuner())
register_tuner(BitFitTuner())
register_tuner(AdapterTuner())
register_tuner(LowRankAdapterTuner())


def get_tuner(pet_type: str) -> Tuner:
    """The tuner for ``pet_type``; PetConfigError naming it when there is none."""
    if pet_type in _TUNERS:
        return _TUNERS[pet_type]
    raise PetConfigError(f"unknown pet_type {pet_type!r}; supported: {list(_TUNERS)}")


def all_tuners() -> List[Tuner]:
    """Every registered tuner once, in registration order."""
    return list({id(t): t for t in _TUNERS.values()}.values())


def peft_tuner(peft_type: object) -> Optional[Tuner]:
    """The tuner that reads and writes Hugging Face PEFT's ``peft_type``, if any."""
    return next((t for t in all_tuners() if t.peft_type is not None and t.peft_type == peft_type), None)
