"""DoRA (``use_dora: true``, PEFT's name): weight-decomposed LoRA, a LoRA *variant* (PEFT's ``LoraVariant``).

A trainable magnitude per output row, ``lora_magnitude_vector`` (``<cell path>.lora_magnitude_vector``,
[out], initialised to the row norms of ``W + s B A``, i.e. of W when B starts at zero), and the
direction ``W + s B A`` normalised per output row, exactly as PEFT 0.21 (``peft/tuners/lora/dora.py``)::

    n = || W + s B A ||_row          detached: no gradient flows through the norm (DoRA paper, 4.3)
    f = m / n
    y = W x + (f - 1) * W x' + f * s B A x' + b        x' = dropout(x) (x itself without dropout)
      = f * (W x + s B A x) + b                         without dropout (computed so: fewer passes, and
                                                        71 MB less peak memory on bench.methods' GPT)

The branch reads the scaled A as every LoRA branch does (``scaled_a``: A times the scale switch),
so switching LoRA off (scale 0) also switches DoRA off: ``f`` is taken as 1 while every entry of
the scale is 0, and the output is the base output exactly. Merging writes ``W' = f (W + s B A)``
and keeps ``n`` to unmerge with (``W = W' / f - s B A``), as PEFT caches it.

The variant is one object, :data:`DORA`, that the LoRA flow calls (init, weight deltas, merge,
unmerge) and one forward, :class:`DoraLayer`, put before the kind's mixin: it overrides the mixin's
``_lora_output`` and recombines the pieces of the base computation the mixin defines, so the base
``construct`` is not copied again here. The kinds that list ``"dora"`` in their ``variants`` take it
(``nn.Dense`` and MindFormers' ``Linear``, ``lora/linear.py``); the others (the mcore projections,
``MultiheadAttention``, grouped experts, the embeddings, a cell whose parent reads its weight) are
refused by :meth:`DoraVariant.reason`, naming the cell through the matcher.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ...utils.ms_compat import write_values
from .kind import Drawn, LoraKind, LoraVariant, param_data
from .scale import scaled_a

__all__ = ["DoraLayer", "DoraVariant", "DORA", "MAGNITUDE", "MERGED_NORM"]

MAGNITUDE = "lora_magnitude_vector"     # PEFT's name, the parameter's leaf
MERGED_NORM = "pet_dora_merged_norm"    # the row norms at merge time (numpy), to unmerge with
_MATMUL = ops.MatMul()


def _factor(self, weight_out_in, a, b, dtype):
    """``m / ||W + s B A||_row`` ([out], detached norm), or 1 while the scale switch is all zeros."""
    norm = ops.sqrt(ops.reduce_sum(ops.square(weight_out_in + _MATMUL(b, a)), 1))
    norm = ops.stop_gradient(norm)
    on = ops.cast(ops.reduce_max(ops.abs(ops.cast(self.pet_lora_scale, mstype.float32))) > 0, dtype)
    return 1.0 + on * (ops.cast(self.lora_magnitude_vector, dtype) / norm - 1.0)


class DoraLayer:
    """DoRA's forward: the kind mixin's ``_lora_output`` (``out`` is ``W x`` without the bias) as DoRA."""

    def _lora_output(self, x2, out):
        dtype = self.lora_compute_dtype
        h = ops.cast(x2, dtype)
        a = ops.cast(scaled_a(self), dtype)
        b = ops.cast(self.lora_B, dtype)
        factor = _factor(self, self._weight_rows(dtype), a, b, dtype)
        if self.lora_dropout is not None and self.training:  # PEFT: the base term on the dropped input too
            h = self.lora_dropout(h)
            lora = self._lora_product(h, a, b)
            out = out + self._to_base_dtype((factor - 1.0) * self._base_product(h, dtype) + factor * lora, out)
        else:                                                # the same, in fewer passes: f (W x + s B A x)
            lora = self._lora_product(h, a, b)
            out = self._to_base_dtype((ops.cast(out, dtype) + lora) * factor, out)
        return self._base_bias(out)


def _row_norms(w: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(w, dtype=np.float32), axis=1, dtype=np.float32)).astype(np.float32)


def _delta(cell: nn.Cell) -> np.ndarray:
    """``s B A`` ([out, in], float32) at the adapter's scaling."""
    a = cell.lora_A.astype(mstype.float32).asnumpy()
    b = cell.lora_B.astype(mstype.float32).asnumpy()
    return cell.lora_scaling * (b @ a)


def _merged(kind: LoraKind, cell: nn.Cell) -> Tuple[np.ndarray, np.ndarray]:
    """(f (W + s B A) in [out, in], the norms n) for the cell's current (unmerged) weight."""
    w = kind.weight_out_in(cell) + _delta(cell)
    norm = _row_norms(w)
    factor = cell.lora_magnitude_vector.astype(mstype.float32).asnumpy() / norm
    return factor[:, None] * w, norm


class DoraVariant(LoraVariant):
    """DoRA (see the module docstring): the magnitude at init, the multiplicative merge, its forward."""

    name = "dora"
    label = "DoRA (use_dora: true)"
    attrs = (MAGNITUDE, MERGED_NORM)
    layer = DoraLayer
    prefix = "Dora"

    def applies(self, cfg) -> bool:
        return bool(getattr(cfg, "use_dora", False))

    def reason(self, kind: LoraKind):
        if self.name in kind.variants:
            return None
        return ("DoRA (use_dora: true) is not supported on this cell type; it is supported on mindspore.nn.Dense "
                "and mindformers.modules.layers.Linear")

    def init(self, path: str, cell: nn.Cell, kind: LoraKind, drawn: Drawn, cfg) -> List[Parameter]:
        """The magnitude Parameter: the row norms of ``W + s B A`` (PEFT's init), W the residual under PiSSA /
        OLoRA, A and B the values drawn (float32, before the cast to ``param_init_type``)."""
        weight = kind.weight_out_in(cell) if drawn.residual is None else drawn.residual
        values = _row_norms(weight + cfg.scaling * (drawn.b @ drawn.a))
        cell.lora_magnitude_vector = Parameter(param_data(values, getattr(mstype, cfg.param_init_type)),
                                               name=f"{path}.{MAGNITUDE}", requires_grad=True)
        return [cell.lora_magnitude_vector]

    def weight_deltas(self, kind: LoraKind, cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
        """``[(W, f (W + s B A) - W)]`` in the weight's layout: what merging an unmerged cell adds."""
        merged, _ = _merged(kind, cell)
        return [(kind.base_weight(cell), kind.in_weight_layout(cell, merged - kind.weight_out_in(cell)))]

    def merge(self, kind: LoraKind, cell: nn.Cell) -> None:
        """``W' = f (W + s B A)``, the norms kept for :meth:`unmerge`."""
        merged, norm = _merged(kind, cell)
        cell.__dict__[MERGED_NORM] = norm
        write_values(kind.base_weight(cell), Tensor(kind.in_weight_layout(cell, merged), mstype.float32))

    def unmerge(self, kind: LoraKind, cell: nn.Cell) -> None:
        """``W = W' / f - s B A`` with the norms kept at merge time (PEFT)."""
        norm = cell.__dict__.pop(MERGED_NORM)
        factor = cell.lora_magnitude_vector.astype(mstype.float32).asnumpy() / norm
        merged = kind.weight_out_in(cell) / factor[:, None] - _delta(cell)
        write_values(kind.base_weight(cell), Tensor(kind.in_weight_layout(cell, merged), mstype.float32))


DORA = DoraVariant()
