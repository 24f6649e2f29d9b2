"""The shard strategies of a LoRA branch, read from the base layer's own layout.

The branch is two matmuls, ``h = x @ A^T`` (A ``[r, in]``) and ``y = h @ B^T`` (B ``[out, r]``).
Laid out like the base weight, as MindFormers and PEFT do: A's input columns split as the
weight's input dimension (a split contracted dimension, so under (semi-)auto parallel MindSpore
reduces the partial sums, as after the base's own matmul), B's output rows split as the weight's
output dimension, the rank never split, the token rows split as the base input's rows::

    x @ A^T:  ((rows, k), (1, k))        h @ B^T:  ((rows, 1), (n, 1))

with ``k`` / ``n`` the splits of the weight's input / output dimension. Where they come from:

* MindFormers' legacy ``Linear``: its matmul's ``in_strategy`` (set by ``Linear.shard`` when the
  model is built under (semi-)auto parallel): ``((rows, k), (n, k))`` with ``transpose_b``, else
  ``((rows, k), (k, n))`` -- MindFormers' legacy LoRA (``pet/tuners/lora_adapter.py``) reads the
  same. No strategy (stand-alone or data parallel): the primitives stay unsharded.
* mcore ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``LinearNoTP``: the layout their
  ``shard()`` gives the weight (``(tp, None)`` / ``(None, tp)`` / none) and the input's rows
  (``cp * dp``), with the sizes from the cell's ``TransformerConfig`` -- their ``Morph`` gets its
  layout only under semi-auto parallel, LoRA's strategies are set in every mode (ignored outside
  (semi-)auto parallel).

Each adapted cell owns its two MatMul primitives (``pet_lora_matmul_a`` / ``_b``): a strategy is a
property of a primitive, and cells laid out differently cannot share one.
"""
from __future__ import annotations

from typing import Optional, Tuple

from mindspore import nn, ops

__all__ = ["Strategies", "from_matmul", "from_splits", "add_primitives", "PRIMITIVE_ATTRS"]

#: the per-cell primitives of the branch (added by ``add_primitives``, removed by eject)
PRIMITIVE_ATTRS = ("pet_lora_matmul_a", "pet_lora_matmul_b")
Strategies = Tuple[tuple, tuple]


def from_splits(rows: int, k: int, n: int) -> Strategies:
    """The strategies of ``x @ A^T`` and ``h @ B^T`` for token rows split ``rows`` ways and a weight
    whose input dimension is split ``k`` ways and output dimension ``n`` ways."""
    return ((rows, k), (1, k)), ((rows, 1), (n, 1))


def from_matmul(cell: nn.Cell) -> Optional[Strategies]:
    """The strategies a legacy ``Linear``'s matmul strategy implies; None when it has none."""
    strategy = getattr(cell.matmul, "in_strategy", None)
    if not strategy:
        return None
    x_strategy, w_strategy = strategy
    n, k = w_strategy if getattr(cell, "transpose_b", True) else tuple(reversed(w_strategy))
    return from_splits(x_strategy[0], k, n)


def add_primitives(cell: nn.Cell, strategies: Optional[Strategies]) -> None:
    """Give ``cell`` its own MatMuls for the branch, sharded by ``strategies`` when given."""
    cell.pet_lora_matmul_a = ops.MatMul(transpose_b=True)
    cell.pet_lora_matmul_b = ops.MatMul(transpose_b=True)
    if strategies is None:
        return
    strategy_a, strategy_b = strategies
    cell.pet_lora_matmul_a.shard(strategy_a)
    cell.pet_lora_matmul_b.shard(strategy_b)
    if getattr(cell, "lora_dropout", None) is not None:
        cell.lora_dropout.dropout.shard((strategy_a[0],))      # the branch input, laid out like x
