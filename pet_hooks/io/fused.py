"""Fused projections in PEFT's format: one adapted cell whose output rows are several PEFT modules.

MindFormers' mcore layers fuse projections that Hugging Face keeps apart: ``linear_qkv`` is
``q_proj``, ``k_proj`` and ``v_proj``; ``linear_fc1`` is ``gate_proj`` and ``up_proj``. One LoRA
on the fused cell (one A, one B) is exactly the separate LoRAs that share that A, each with the
B rows of its own output rows::

    save:  part i  ->  lora_A = A,  lora_B = B[rows_i]
    load:  A = the parts' A (they must be equal),  B[rows_i] = part i's lora_B

Separate LoRAs with different A's are not one rank-r LoRA on the fused cell: loading them is an
error naming the cell (they would need rank ``r * parts``).

Row layouts, read from the cell's ``TransformerConfig``:

* ``qkv`` -- MindFormers' ``SelfAttention`` (``use_contiguous_weight_layout_attention`` False)
  groups the rows by key/value head: for each of the ``num_query_groups`` groups, its
  ``num_attention_heads / num_query_groups`` query heads, then its key head, then its value head,
  ``kv_channels`` rows each. With the contiguous layout they are ``[Q; K; V]``.
* ``gate_up`` -- ``MLPInterleaved`` (``use_interleaved_weight_layout_mlp`` True) interleaves the
  rows: gate row i is row ``2i``, up row i is row ``2i + 1``. Otherwise ``[gate; up]``.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np
from mindspore import nn

from ..errors import AdapterFileError, PetConfigError

__all__ = ["part_rows", "split", "join"]


def _qkv_rows(config) -> List[np.ndarray]:
    heads = int(config.num_attention_heads)
    groups = int(config.num_query_groups or heads)
    dim = int(config.kv_channels)
    rep = heads // groups
    if getattr(config, "use_contiguous_weight_layout_attention", False):
        q, kv = heads * dim, groups * dim
        return [np.arange(q), np.arange(q, q + kv), np.arange(q + kv, q + 2 * kv)]
    block = np.arange((rep + 2) * dim)
    starts = np.arange(groups)[:, None] * (rep + 2) * dim
    return [(starts + block[None, : rep * dim]).reshape(-1),
            (starts + block[None, rep * dim: (rep + 1) * dim]).reshape(-1),
            (starts + block[None, (rep + 1) * dim:]).reshape(-1)]


def _gate_up_rows(config, out: int) -> List[np.ndarray]:
    if getattr(config, "use_interleaved_weight_layout_mlp", True):
        return [np.arange(0, out, 2), np.arange(1, out, 2)]
    return [np.arange(out // 2), np.arange(out // 2, out)]


def part_rows(layout: str, cell: nn.Cell, path: str) -> List[np.ndarray]:
    """The output rows of each part of the fused ``cell``, in the parts' order."""
    config = getattr(cell, "config", None)
    out = int(getattr(cell, "output_size", 0))
    if config is None or not out:
        raise PetConfigError(f"cell '{path}' ({type(cell).__name__}) is not an mcore projection; "
                             f"the name map treats it as a fused {layout} cell")
    rows = _qkv_rows(config) if layout == "qkv" else _gate_up_rows(config, out)
    if sum(len(r) for r in rows) != out:
        raise PetConfigError(f"cell '{path}': {out} output rows do not split as {layout} "
                             f"({[len(r) for r in rows]} from its config)")
    return rows


def split(a: np.ndarray, b: np.ndarray, rows: Sequence[np.ndarray]) -> List[tuple]:
    """``[(A, B[rows_i])]`` for each part."""
    return [(a, np.ascontiguousarray(b[r])) for r in rows]


def join(parts: Mapping[int, Mapping[str, np.ndarray]], rows: Sequence[np.ndarray], names: Sequence[str],
         path: str, where: str) -> Mapping[str, np.ndarray]:
    """``{"lora_A": A, "lora_B": B}`` of the fused cell from its parts' ``{"lora_A", "lora_B"}``."""
    missing = [names[i] for i in range(len(rows)) if i not in parts]
    if missing:
        raise AdapterFileError(f"{where}: the fused cell '{path}' needs {', '.join(names)}; "
                               f"{', '.join(missing)} missing")
    a = parts[0]["lora_A"]
    for i in range(1, len(rows)):
        if not np.array_equal(parts[i]["lora_A"], a):
            raise AdapterFileError(
                f"{where}: {names[0]} and {names[i]} have different lora_A, but '{path}' is one fused cell with "
                f"one A: separate LoRAs are only one LoRA of the same rank on it when they share A")
    first_b = parts[0]["lora_B"]
    b = np.zeros((sum(len(r) for r in rows), first_b.shape[1]), first_b.dtype)
    for i, r in enumerate(rows):
        b[r] = parts[i]["lora_B"]
    return {"lora_A": a, "lora_B": b}
