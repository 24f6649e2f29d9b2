"""LoHa (PEFT's ``LoHaConfig`` / ``loha.Linear``) on ``nn.Dense`` and MindFormers' ``Linear``.

``y = base(x) + x @ dW^T`` with ``dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r``
(a Hadamard product of two rank-r products; ``hada_w*_a`` [out, r], ``hada_w*_b`` [r, in]: PEFT's
names and shapes, so PEFT's tensors load as they are). At init, as PEFT: ``hada_w2_b`` is zero (the
output is the base's) and the other three are kaiming uniform; ``init_weights: false`` draws all four.
PEFT's convolution forms (``hada_t1`` / ``hada_t2``, ``use_effective_conv2d``) do not apply: only
linear cells are adapted. Dropout, the switch and merging: ``tuners/lycoris.py``.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from mindspore import nn, ops

from .lycoris import LycorisPeftLayout, LycorisTuner, add_delta, factor, kaiming_uniform, out_in

__all__ = ["LoHaTuner", "LoHaLayer"]

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaLayer:
    """Mixin for the generated classes: the base output plus ``x @ dW^T``."""

    pet_hooks_loha = True  # marker: "this instance was patched by pet_hooks' LoHa"

    def construct(self, x):
        out = self.pet_base_construct(x)
        weight = ops.matmul(self.hada_w1_a, self.hada_w1_b) * ops.matmul(self.hada_w2_a, self.hada_w2_b)
        return add_delta(self, x, out, weight * self.lyco_scale)


class LoHaPeftLayout(LycorisPeftLayout):
    peft_type = "LOHA"
    weights = {name: name for name in _FACTORS}


class LoHaTuner(LycorisTuner):
    """LoHa as a :class:`~pet_hooks.tuners.base.Tuner`: Hadamard products of low-rank factors on Dense / Linear."""

    label = "LoHa"
    pet_types = ("loha",)
    mixin = LoHaLayer
    factor_names = _FACTORS
    peft = LoHaPeftLayout()

    def factors(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        out, inp, r = *out_in(cell), int(cfg.r)
        values = {"hada_w1_a": kaiming_uniform(rng, (out, r)), "hada_w1_b": kaiming_uniform(rng, (r, inp)),
                  "hada_w2_a": kaiming_uniform(rng, (out, r)), "hada_w2_b": kaiming_uniform(rng, (r, inp))}
        if cfg.init_weights:
            values["hada_w2_b"] = np.zeros((r, inp), np.float32)     # PEFT's: the delta starts at zero
        return values

    def zero_factor(self, cell: nn.Cell) -> str:
        return "hada_w2_b"

    def delta_numpy(self, cell: nn.Cell) -> np.ndarray:
        w1 = factor(cell, "hada_w1_a") @ factor(cell, "hada_w1_b")
        w2 = factor(cell, "hada_w2_a") @ factor(cell, "hada_w2_b")
        return (w1 * w2 * cell.lyco_scale).astype(np.float32)
