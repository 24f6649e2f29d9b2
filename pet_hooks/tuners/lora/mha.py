"""LoRA on ``mindspore.nn.MultiheadAttention``, whose projections are read, never called.

MindSpore 2.9's ``MultiheadAttention.construct`` hands ``in_proj_weight`` and
``out_proj.weight`` / ``out_proj.bias`` to ``multi_head_attention_forward``: it never calls
``self.out_proj``, so a branch added to ``out_proj``'s own ``construct`` would never run (and
train nothing). The interception is therefore on the attention cell: it moves onto a generated
subclass whose ``construct`` is ``MultiheadAttention.construct`` (copied, MindSpore 2.9) computing
with effective weights::

    in_proj_weight  + scaling * B @ A      when the attention cell itself is a target
    out_proj.weight + scaling * B @ A      when its out_proj is a target (the deltas live on out_proj)

Addressing (PEFT's rules for torch's ``MultiheadAttention``):

- a pattern that selects the attention cell ``P`` adapts its input projection, deltas
  ``P.lora_A`` ([r, embed_dim]) and ``P.lora_B`` ([3 * embed_dim, r]) in ``in_proj_weight``'s
  layout (rows q, k, v), *and* its ``P.out_proj`` (``P.out_proj.lora_A`` / ``.lora_B``), as PEFT
  does; ``exclude_layers`` with ``.*out_proj`` leaves the output projection out;
- a pattern that selects only ``P.out_proj`` adapts the output projection alone.

Only the packed input projection is supported (``kdim == vdim == embed_dim``), as in PEFT;
with separate ``q/k/v_proj_weight`` the out_proj can still be adapted. ``lora_dropout`` is not
applied on these branches (there is no branch input to drop: the delta is folded into the
weight for the call), again as PEFT; ``apply`` says so in a warning.

:class:`MultiheadAttentionKind` is the attention cell's kind: it owns the copied ``construct``, the
packed projection's geometry, the out_proj it brings along and reads (``companions``,
``reads_child``, ``attach_child`` / ``detach_child``); the out_proj itself is an ``nn.Dense``
(``lora/linear.py``) whose delta this kind puts into the weight.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import mindspore
from mindspore import nn, ops

from ..common import patched_class
from .kind import LoraKind
from .scale import scaled_a

__all__ = ["LoraMultiheadAttention", "MultiheadAttentionKind", "MULTIHEAD_ATTENTION"]

logger = logging.getLogger("pet_hooks")
_MATMUL = ops.MatMul()


def _delta(cell):
    """``B @ (s A)`` of ``cell`` (the attention cell or its out_proj), in the cell's branch compute dtype."""
    return _MATMUL(ops.cast(cell.lora_B, cell.lora_compute_dtype), ops.cast(scaled_a(cell), cell.lora_compute_dtype))


class LoraMultiheadAttention:
    """``nn.MultiheadAttention.construct`` (MindSpore 2.9) with the LoRA deltas in the weights.

    ``pet_lora_in`` / ``pet_lora_out`` are Python booleans saying which projections carry a
    branch (compile-time constants in graph mode, which prunes the untaken branch, so
    ``self.out_proj.lora_A`` need not exist when ``pet_lora_out`` is False); they change only
    with the structure (inject / eject, then ``force_recompile``). Turning the branches off is
    their scale's value (``pet_lora_scale`` 0), as for every LoRA cell.
    """

    pet_hooks_lora = True
    pet_lora_reads_weights = True  # marker: the branch is computed in the weight, not on the input

    def construct(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                  average_attn_weights=True):
        in_proj_weight = self.in_proj_weight
        if self.pet_lora_in:
            in_proj_weight = in_proj_weight + ops.cast(_delta(self), ops.dtype(in_proj_weight))
        out_proj_weight = self.out_proj.weight
        if self.pet_lora_out:
            out_proj_weight = out_proj_weight + ops.cast(_delta(self.out_proj), ops.dtype(out_proj_weight))

        # From here on MultiheadAttention.construct of MindSpore 2.9, with in_proj_weight and
        # out_proj_weight in place of self.in_proj_weight and self.out_proj.weight.
        is_batched = query.ndim == 3
        if key_padding_mask is not None:
            _kpm_dtype = key_padding_mask.dtype
            if _kpm_dtype != mindspore.bool_ and not ops.is_floating_point(key_padding_mask):
                raise ValueError(
                    "only bool and floating types of key_padding_mask are supported")

        if self.batch_first and is_batched:
            # k_is_v and q_is_k preprocess in __call__ since Graph mode do not support `is`
            if self.k_is_v:
                if self.q_is_k:
                    query = key = value = query.swapaxes(1, 0)
                else:
                    query, key = [x.swapaxes(1, 0) for x in (query, key)]
                    value = key
            else:
                query, key, value = [x.swapaxes(1, 0) for x in (query, key, value)]

        if not self._qkv_same_embed_dim:
            attn_output, attn_output_weights = ops.function.nn_func.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads,
                self.in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn,
                self.dropout, out_proj_weight, self.out_proj.bias,
                training=self.training,
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, use_separate_proj_weight=True,
                q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights,
                k_is_v=self.k_is_v, q_is_k=self.q_is_k, dtype=self.dtype)
        else:
            attn_output, attn_output_weights = ops.function.nn_func.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads,
                in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn,
                self.dropout, out_proj_weight, self.out_proj.bias,
                training=self.training,
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                k_is_v=self.k_is_v, q_is_k=self.q_is_k, dtype=self.dtype)

        if self.batch_first and is_batched:
            attn_output = attn_output.swapaxes(1, 0)
        if need_weights:
            return attn_output, attn_output_weights
        return (attn_output,)


