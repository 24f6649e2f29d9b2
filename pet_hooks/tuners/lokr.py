"""LoKr (PEFT's ``LoKrConfig`` / ``lokr.Linear``) on ``nn.Dense`` and MindFormers' ``Linear``.

``y = base(x) + x @ dW^T`` with ``dW = kron(w1, w2) * alpha / r``. The sizes are PEFT's (LyCORIS'
``factorization``): ``out = a * b`` and ``in = c * d`` with ``(a, b)``, ``(c, d)`` split near the
square root (or by ``decompose_factor``); ``w1`` is [a, c], ``w2`` [b, d]. Each factor is a full
matrix (``lokr_w1`` / ``lokr_w2``) or a rank-r product (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @
lokr_w2_b``), by PEFT's rule: ``w2`` is a product when ``r < max(b, d) / 2``, ``w1`` only with
``decompose_both`` and ``r < max(a, c) / 2``. The names and shapes are PEFT's, so its files load as
they are. At init, as PEFT: ``w1`` (or ``lokr_w1_a``) is zero (the output is the base's), the rest
kaiming uniform; ``init_weights: "lycoris"`` zeroes ``w2`` (or ``lokr_w2_b``) instead; ``false`` draws all.
PEFT's convolution forms (``lokr_t2``, ``use_effective_conv2d``) do not apply: only linear cells are
adapted. Dropout, the switch and merging: ``tuners/lycoris.py``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from mindspore import nn, ops

from .lycoris import LycorisPeftLayout, LycorisTuner, add_delta, factor, kaiming_uniform, out_in

__all__ = ["LoKrTuner", "LoKrLayer", "factorization"]

_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# what a LoKr cell gains besides its factors: which factors are full, and (a, b, c, d)
_LAYOUT = ("lokr_full_w1", "lokr_full_w2", "lokr_sizes")


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """LyCORIS' (and PEFT's) split of ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n = dimension``:
    ``(factor, dimension / factor)`` when ``factor`` divides it, else the divisor pair nearest the square
    root with ``m <= factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _kron(w1, w2, sizes):
    """``kron(w1, w2)`` for w1 [a, c], w2 [b, d]: element [i*b + j, k*d + l] = w1[i, k] * w2[j, l]."""
    a, b, c, d = sizes
    return ops.reshape(ops.reshape(w1, (a, 1, c, 1)) * ops.reshape(w2, (1, b, 1, d)), (a * b, c * d))


class LoKrLayer:
    """Mixin for the generated classes: the base output plus ``x @ dW^T``."""

    pet_hooks_lokr = True  # marker: "this instance was patched by pet_hooks' LoKr"

    def construct(self, x):
        out = self.pet_base_construct(x)
        if self.lokr_full_w1:           # Python bools: graph mode compiles one branch
            w1 = self.lokr_w1
        else:
            w1 = ops.matmul(self.lokr_w1_a, self.lokr_w1_b)
        if self.lokr_full_w2:
            w2 = self.lokr_w2
        else:
            w2 = ops.matmul(self.lokr_w2_a, self.lokr_w2_b)
        return add_delta(self, x, out, _kron(w1, w2, self.lokr_sizes) * self.lyco_scale)


class LoKrPeftLayout(LycorisPeftLayout):
    """A PEFT LoKr module holds one of four tensor sets (w1 or w1_a/w1_b, w2 or w2_a/w2_b): all are listed as
    optional bare tensors; which the net has follows from the config, and each tensor's shape is checked."""

    peft_type = "LOKR"
    weights: Dict[str, str] = {}
    bare_weights = {name: name for name in _FACTORS}
    extra_fields = ("decompose_both", "decompose_factor", "rank_dropout_scale")


class LoKrTuner(LycorisTuner):
    """LoKr as a :class:`~pet_hooks.tuners.base.Tuner`: Kronecker products of (low-rank) factors on Dense / Linear."""

    label = "LoKr"
    pet_types = ("lokr",)
    mixin = LoKrLayer
    factor_names = _FACTORS + _LAYOUT
    rank_dropout_scale = staticmethod(lambda cfg: cfg.rank_dropout_scale)
    peft = LoKrPeftLayout()

    def factors(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        out, inp, r = *out_in(cell), int(cfg.r)
        a, b = factorization(out, cfg.decompose_factor)
        c, d = factorization(inp, cfg.decompose_factor)
        cell.lokr_full_w1 = not (cfg.decompose_both and r < max(a, c) / 2)      # PEFT's use_w1 / use_w2
        cell.lokr_full_w2 = not r < max(b, d) / 2
        cell.lokr_sizes = (a, b, c, d)
        values = {}
        if cell.lokr_full_w1:
            values["lokr_w1"] = kaiming_uniform(rng, (a, c))
        else:
            values.update(lokr_w1_a=kaiming_uniform(rng, (a, r)), lokr_w1_b=kaiming_uniform(rng, (r, c)))
        if cell.lokr_full_w2:
            values["lokr_w2"] = kaiming_uniform(rng, (b, d))
        else:
            values.update(lokr_w2_a=kaiming_uniform(rng, (b, r)), lokr_w2_b=kaiming_uniform(rng, (r, d)))
        zero = {True: ("lokr_w1" if cell.lokr_full_w1 else "lokr_w1_a"),
                "lycoris": ("lokr_w2" if cell.lokr_full_w2 else "lokr_w2_b")}.get(cfg.init_weights)
        if zero is not None:
            values[zero] = np.zeros_like(values[zero])
        return values

    def zero_factor(self, cell: nn.Cell) -> str:
        return "lokr_w1" if cell.lokr_full_w1 else "lokr_w1_a"

    def delta_numpy(self, cell: nn.Cell) -> np.ndarray:
        w1 = factor(cell, "lokr_w1") if cell.lokr_full_w1 else factor(cell, "lokr_w1_a") @ factor(cell, "lokr_w1_b")
        w2 = factor(cell, "lokr_w2") if cell.lokr_full_w2 else factor(cell, "lokr_w2_a") @ factor(cell, "lokr_w2_b")
        return (np.kron(w1, w2) * cell.lyco_scale).astype(np.float32)
