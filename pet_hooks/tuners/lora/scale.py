"""The switch of every LoRA branch: ``pet_lora_scale``, one value per rank row.

Every LoRA cell (linear, attention, experts, embedding) multiplies its A, or what it gathered
from A, by a non-trainable Parameter ``<cell path>.pet_lora_scale`` of shape ``[r, 1]`` that holds
each rank row's ``scaling`` while the branch is on and 0 while it is off (disabled, merged)::

    add_scale(path, cell, cfg)                    # cell.pet_lora_scale, cell.lora_scaling, ...
    a = scaled_a(cell)                            # A * scale, in A's dtype
    a2 = times_scale(cell.lora_A_w2, cell.pet_lora_scale)     # any A of the cell (grouped experts' second)

A finite A times 0 adds exactly nothing, so switching is a value written, never a recompile.
One value per row, not one per cell, because several adapters of different scalings can share
the cell's A and B (``multi/slots.py``). Every branch that reads A reads it through these two
functions (the linear layers, the mcore projections, the attention cell's effective weights, the
grouped experts, DoRA), so the formula is written once; this module sits below them all.
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, nn, ops

__all__ = ["SCALE_NAME", "scaled_a", "scaled_bias", "times_scale", "add_scale"]

SCALE_NAME = "pet_lora_scale"   # the switch: a parameter, not a weight (not counted, never saved)


def times_scale(a, scale):
    """``a * scale`` in ``a``'s dtype: an A of the cell (``[r, in]``, or ``[E, r, in]``) times the switch ``[r, 1]``."""
    return a * ops.cast(scale, ops.dtype(a))


def scaled_a(cell):
    """``A * scale`` in A's dtype (see the module docstring)."""
    return times_scale(cell.lora_A, cell.pet_lora_scale)


def scaled_bias(cell, dtype):
    """``lora_B_bias * scale`` in ``dtype`` (``lora_bias``): the first row's scale, the cell's one scaling while on,
    0 while off, so the bias switches with the branch (the adapter of a cell with a bias is its only one)."""
    bias = cell.lora_B_bias
    return ops.cast(bias * ops.cast(cell.pet_lora_scale[0], ops.dtype(bias)), dtype)


def add_scale(path: str, cell: nn.Cell, cfg) -> None:
    """The cell's switch ``pet_lora_scale`` ([r, 1], each row's scaling while on) and the scalings themselves."""
    cell.lora_scaling = cfg.scaling
    cell.pet_lora_rank_scaling = np.full(cfg.lora_rank, cfg.scaling, np.float32)
    cell.pet_lora_scale = Parameter(cell.pet_lora_rank_scaling[:, None].copy(), name=f"{path}.{SCALE_NAME}",
                                    requires_grad=False)