def _known_construct(cell: nn.Cell) -> bool:
    """True when the attention cell computes with MindSpore's construct (its own, or ours: already adapted)."""
    construct = type(cell).construct
    return construct is nn.MultiheadAttention.construct or construct is LoraMultiheadAttention.construct


class MultiheadAttentionKind(LoraKind):
    """``nn.MultiheadAttention``: the delta in its packed input projection ``in_proj_weight`` [3 * E, E], folded
    into the weight for the call (no dropout, one delta for every row of a batch); its ``out_proj`` comes along
    and is read, never called (see the module docstring)."""

    name = "mindspore.nn.MultiheadAttention"
    mixin = LoraMultiheadAttention
    #: which projections carry a branch (compile-time booleans of the construct); the parent of an adapted
    #: out_proj gains them too (``attach_child``)
    extra_attrs = ("pet_lora_in", "pet_lora_out")
    takes_dropout = False
    rows_reason = "its LoRA delta goes into an attention weight shared by every row"

    def recognises(self, cell: nn.Cell) -> bool:
        return isinstance(cell, nn.MultiheadAttention)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        """None when the attention cell's input projection can take a branch, else why not."""
        if not _known_construct(cell):
            return (f"{type(cell).__name__} overrides MultiheadAttention.construct, whose computation pet_hooks "
                    f"cannot reproduce")
        if not cell._qkv_same_embed_dim:  # pylint: disable=protected-access
            return ("MultiheadAttention with kdim/vdim other than embed_dim (separate q/k/v_proj_weight) has no "
                    "packed input projection to adapt; target its out_proj alone")
        return None

    def companions(self, path: str, cell: nn.Cell) -> List[Tuple[str, nn.Cell]]:
        """The out_proj, as PEFT adapts it with its attention cell (unless excluded)."""
        return [(f"{path}.out_proj", cell.out_proj)]

    def reads_child(self, cell: nn.Cell, child_name: str) -> bool:
        return child_name == "out_proj" and _known_construct(cell)

    def attach_child(self, cell: nn.Cell) -> Optional[type]:
        """Make the attention cell compute with its out_proj's delta; its class before when this swapped it."""
        original = None
        if not isinstance(cell, LoraMultiheadAttention):
            original = type(cell)
            cell.pet_lora_in = False
            cell.__class__ = patched_class(LoraMultiheadAttention, original)
        cell.pet_lora_out = True
        return original

    def detach_child(self, cell: nn.Cell, original_class: Optional[type]) -> None:
        cell.pet_lora_out = False
        if original_class is not None:
            cell.__class__ = original_class
            for name in self.extra_attrs:
                if name in cell.__dict__:
                    delattr(cell, name)

    def warn_no_dropout(self, paths: Sequence[str], rate: float) -> None:
        logger.warning("pet_hooks: lora_dropout %s is not applied on %s: the delta goes into the weight that "
                       "MultiheadAttention reads (as in PEFT)", rate, ", ".join(paths))

    def io_channels(self, cell: nn.Cell) -> Tuple[int, int]:
        """(in, out) of the packed input projection: ``in_proj_weight`` is [3 * embed_dim, embed_dim]."""
        return int(cell.embed_dim), 3 * int(cell.embed_dim)

    def base_weight(self, cell: nn.Cell):
        return cell.in_proj_weight

    def add_extras(self, cell: nn.Cell) -> None:
        cell.pet_lora_in, cell.pet_lora_out = True, False


MULTIHEAD_ATTENTION = MultiheadAttentionKind()
