"""LoRA on MindFormers' grouped-matmul experts (``FFNGroupedGEMM``: Qwen3-MoE, DeepSeek-V3): one A/B pair per expert.

``FFNGroupedGEMM`` keeps every routed expert in two parameters, ``weight1`` ``[E * hidden, 2 * ffn]``
(gate and up) and ``weight2`` ``[E * ffn, hidden]`` (down), which its ``Morph`` reshapes to
``[E, hidden, 2 * ffn]`` / ``[E, ffn, hidden]`` and hands to ``GroupedMatmul`` after the token dispatch.
There is no per-expert input to put a branch on outside that Morph, so the adapter works in weight
space, as PEFT's ``target_parameters`` does for MoE experts: each expert ``e`` of each weight gets its
own pair (PEFT's convention, ``ΔW_e = B_e @ A_e`` of shape ``[out, in]``)::

    weight1 -> lora_A [E, r, hidden],  lora_B [E, 2 * ffn, r]
    weight2 -> lora_A [E, r, ffn],     lora_B [E, hidden, r]

and the generated class's ``construct`` (``FFNGroupedGEMM.construct``, MindFormers 1.9, copied)
hands the Morph ``W_e + scaling * (B_e @ A_e)^T`` (the weights are stored ``[in, out]``). Every
expert's delta is the exact LoRA of that expert, whichever tokens the router sends it. The deltas are
named ``<cell path>.weight1.lora_A`` ... ``.weight2.lora_B``. ``lora_dropout`` is not applied (there
is no branch input to drop; PEFT does the same for parameter targets). Merging folds the deltas into
``weight1`` / ``weight2``. The PEFT file format is not written for these cells. Expert parallelism:
the deltas' batched matmul is split along the experts like the weights (``(ep, None)`` in
``FFNGroupedGEMM.shard``), ``((ep, 1, 1), (ep, 1, 1))``. :class:`GroupedExpertsKind` is the cells' kind:
its own deltas, init (``True`` only: A by ``lora_a_init`` per expert), weight deltas, sentinels
(both B's) and the two weights merging writes; no DoRA, no PiSSA / OLoRA, one adapter per net.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

from ..common import loaded_class
from . import inits as lora_init
from .kind import Drawn, LoraKind, param_data
from .scale import times_scale

__all__ = ["LoraGroupedExperts", "GroupedExpertsKind", "GROUPED_EXPERTS", "sizes", "expert_parallel"]

logger = logging.getLogger("pet_hooks")
_FFN = "mindformers.parallel_core.training_graph.transformer.moe.ffn"
#: the weights and their pair of deltas: (weight, A's attribute, B's attribute)
_PAIRS = (("weight1", "lora_A", "lora_B"), ("weight2", "lora_A_w2", "lora_B_w2"))


def _expert_delta(bmm, a, b, scale, dtype):
    """``scale * (B_e @ A_e)^T = A_e^T @ B_e^T`` for every expert, ``[E, in, out]``, in ``dtype``."""
    a = ops.cast(times_scale(a, scale), dtype)                              # [E, r, in]
    return bmm(a, ops.cast(b, dtype))                                       # [E, out, r] -> [E, in, out]


class LoraGroupedExperts:
    """``FFNGroupedGEMM.construct`` (MindFormers 1.9) with each expert's weights plus its LoRA delta."""

    pet_hooks_lora = True
    pet_lora_reads_weights = True   # the delta goes into the weights: no branch input

    def construct(self, tokens, probs, routing_map):
        new_input_tensor_shape = self.shape(tokens)
        if self.moe_token_dispatcher_type == "alltoall_deredundency":
            tokens = self.stride_slice(tokens, (0, 0, 0), new_input_tensor_shape, (1, 1, 1))
        dtype = tokens.dtype
        tokens = self.cast_op(tokens, self.compute_dtype)
        w1 = self.cast_op(self.weight1, self.compute_dtype)
        w2 = self.cast_op(self.weight2, self.compute_dtype)
        w1 = w1 + ops.reshape(_expert_delta(self.pet_lora_bmm, self.lora_A, self.lora_B, self.pet_lora_scale,
                                            self.compute_dtype), ops.shape(w1))
        w2 = w2 + ops.reshape(_expert_delta(self.pet_lora_bmm, self.lora_A_w2, self.lora_B_w2, self.pet_lora_scale,
                                            self.compute_dtype), ops.shape(w2))
        output = self.morphed_forward(tokens, probs, routing_map, w1, w2, self.num_tokens_per_expert)
        if self.moe_token_dispatcher_type == "alltoall_deredundency":
            output = self.stride_slice(output, (0, 0, 0), new_input_tensor_shape, (1, 1, 1))
        output = self.cast_op(output, dtype)
        return output


