"""DoRA (``use_dora: true``, PEFT's name): weight-decomposed LoRA on ``nn.Dense`` and MindFormers' legacy ``Linear``.

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

Other cell types (the mcore projections, ``MultiheadAttention``, grouped experts, a cell whose
parent reads its weight) are refused by :func:`reason`, naming the cell through the matcher.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ...utils.ms_compat import write_values
from .scale import scaled_a

__all__ = ["DoraDense", "DoraLinear", "is_dora", "reason", "mixin_for", "magnitude", "weight_deltas", "merge",
           "MAGNITUDE", "MERGED_NORM"]

MAGNITUDE = "lora_magnitude_vector"     # PEFT's name, the parameter's leaf
MERGED_NORM = "pet_dora_merged_norm"    # the row norms at merge time (numpy), to unmerge with
_MATMUL_TB = ops.MatMul(transpose_b=True)
_MATMUL = ops.MatMul()


def _factor(self, weight_out_in, a, b, dtype):
    """``m / ||W + s B A||_row`` ([out], detached norm), or 1 while the scale switch is all zeros."""
    norm = ops.sqrt(ops.reduce_sum(ops.square(weight_out_in + _MATMUL(b, a)), 1))
    norm = ops.stop_gradient(norm)
    on = ops.cast(ops.reduce_max(ops.abs(ops.cast(self.pet_lora_scale, mstype.float32))) > 0, dtype)
    return 1.0 + on * (ops.cast(self.lora_magnitude_vector, dtype) / norm - 1.0)


class DoraDense:
    """``nn.Dense.construct`` (MindSpore 2.9) with DoRA; mixed in before ``LoraDense``."""

    pet_lora_dora = True

    def construct(self, x):
        x_shape = self.shape_op(x)
        x2 = self.reshape(x, (-1, x_shape[-1]))
        out = self.matmul(x2, self.weight)                   # W x, no bias yet
        dtype = self.lora_compute_dtype
        h = ops.cast(x2, dtype)
        weight = ops.cast(self.weight, dtype)
        a = ops.cast(scaled_a(self), dtype)
        b = ops.cast(self.lora_B, dtype)
        factor = _factor(self, weight, a, b, dtype)
        if self.lora_dropout is not None and self.training:  # PEFT: the base term on the dropped input too
            h = self.lora_dropout(h)
            lora = _MATMUL_TB(_MATMUL_TB(h, a), b)
            out = out + ops.cast((factor - 1.0) * _MATMUL_TB(h, weight) + factor * lora, ops.dtype(out))
        else:                                                # the same, in fewer passes: f (W x + s B A x)
            lora = _MATMUL_TB(_MATMUL_TB(h, a), b)
            out = ops.cast((ops.cast(out, dtype) + lora) * factor, ops.dtype(out))
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        if self.activation_flag:
            out = self.activation(out)
        if len(x_shape) != 2:
            out = self.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],))
        return out


class DoraLinear:
    """``mindformers.modules.layers.Linear.construct`` (1.9, no experts) with DoRA; before ``LoraLinear``.
    The LoRA product runs on the cell's own MatMuls (``pet_lora_matmul_a`` / ``_b``)."""

    pet_lora_dora = True

    def construct(self, x, group_list=None):
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        x = self.reshape(x, (-1, self.in_channels))
        ori_dtype = ops.dtype(x)
        weight = self.cast(self.weight, self.dtype)
        x = self.cast(x, self.dtype)
        out = self.matmul(x, weight)                         # W x, no bias yet
        dtype = self.lora_compute_dtype
        h = ops.cast(x, dtype)
        a = ops.cast(scaled_a(self), dtype)
        b = ops.cast(self.lora_B, dtype)
        weight_c = ops.cast(weight, dtype)
        if not self.transpose_b:                            # stored [in, out]
            weight_c = ops.transpose(weight_c, (1, 0))
        factor = _factor(self, weight_c, a, b, dtype)
        if self.lora_dropout is not None and self.training:
            h = self.lora_dropout(h)
            base = ops.cast(self.matmul(ops.cast(h, self.dtype), weight), dtype)
            lora = self.pet_lora_matmul_b(self.pet_lora_matmul_a(h, a), b)
            out = out + self.cast((factor - 1.0) * base + factor * lora, self.dtype)
        else:                                                # the same, in fewer passes: f (W x + s B A x)
            lora = self.pet_lora_matmul_b(self.pet_lora_matmul_a(h, a), b)
            out = self.cast((ops.cast(out, dtype) + lora) * factor, self.dtype)
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.dtype))
        if self.activation_flag:
            out = self.activation(out)
        out = ops.cast(out, ori_dtype)
        return self.reshape(out, out_shape)


