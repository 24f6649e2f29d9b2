"""Mixed batches: each row of one forward pass through its own LoRA adapter (PEFT's ``adapter_names``).

While a selection is installed every adapted cell holds all adapters that adapt it in its slot
(``lora_slots``: ``lora_A`` [R, in], ``lora_B`` [out, R], R the sum of their ranks) and a mask
``pet_lora_row_scale`` [rows, R]: row b holds the scaling of row b's adapter on that adapter's
rank positions and 0 elsewhere, so::

    branch[b, t] = ((x[b, t] @ A^T) * mask[b]) @ B^T = scaling_b * x[b, t] @ A_b^T @ B_b^T

Another composition of the same number of rows only rewrites the mask (a data change: no
recompile in graph mode). The cells' class gains :class:`LoraRowBranch` for the time of the
selection, whose branch reads the mask instead of the scale; rows are the leading axis of the
cell's input, flattened batch-major, as ``nn.Dense``, MindFormers' legacy ``Linear`` and the embeddings
(their ids, ``[batch, seq]``; the branch masks the looked-up columns of A, ``_embedding_scale``) receive
them. Inference only: no dropout.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from mindspore import Parameter, ops

from ..utils.ms_compat import write_values
from ..tuners.lora.tuner import rows_reason
from . import slots as lora_slots
from ..tuners.common import patched_class, strip_attrs

__all__ = ["LoraRowBranch", "BASE", "unsupported", "install", "write_masks", "uninstall"]

BASE = "__base__"           # a row computed by the base model alone
MASK = "pet_lora_row_scale"
_MATMUL_TB = ops.MatMul(transpose_b=True)


def _masked(h, mask, dtype):
    """``h`` [rows * t, R] times each row's mask [rows, R]."""
    rank = ops.shape(h)[-1]
    rows = ops.shape(mask)[0]
    h = ops.reshape(h, (rows, -1, rank)) * ops.expand_dims(ops.cast(mask, dtype), 1)
    return ops.reshape(h, (-1, rank))


class LoraRowBranch:
    """The branch of :class:`~pet_hooks.tuners.lora.tuner.LoraLayer` with one adapter per row (the mask)."""

    def _lora_branch(self, x2):
        h = ops.cast(x2, self.lora_compute_dtype)
        h = _MATMUL_TB(h, ops.cast(self.lora_A, self.lora_compute_dtype))
        h = _masked(h, self.pet_lora_row_scale, self.lora_compute_dtype)
        return _MATMUL_TB(h, ops.cast(self.lora_B, self.lora_compute_dtype))

    def _sharded_branch(self, x2):
        h = ops.cast(x2, self.lora_compute_dtype)
        h = self.pet_lora_matmul_a(h, ops.cast(self.lora_A, self.lora_compute_dtype))
        h = _masked(h, self.pet_lora_row_scale, self.lora_compute_dtype)
        return self.pet_lora_matmul_b(h, ops.cast(self.lora_B, self.lora_compute_dtype))

    def _embedding_scale(self, h):
        """An embedding's gathered ``h`` [R, rows * t] (``LoraEmbedding``) times each row's mask, transposed."""
        mask = ops.transpose(ops.cast(self.pet_lora_row_scale, ops.dtype(h)), (1, 0))      # [R, rows]
        rank, rows = ops.shape(mask)
        h = ops.reshape(h, (rank, rows, -1)) * ops.expand_dims(mask, 2)
        return ops.reshape(h, (rank, -1))


def unsupported(injection) -> Optional[str]:
    """Why the injection's cell cannot take a row selection (its LoRA kind says); None when it can."""
    return rows_reason(injection)


def _masks(state, injection, names: Sequence[str]) -> np.ndarray:
    """[rows, R] of the injection's slot for the row adapters ``names``."""
    mask = np.zeros((len(names), int(injection.cell.lora_A.shape[-2])), np.float32)
    for row, name in enumerate(names):
        if name in injection.occupants and state.enabled:
            mask[row, lora_slots.rows_of(state, injection, name)] = lora_slots.scaling_of(state, name,
                                                                                          injection.path)
    return mask


def install(state, names: Sequence[str]) -> None:
    """Give every adapted cell the row branch and its mask (the slots already hold every adapter)."""
    for injection in state.cells:
        cell = injection.cell
        setattr(cell, MASK, Parameter(_masks(state, injection, names), name=f"{injection.path}.{MASK}",
                                      requires_grad=False))
        cell.__class__ = patched_class(LoraRowBranch, type(cell))


def write_masks(state, names: Sequence[str]) -> None:
    """Another composition of as many rows: only the masks' values change."""
    for injection in state.cells:
        write_values(getattr(injection.cell, MASK), _masks(state, injection, names))


def uninstall(state) -> None:
    for injection in state.cells:
        cell = injection.cell
        cell.__class__ = _without_rows(type(cell))
        strip_attrs(cell, (MASK,))


def _without_rows(cls: type) -> type:
    """The class a cell had before :func:`install` (the generated one's second base)."""
    bases: List[type] = [b for b in cls.__bases__ if b is not LoraRowBranch]
    return bases[0] if len(bases) == 1 else cls