def sizes(cell: nn.Cell) -> Tuple[int, int, int]:
    """(experts, hidden, ffn) of an experts cell, from its weights."""
    hidden = int(cell.hidden_size)
    experts = int(cell.weight1.shape[0]) // hidden
    return experts, hidden, int(cell.weight1.shape[1]) // 2


def expert_parallel(cell: nn.Cell) -> int:
    """The expert-parallel size from the cell's TransformerConfig (1 when unset)."""
    return int(getattr(cell.config, "expert_model_parallel_size", None) or 1)


class GroupedExpertsKind(LoraKind):
    """MindFormers' ``FFNGroupedGEMM``: a pair of deltas per expert and weight, in weight space (see the module
    docstring)."""

    name = "MindFormers' FFNGroupedGEMM (grouped MoE experts)"
    mixin = LoraGroupedExperts
    #: weight2's pair and the deltas' batched matmul
    extra_attrs = ("lora_A_w2", "lora_B_w2", "pet_lora_bmm")
    takes_dropout = False
    rows_reason = "its LoRA deltas go into the experts' weights shared by every row"
    single_adapter_reason = "holds grouped MoE experts, which keep one adapter per net"

    def recognises(self, cell: nn.Cell) -> bool:
        grouped = loaded_class(_FFN, "FFNGroupedGEMM")
        return grouped is not None and isinstance(cell, grouped)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        if type(cell).construct is not loaded_class(_FFN, "FFNGroupedGEMM").construct:
            return (f"{type(cell).__name__} overrides FFNGroupedGEMM.construct, whose computation pet_hooks cannot "
                    f"reproduce")
        return None

    def warn_no_dropout(self, paths: Sequence[str], rate: float) -> None:
        for path in paths:
            logger.warning("pet_hooks: lora_dropout %s is not applied on the grouped experts %s: their deltas go "
                           "into the expert weights (as PEFT's target_parameters)", rate, path)

    def io_channels(self, cell: nn.Cell) -> Tuple[int, int]:
        """Per expert, weight1's (gate and up): (hidden, 2 * ffn)."""
        _, hidden, ffn = sizes(cell)
        return hidden, 2 * ffn

    def base_weight(self, cell: nn.Cell):
        return None                     # two weights (merge_weights), none of them the delta's alone

    def compute_dtype(self, cell: nn.Cell):
        return cell.compute_dtype

    def init_reason(self, cfg) -> Optional[str]:
        return lora_init.reason(cfg, residual_ok=False, default_only=True)

    def add_deltas(self, path: str, cell: nn.Cell, cfg, rng: np.random.Generator) -> Drawn:
        """The four deltas (B zero), named ``<path>.weight1.lora_A`` ... ``<path>.weight2.lora_B``."""
        experts, hidden, ffn = sizes(cell)
        dtype = getattr(mstype, cfg.param_init_type)
        fans = {"weight1": (hidden, 2 * ffn), "weight2": (ffn, hidden)}
        params = []
        for weight, a_attr, b_attr in _PAIRS:
            fan_in, fan_out = fans[weight]
            a = Parameter(param_data(lora_init.default_a(rng, cfg, (experts, cfg.lora_rank, fan_in)), dtype),
                          name=f"{path}.{weight}.lora_A")
            b = Parameter(param_data(np.zeros((experts, fan_out, cfg.lora_rank), np.float32), dtype),
                          name=f"{path}.{weight}.lora_B")
            setattr(cell, a_attr, a)
            setattr(cell, b_attr, b)
            params += [a, b]
        return Drawn(params)

    def add_extras(self, cell: nn.Cell) -> None:
        # The experts are split across expert-parallel ranks along E (FFNGroupedGEMM.shard lays weight1 / weight2
        # out as (ep, None)); each rank computes its own experts' deltas, so the batched matmul splits E alike.
        ep = expert_parallel(cell)
        cell.pet_lora_bmm = ops.BatchMatMul(transpose_a=True, transpose_b=True).shard(((ep, 1, 1), (ep, 1, 1)))

    def grad_sentinels(self, cell: nn.Cell) -> List[Parameter]:
        return [cell.lora_B, cell.lora_B_w2]

    def weight_deltas(self, cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
        """``[(weight1, change), (weight2, change)]`` in the weights' stored layout, float32."""
        out = []
        for weight, a_attr, b_attr in _PAIRS:
            a = getattr(cell, a_attr).astype(mstype.float32).asnumpy()
            b = getattr(cell, b_attr).astype(mstype.float32).asnumpy()
            delta = np.einsum("eri,eor,r->eio", a, b, cell.pet_lora_rank_scaling)  # (B_e @ s A_e)^T per expert
            target = getattr(cell, weight)
            out.append((target, delta.reshape(target.shape)))
        return out

    def merge_weights(self, cell: nn.Cell) -> List[Parameter]:
        return [cell.weight1, cell.weight2]


GROUPED_EXPERTS = GroupedExpertsKind()
