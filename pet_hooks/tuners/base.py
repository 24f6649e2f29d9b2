"""The tuner contract: what every PET method provides, and all that the rest of pet_hooks may ask of it.

A method is one module under ``tuners/`` with a :class:`Tuner` subclass, tied to its config class by
one line (``register_method(IA3Config, "pet_hooks.tuners.ia3:IA3Tuner")``, ``config/methods.py``)::

    class IA3Tuner(Tuner):
        pet_types = ("ia3",)
        def can_adapt(self, cell): ...          # None, or why this cell cannot be adapted
        def select_targets(self, net, cfg): ... # validate and choose cells; changes nothing
        def inject(self, targets, cfg): ...     # all or nothing; returns one Injection per cell
        def eject(self, injection): ...            # the exact mirror of inject for one cell
        def deltas_of(self, injection): ...        # the new Parameters of that cell
        def set_active(self, injections, active): ...

``surgery`` (apply / remove / merge / disable), ``flow`` (the optimizer), ``grad_guard``,
``inspection`` and the file formats (``adapter_io``, ``peft_format``, ``mindformers_io``) talk
to tuners through this class only; how a format spells the method is the layout object it carries
(``peft``, ``mindformers``: ``tuners/file_layouts.py``). What a method does not have keeps the
default here: no switch parameters, no merge (``can_merge = False``), no PEFT or MindFormers layout.

Switching a net's adapters on or off (``disable_adapters``, merge/unmerge) is one call with
all of its injections, so a value shared by many cells (LoRA's scale) is written once. A method
whose switch only writes values sets ``switch_is_data = True``; otherwise surgery makes graph
mode recompile after the switch.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common import dtype as mstype

from ..utils.ms_compat import write_values
from ..config.pet_config import PetConfig
from ..errors import PetStateError
from .file_layouts import MindFormersLayout, PeftLayout

__all__ = ["Tuner", "Injection", "Targets"]

Targets = List[Tuple[str, nn.Cell]]


@dataclass
class Injection:
    """What was done to one cell, so that it can be undone exactly."""

    path: str
    cell: nn.Cell
    original_class: type
    added: Tuple[str, ...]
    params: List[Parameter] = field(default_factory=list)
    #: the adapters whose values the cell's deltas hold now, in order (several only for LoRA: ``multi.slots``)
    occupants: List[str] = field(default_factory=list)


def _channels(cell: nn.Cell, attr: str) -> Optional[int]:
    value = getattr(cell, attr, None)
    return int(value) if isinstance(value, int) else None


class Tuner(abc.ABC):
    """One PET method. Instances are stateless: everything about a net lives in its injections."""

    #: the method's name in messages ("LoRA")
    label: ClassVar[str] = ""
    #: the ``pet_type`` values (config classes) this tuner serves
    pet_types: ClassVar[Tuple[str, ...]] = ()
    #: True when ``set_active`` only writes parameter values: graph mode need not recompile
    switch_is_data: ClassVar[bool] = False
    #: True when ``merge`` can fold the deltas into the base weights (and ``weight_deltas`` says how)
    can_merge: ClassVar[bool] = False
    #: the method in Hugging Face PEFT's adapter files (``tuners/file_layouts.py``), None when PEFT lacks it
    peft: ClassVar[Optional[PeftLayout]] = None
    #: the method's delta names in MindFormers' checkpoints, None when MindFormers has none
    mindformers: ClassVar[Optional[MindFormersLayout]] = None

    # -- choose, inject, undo ----------------------------------------------------------------
    @abc.abstractmethod
    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        """None when this method can adapt ``cell``, else the reason it cannot."""

    @abc.abstractmethod
    def select_targets(self, net: nn.Cell, cfg: PetConfig) -> Targets:
        """The ``[(path, cell)]`` the config selects, in net order; raises before anything changes."""

    @abc.abstractmethod
    def inject(self, targets: Targets, cfg: PetConfig) -> List[Injection]:
        """Adapt every target; all or nothing (on error what was done is undone)."""

    @abc.abstractmethod
    def eject(self, injection: Injection) -> None:
        """The exact mirror of ``inject`` for one cell."""

    @abc.abstractmethod
    def deltas_of(self, injection: Injection) -> List[Parameter]:
        """The delta Parameters of one adapted cell (shared ones are the same objects in every injection)."""

    # -- switches ----------------------------------------------------------------------------
    @abc.abstractmethod
    def set_active(self, injections: Sequence[Injection], active: bool) -> None:
        """Turn the adapters of these injections (one net's) on or off, each switch written once."""

    def switch_parameters(self, injections: Sequence[Injection]) -> List[Parameter]:
        """Parameters that are switches, not weights: never trained, counted, merged into or saved."""
        return []

    def frozen_parameters(self, injections: Sequence[Injection]) -> List[Parameter]:
        """Deltas (in ``deltas_of``) that belong to the adapter and are saved with it but never train (VeRA's
        shared random projections): ``apply`` freezes them as it freezes switches."""
        return []

    # -- what the rest of pet_hooks reads ------------------------------------------------------
    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """The deltas whose change shows that the cell's branch received a gradient (grad_guard)."""
        return self.deltas_of(injection)

    def io_channels(self, injection: Injection) -> Tuple[Optional[int], Optional[int]]:
        """(in, out) sizes of the adapted computation, None where unknown (for ``pet-hooks inspect``)."""
        return _channels(injection.cell, "in_channels"), _channels(injection.cell, "out_channels")

    def group_anchor(self, injection: Injection) -> Optional[Parameter]:
        """The base parameter whose optimizer group this cell's deltas join (its layer's weight)."""
        weight = getattr(injection.cell, "weight", None)
        return weight if isinstance(weight, Parameter) else None

    def base_weight(self, cell: nn.Cell) -> Optional[Parameter]:
        """The base weight of ``cell`` the method adds to (to check a file's copy of it against), None if unknown."""
        weight = getattr(cell, "weight", None)
        return weight if isinstance(weight, Parameter) else None

    # -- merging -----------------------------------------------------------------------------
    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        """``[(base weight, float32 change)]`` that merging this cell adds, in the weight's layout."""
        return []

    def merge_weights(self, injection: Injection) -> List[Parameter]:
        """The base weights merging this cell writes (``weight_deltas``' weights, without computing the deltas)."""
        return [weight for weight, _ in self.weight_deltas(injection)]

    def merge_reason(self, injection: Injection) -> Optional[str]:
        """Why this cell's deltas cannot be merged (asked of every cell before any is), None when they can."""
        return None

    def weight_readers(self, net: nn.Cell, injection: Injection) -> List[str]:
        """Paths of cells that compute with a weight of ``weight_deltas(injection)`` without holding it (an mcore
        output layer given the tied embedding at call time); merging would change them too. The weight's
        other holders (tied Parameters) are found by ``surgery`` itself."""
        return []

    def merge(self, injection: Injection, sign: int) -> None:
        """Fold (+1) or unfold (-1) the cell's deltas into its base weights, computed in float32."""
        if not self.can_merge:
            raise PetStateError(f"{type(self).__name__} has no weights to merge")
        for weight, delta in self.weight_deltas(injection):
            merged = weight.astype(mstype.float32).asnumpy() + sign * delta
            write_values(weight, Tensor(merged, mstype.float32))
