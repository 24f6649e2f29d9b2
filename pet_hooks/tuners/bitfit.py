"""BitFit: only the bias terms of the matched cells train (Ben Zaken et al., 2021); nothing is added.

A cell is adaptable when it holds its own ``bias`` Parameter (``nn.Dense``, ``nn.Conv2d``,
MindFormers' ``Linear`` ...); ``target_modules`` (a regex over dotted cell paths, or a list
of names, as for the other methods) selects among them, and without it every such cell is
selected. ``LayerNorm``'s shift is called ``beta`` in MindSpore and is not selected (keep it
trainable with ``freeze_exclude`` if wanted)::

    pet_hooks.apply(net, {"pet_type": "bitfit", "target_modules": ".*attention.*|.*mlp.*"})

The "deltas" are the biases themselves: the optimizer gets exactly them, an adapter file holds
them under their own names, and loading writes them back. Undo puts back the values and the
``requires_grad`` flag each bias had before ``apply``, so ``remove`` leaves the identical
original (save the adapter first to keep what was trained). Switching off (``disable_adapters``)
writes the original values in and keeps the trained ones aside, a data switch: no recompile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from mindspore import Parameter, nn

from ..utils.ms_compat import write_values
from ..config.pet_config import BitFitConfig
from ..errors import NoMatchError
from ..matching.cells import is_excluded, named_cells, select_cells
from .base import Injection, Targets, Tuner

__all__ = ["BitFitTuner", "BitFitInjection"]


@dataclass
class BitFitInjection(Injection):
    """One selected cell: its bias's value and flag before ``apply``, and the trained value while switched off."""

    bias_before: Optional[np.ndarray] = None
    requires_grad_before: bool = True
    trained_aside: Optional[np.ndarray] = None


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    if isinstance(getattr(cell, "bias", None), Parameter):
        return None
    return f"BitFit trains a cell's own 'bias' Parameter, and {type(cell).__name__} has none"


def _select_targets(net: nn.Cell, cfg: BitFitConfig) -> Targets:
    if cfg.target_modules is not None:
        return select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=_can_adapt)
    chosen = [(path, cell) for path, cell in named_cells(net)
              if _can_adapt(cell) is None and not is_excluded(path, cfg.exclude_layers)]
    if not chosen:
        raise NoMatchError(f"BitFit found no cell with a 'bias' Parameter in {type(net).__name__}"
                           + (f" outside exclude_layers {cfg.exclude_layers!r}" if cfg.exclude_layers else ""))
    return chosen


def _record(path: str, cell: nn.Cell) -> BitFitInjection:
    bias = cell.bias
    return BitFitInjection(path, cell, type(cell), (), [bias], bias_before=bias.asnumpy().copy(),
                           requires_grad_before=bias.requires_grad)


class BitFitTuner(Tuner):
    """BitFit as a :class:`~pet_hooks.tuners.base.Tuner`: the selected cells' biases are the deltas."""

    label = "BitFit"
    pet_types = ("bitfit",)
    switch_is_data = True      # switching writes bias values only: no recompile

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def select_targets(self, net: nn.Cell, cfg: BitFitConfig) -> Targets:
        return _select_targets(net, cfg)

    def inject(self, targets, cfg: BitFitConfig) -> List[Injection]:
        """Record each bias (value and flag); nothing in the net changes here (surgery unfreezes them)."""
        return [_record(path, cell) for path, cell in targets]

    def eject(self, injection: BitFitInjection) -> None:
        bias = injection.params[0]
        write_values(bias, injection.bias_before)
        bias.requires_grad = injection.requires_grad_before
        injection.trained_aside = None

    def deltas_of(self, injection: Injection) -> List[Parameter]:
        return list(injection.params)

    def group_anchor(self, injection: Injection) -> Optional[Parameter]:
        """The bias itself: it already sits in one of the script's optimizer groups (often the one
        without weight decay), and stays there rather than joining its layer's weight."""
        return injection.params[0]

    def set_active(self, injections, active: bool) -> None:
        """Off: the original biases in, the trained ones aside; on: the trained ones back."""
        for injection in injections:
            bias = injection.params[0]
            if not active and injection.trained_aside is None:
                injection.trained_aside = bias.asnumpy().copy()
                write_values(bias, injection.bias_before)
            elif active and injection.trained_aside is not None:
                write_values(bias, injection.trained_aside)
                injection.trained_aside = None