_DORA_OF = {}


def mixin_for(lora_mixin: Optional[type], cfg) -> Optional[type]:
    """The class to mix into a cell: LoRA's, or with ``use_dora`` DoRA's construct before it."""
    if not getattr(cfg, "use_dora", False) or lora_mixin is None:
        return lora_mixin
    if lora_mixin not in _DORA_OF:
        # by name: lora.py imports this module, so this one does not import lora.py for its classes
        dora = {"LoraDense": DoraDense, "LoraLinear": DoraLinear}[lora_mixin.__name__]
        _DORA_OF[lora_mixin] = type(f"Dora{lora_mixin.__name__[4:]}", (dora, lora_mixin), {"__module__": __name__})
    return _DORA_OF[lora_mixin]


def reason(lora_mixin: Optional[type], cfg, plain: Tuple[type, ...]) -> Optional[str]:
    """None unless ``use_dora`` and the cell's LoRA is not one of ``plain`` (Dense, Linear): then why not."""
    if getattr(cfg, "use_dora", False) and lora_mixin not in plain:
        return ("DoRA (use_dora: true) is not supported on this cell type; it is supported on mindspore.nn.Dense "
                "and mindformers.modules.layers.Linear")
    return None


def is_dora(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_lora_dora", False) is True


def _weight_out_in(cell) -> np.ndarray:
    weight = cell.weight.astype(mstype.float32).asnumpy()
    return weight if getattr(cell, "transpose_b", True) is not False else weight.T


def _delta(cell) -> np.ndarray:
    """``s B A`` ([out, in], float32) at the adapter's scaling."""
    a = cell.lora_A.astype(mstype.float32).asnumpy()
    b = cell.lora_B.astype(mstype.float32).asnumpy()
    return cell.lora_scaling * (b @ a)


def _row_norms(w: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(w, dtype=np.float32), axis=1, dtype=np.float32)).astype(np.float32)


def magnitude(path: str, weight_out_in: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float,
              as_data, dtype) -> Parameter:
    """The magnitude Parameter: the row norms of ``W + s B A`` (PEFT's init)."""
    values = _row_norms(weight_out_in + scaling * (b @ a))
    return Parameter(as_data(values, dtype), name=f"{path}.{MAGNITUDE}", requires_grad=True)


def _layout(cell, w_out_in: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w_out_in if getattr(cell, "transpose_b", True) is not False else w_out_in.T)


def _merged(cell) -> Tuple[np.ndarray, np.ndarray]:
    """(f (W + s B A) in [out, in], the norms n) for the cell's current (unmerged) weight."""
    w = _weight_out_in(cell) + _delta(cell)
    norm = _row_norms(w)
    factor = cell.lora_magnitude_vector.astype(mstype.float32).asnumpy() / norm
    return factor[:, None] * w, norm


def weight_deltas(cell) -> List[Tuple[Parameter, np.ndarray]]:
    """``[(W, f (W + s B A) - W)]`` in the weight's layout: what merging an unmerged cell adds."""
    merged, _ = _merged(cell)
    return [(cell.weight, _layout(cell, merged - _weight_out_in(cell)))]


def merge(cell, sign: int) -> None:
    """+1: ``W' = f (W + s B A)``, the norms kept; -1: ``W = W' / f - s B A`` with the kept norms (PEFT)."""
    if sign > 0:
        merged, norm = _merged(cell)
        cell.__dict__[MERGED_NORM] = norm
    else:
        norm = cell.__dict__.pop(MERGED_NORM)
        factor = cell.lora_magnitude_vector.astype(mstype.float32).asnumpy() / norm
        merged = _weight_out_in(cell) / factor[:, None] - _delta(cell)
    write_values(cell.weight, Tensor(_layout(cell, merged), mstype.float32))
