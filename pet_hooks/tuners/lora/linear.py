"""LoRA on the plain projections: ``mindspore.nn.Dense`` and MindFormers' legacy ``Linear``, one kind each.

Graph mode compiles the *source* of ``type(cell).construct`` and ignores a wrapped method, so a
matched cell is moved onto a generated subclass (``LoraDense_of_Dense``) whose ``construct`` is
the base layer's own computation, copied once here (``pet_hooks/utils/internals.py`` pins both
sources), with the LoRA output added to the base product before the activation::

    y = act(x @ W^T + b + scaling * dropout(x) @ A^T @ B^T)

The copy calls ``self._lora_output(x2, W x)``: plain LoRA's (``LoraLayer``) adds the bias, then the
branch, as the base layer orders them; a variant's layer (DoRA, ``lora/dora.py``) recombines the
same pieces, which each mixin defines for its layer (``_branch``, ``_base_bias``,
``_to_base_dtype``, ``_lora_product``, ``_base_product``, ``_weight_rows``), so DoRA holds no second
copy of either ``construct``.

``Linear`` computes in its compute dtype, respects ``transpose_b`` (its weight may be stored
[in, out]) and runs the branch on the cell's own MatMuls (``pet_lora_matmul_a`` / ``_b``), sharded
from the base matmul's strategy (``lora/layout.py``). A ``Linear`` with experts is refused.
"""
from __future__ import annotations

from typing import Optional

from mindspore import nn, ops

from ..common import linear_experts_reason, mindformers_linear
from . import layout as lora_layout
from .kind import LoraKind, LoraLayer

__all__ = ["LoraDense", "LoraLinear", "DenseKind", "LinearKind", "DENSE", "LINEAR"]

_MATMUL_TB = ops.MatMul(transpose_b=True)


class LoraDense(LoraLayer):
    """``nn.Dense.construct`` (MindSpore 2.9) with the LoRA output added before the activation."""

    def construct(self, x):
        x_shape = self.shape_op(x)
        x2 = self.reshape(x, (-1, x_shape[-1]))
        out = self.matmul(x2, self.weight)
        out = self._lora_output(x2, out)        # the bias and the branch, in the variant's order
        if self.activation_flag:
            out = self.activation(out)
        if len(x_shape) != 2:
            out = self.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],))
        return out

    # The pieces of Dense's computation a variant recombines (see LoraLayer).
    def _branch(self, x2):
        return self._lora_branch(x2)

    def _base_bias(self, out):
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        return out

    def _to_base_dtype(self, y, out):
        return ops.cast(y, ops.dtype(out))

    def _lora_product(self, h, a, b):
        """``h @ a^T @ b^T`` (a, b already scaled and cast)."""
        return _MATMUL_TB(_MATMUL_TB(h, a), b)

    def _base_product(self, h, dtype):
        """``W h`` for another input ``h`` (DoRA's base term on the dropped input), in ``dtype``."""
        return _MATMUL_TB(h, ops.cast(self.weight, dtype))

    def _weight_rows(self, dtype):
        """W as [out, in], in ``dtype``."""
        return ops.cast(self.weight, dtype)


class LoraLinear(LoraLayer):
    """``mindformers.modules.layers.Linear.construct`` (1.9, no experts) with the LoRA output added.

    The branch runs on the cell's own MatMuls (``pet_lora_matmul_a`` / ``_b``), sharded from the
    base matmul's strategy (``lora/layout.py``).
    """

    def construct(self, x, group_list=None):
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        x = self.reshape(x, (-1, self.in_channels))
        ori_dtype = ops.dtype(x)
        weight = self.cast(self.weight, self.dtype)
        x = self.cast(x, self.dtype)
        out = self.matmul(x, weight)
        out = self._lora_output(x, out)         # the bias and the branch, in the variant's order
        if self.activation_flag:
            out = self.activation(out)
        out = ops.cast(out, ori_dtype)
        return self.reshape(out, out_shape)

    # The pieces of Linear's computation a variant recombines (see LoraLayer).
    def _branch(self, x2):
        return self._sharded_branch(x2)

    def _base_bias(self, out):
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.dtype))
        return out

    def _to_base_dtype(self, y, out):
        return self.cast(y, self.dtype)

    def _lora_product(self, h, a, b):
        return self.pet_lora_matmul_b(self.pet_lora_matmul_a(h, a), b)

    def _base_product(self, h, dtype):
        return ops.cast(self.matmul(ops.cast(h, self.dtype), self.cast(self.weight, self.dtype)), dtype)

    def _weight_rows(self, dtype):
        weight = ops.cast(self.cast(self.weight, self.dtype), dtype)
        if not self.transpose_b:                            # stored [in, out]
            weight = ops.transpose(weight, (1, 0))
        return weight


def _own_construct_reason(cell: nn.Cell, base: type) -> Optional[str]:
    if type(cell).construct is not base.construct:
        return (f"{type(cell).__name__} overrides {base.__name__}.construct, whose computation "
                f"pet_hooks cannot reproduce")
    return None


class DenseKind(LoraKind):
    """``mindspore.nn.Dense``: the default geometry (``weight`` [out, in], ``in_channels`` / ``out_channels``),
    the branch in the weight's dtype; DoRA, PiSSA and OLoRA supported."""

    name = "mindspore.nn.Dense"
    mixin = LoraDense
    variants = frozenset({"dora"})
    residual_inits = True
    is_linear = True
    lora_bias = True

    def recognises(self, cell: nn.Cell) -> bool:
        return isinstance(cell, nn.Dense)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        return _own_construct_reason(cell, nn.Dense)


class LinearKind(LoraKind):
    """MindFormers' legacy ``Linear`` (no experts): its compute dtype, ``transpose_b``, and the branch's two
    primitives laid out from the base matmul's strategy."""

    name = "mindformers.modules.layers.Linear"
    mixin = LoraLinear
    extra_attrs = lora_layout.PRIMITIVE_ATTRS
    variants = frozenset({"dora"})
    residual_inits = True
    is_linear = True
    lora_bias = True

    def recognises(self, cell: nn.Cell) -> bool:
        linear = mindformers_linear()
        return linear is not None and isinstance(cell, linear)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        return linear_experts_reason(cell) or _own_construct_reason(cell, mindformers_linear())

    def compute_dtype(self, cell: nn.Cell):
        return cell.dtype               # Linear computes in its compute_dtype (x is cast to it)

    def add_extras(self, cell: nn.Cell) -> None:
        lora_layout.add_primitives(cell, lora_layout.from_matmul(cell))


DENSE = DenseKind()
LINEAR = LinearKind()
