"""A tiny MindFormers mcore Qwen3 (``TrainingQwen3ForCausalLM``) that trains on the CPU: test code only.

MindFormers 1.9's current training models are built from ``parallel_core.training_graph``. Their
layer spec always uses cells whose kernels exist only on Ascend, so on the CPU the forward fails:

* ``FlashAttention`` (``FlashAttentionScore``) for the core attention;
* ``FusedRMSNorm`` (``RmsNorm``) for every norm;
* ``Dropout`` (``DropoutExt``) when a dropout rate is above 0.

:func:`cpu_stand_ins` replaces those cells **in the built model** with CPU equivalents, which is
what these tests mean by "the patched model":

* :class:`CpuCoreAttention`: plain scaled-dot-product attention with FlashAttention's calling
  convention (query/key/value ``[S, B, N, D]``, a ``uint8`` mask ``[B, 1, S, S_kv]`` where 1 is
  masked, grouped-query heads shared as ``h // (N / N_kv)``, output ``[S, B, N * D]``). Key/value
  positions beyond the mask's width (a prefix the mask was not widened for) are visible to every query.
* MindFormers' own (unfused) ``RMSNorm`` holding the original norm's weight Parameter.
* ``RotaryEmbedding`` computes its angles with ``Outer``, which has no CPU kernel: its two ``Outer``
  primitives become :class:`CpuOuter` (a broadcast product, the same values).
* ``VocabParallelEmbedding``'s backward is ``EmbeddingDenseBackward``, which has no CPU kernel: the
  cell becomes :class:`CpuEmbedding` (a ``Gather`` over the same weight Parameter), so that the
  embedding can be trained too (full fine-tuning in the benchmarks). With ``keep_embedding=True`` the
  real ``VocabParallelEmbedding`` stays: its forward runs on the CPU, and with its table frozen (LoRA
  on the embedding, ``tests/tuners/test_lora_embedding.py``) no backward kernel of it is needed, so the class
  pet_hooks adapts there is MindFormers' own.
* MoE models (Qwen3-MoE): the router's ``TopkExt`` (no CPU kernel) becomes :class:`CpuTopk`, and the
  grouped experts' ``Morph`` (token dispatch, ``GroupedMatmul``, ``Swiglu``, undispatch: Ascend
  kernels) becomes :class:`CpuDenseExperts`, which runs every expert on every token and weights the
  outputs by the router's probabilities (the same sum for the chosen experts; ``Swiglu`` taken as
  ``silu(first half) * second half``). It receives the weights the experts cell hands its Morph, so
  anything done to those weights (pet_hooks' expert LoRA) is computed as on Ascend.
* Dropout cells are left alone: the config sets every rate to 0, and a ``Dropout`` with rate 0 never
  reaches ``DropoutExt``.

These stand-ins live in the tests, never in pet_hooks: pet_hooks adapts the ``ColumnParallelLinear``
/ ``RowParallelLinear`` projections and the attention cell, which are not replaced. Parity with
MindFormers' own mcore LoRA is checked on the same patched model.

MindFormers' attention casts query/key/value to float16 before FlashAttention (its kernel wants
fp16/bf16), so the attention inputs are rounded to float16 here too; the stand-in computes in float32.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common import dtype as mstype

#: Qwen3Config keyword arguments of the tiny model: 2 layers, hidden 32, 4 query heads over 2 kv heads
TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64, seq_length=8,
            batch_size=2, hidden_dropout=0.0, attention_dropout=0.0, compute_dtype="float32",
            params_dtype="float32", layernorm_compute_dtype="float32", softmax_compute_dtype="float32",
            rotary_dtype="float32", rms_norm_eps=1e-6)


def mcore_context() -> None:
    """MindFormers' global context for the mcore classes (``use_legacy: False``), on the CPU, mode kept.

    Without ``use_legacy: False`` building the model fails on ``parallel_config.swap``. MindFormers'
    ``build_context`` can run once per process (a second call fails setting the CPU affinity again),
    so later calls only switch ``use_legacy`` on the context it made.
    """
    from mindformers import build_context
    from mindformers.core.context.build_context import MFContextOperator
    mode = ms.get_context("mode")
    context = MFContextOperator.get_mf_ctx_instance()
    if context is None:
        build_context({"context": {"mode": mode, "device_target": "CPU"}, "parallel": {}, "use_legacy": False})
    else:
        context.set_context(use_legacy=False)
    ms.set_context(mode=mode)


def restore_legacy_context() -> None:
    """``use_legacy`` True again (MindFormers' default without a context), for the legacy-model tests after."""
    from mindformers.core.context.build_context import MFContextOperator
    context = MFContextOperator.get_mf_ctx_instance()
    if context is not None:
        context.set_context(use_legacy=True)


class CpuCoreAttention(nn.Cell):
    """Scaled-dot-product attention in place of MindFormers' ``FlashAttention`` (BNSD layout, causal mask)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None,
                 config=None):
        super().__init__()
        self.config = config        # the model's TransformerConfig, as FlashAttention keeps it
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.n_rep = num_heads // num_kv_heads
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.softmax = ops.Softmax(-1)

    def construct(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                  packed_seq_params=None, alibi_mask=None, prefix=None, padding_mask=None,
                  actual_seq_qlen=None, actual_seq_kvlen=None):
        q_len, bsz = query.shape[0], query.shape[1]
        kv_len = key.shape[0]
        q = ops.transpose(ops.cast(query, mstype.float32), (1, 2, 0, 3))      # B, N, S, D
        k = ops.transpose(ops.cast(key, mstype.float32), (1, 2, 0, 3))        # B, Nkv, Skv, D
        v = ops.transpose(ops.cast(value, mstype.float32), (1, 2, 0, 3))
        if self.n_rep > 1:                                                    # head h reads kv head h // n_rep
            k = ops.repeat_interleave(k, self.n_rep, 1)
            v = ops.repeat_interleave(v, self.n_rep, 1)
        scores = self.bmm_t(q, k) * self.scale                               # B, N, S, Skv
        mask = ops.cast(attention_mask, mstype.float32)                      # 1 = masked
        if kv_len > mask.shape[-1]:                                          # prefix positions: visible
            mask = ops.concat((ops.zeros(mask.shape[:-1] + (kv_len - mask.shape[-1],), mstype.float32), mask), -1)
        scores = scores - mask * 1e9
        out = self.bmm(self.softmax(scores), v)                              # B, N, S, D
        out = ops.transpose(out, (2, 0, 1, 3))                               # S, B, N, D
        return ops.reshape(out, (q_len, bsz, self.num_heads * self.head_dim))


class CpuOuter(nn.Cell):
    """``ops.Outer`` (no CPU kernel) as a broadcast product: ``out[i, j] = a[i] * b[j]``."""

    def construct(self, a, b):
        return ops.expand_dims(a, 1) * ops.expand_dims(b, 0)


class CpuEmbedding(nn.Cell):
    """``VocabParallelEmbedding`` without tensor parallelism: rows of the same weight Parameter."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def construct(self, input_):
        return ops.gather(self.weight, input_, 0)


class CpuTopk(nn.Cell):
    """``TopkExt`` (no CPU kernel) as ``ops.topk``."""

    def construct(self, x, k, dim=-1, largest=True, sorted=True):  # pylint: disable=redefined-builtin
        return ops.topk(x, k, dim, largest, sorted)


class CpuDenseExperts(nn.Cell):
    """``FFNGroupedGEMM``'s Morph computed densely: every expert on every token, weighted by the router."""

    def __init__(self, hidden: int, ffn: int, num_experts: int):
        super().__init__()
        self.hidden, self.ffn, self.num_experts = hidden, ffn, num_experts

    def construct(self, tokens, probs, routing_map, w1, w2, num_tokens_per_expert=None):
        shape = tokens.shape
        x = ops.reshape(tokens, (-1, self.hidden))
        w1 = ops.reshape(w1, (self.num_experts, self.hidden, 2 * self.ffn))
        w2 = ops.reshape(w2, (self.num_experts, self.ffn, self.hidden))
        h = ops.bmm(ops.broadcast_to(ops.expand_dims(x, 0), (self.num_experts,) + x.shape), w1)   # E, N, 2F
        h = ops.bmm(ops.silu(h[:, :, :self.ffn]) * h[:, :, self.ffn:], w2)                        # E, N, H
        chosen = ops.one_hot(ops.reshape(routing_map, (x.shape[0], -1)), self.num_experts,
                             ops.ones((), probs.dtype), ops.zeros((), probs.dtype))                # N, k, E
        weights = ops.reduce_sum(chosen * ops.expand_dims(ops.reshape(probs, (x.shape[0], -1)), -1), 1)  # N, E
        out = ops.reduce_sum(ops.expand_dims(ops.transpose(weights, (1, 0)), -1) * h, 0)           # N, H
        return ops.reshape(out, shape)


def _unfused_norm(fused, config):
    """MindFormers' own ``RMSNorm`` carrying ``fused``'s weight Parameter (same object, same name)."""
    from mindformers.parallel_core.training_graph.transformer.norm import RMSNorm
    norm = RMSNorm(config, fused.dim, eps=fused.eps)
    norm.weight = fused.weight
    return norm


def cpu_stand_ins(net: nn.Cell, keep_embedding: bool = False) -> nn.Cell:
    """Replace the Ascend-only cells of a built mcore model with CPU equivalents, in place; returns ``net``.
    ``keep_embedding`` leaves the real ``VocabParallelEmbedding`` (for a model whose table stays frozen)."""
    from mindformers.parallel_core.training_graph.transformer.flash_attention import FlashAttention
    from mindformers.parallel_core.training_graph.transformer.norm import FusedRMSNorm
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import VocabParallelEmbedding
    cells = list(net.cells_and_names())
    # The model's TransformerConfig (the norms keep none; RMSNorm reads its dtypes and parallel sizes).
    config = next(cell.config for _, cell in cells if isinstance(cell, FlashAttention))
    replacements = []
    for _, cell in cells:
        for name, child in list(cell.name_cells().items()):
            if isinstance(child, FlashAttention):
                heads = config.num_attention_heads
                replacements.append((cell, name, CpuCoreAttention(
                    heads, config.num_query_groups or heads, config.kv_channels, config.softmax_scale, config)))
            elif isinstance(child, VocabParallelEmbedding) and not keep_embedding:
                replacements.append((cell, name, CpuEmbedding(child.weight)))
            elif isinstance(child, FusedRMSNorm):
                replacements.append((cell, name, _unfused_norm(child, config)))
    from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding)
    for _, cell in cells:
        if isinstance(cell, RotaryEmbedding):
            cell.outer, cell.outer_for_eod = CpuOuter(), CpuOuter()
        elif type(cell).__name__ == "TopKRouter":
            cell.topk = CpuTopk()
        elif type(cell).__name__ == "FFNGroupedGEMM":
            cell.morphed_forward = CpuDenseExperts(int(cell.hidden_size), int(cell.moe_ffn_hidden_size),
                                                   int(cell.num_local_experts))
    for parent, name, new in replacements:
        old = getattr(parent, name)
        names = {id(p): p.name for p in new.get_parameters()}
        setattr(parent, name, new)
        # Setting a child cell prefixes its parameters with the attribute name; they keep the model's names.
        for param in new.get_parameters():
            param.name = names[id(param)]
        # The replaced cell stays alive (MindFormers keeps references to it) and would still own the weight
        # its stand-in now holds: enable() would take it for another model built in its block that owns the
        # optimizer's parameters. It gives the weight up.
        if isinstance(getattr(old, "weight", None), ms.Parameter):
            delattr(old, "weight")
    return net


def register_prefix_stand_in() -> None:
    """Let the prefix methods adapt the attention stand-in as they adapt MindFormers' FlashAttention.

    Registered through the public ``pet_hooks.register_attention``: the stand-in is called as
    FlashAttention is, so pet_hooks' own adapter for it applies unchanged.
    """
    import pet_hooks
    from pet_hooks.tuners.prefix.attention import McoreCoreAttentionPrefix
    pet_hooks.register_attention(CpuCoreAttention, McoreCoreAttentionPrefix)


def tiny_qwen3(seed: int = 0, keep_embedding: bool = False, **overrides) -> nn.Cell:
    """A 2-layer ``TrainingQwen3ForCausalLM`` with CPU stand-ins; ``net(ids, labels=ids)`` returns the loss.
    ``keep_embedding``: MindFormers' own ``VocabParallelEmbedding`` (see :func:`cpu_stand_ins`)."""
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    mcore_context()
    ms.set_seed(seed)
    np.random.seed(seed)
    config = Qwen3Config(**{**TINY, **overrides})
    return cpu_stand_ins(TrainingQwen3ForCausalLM(config), keep_embedding)


def adam_losses(net: nn.Cell, ids: ms.Tensor, lr: float, steps: int = 4) -> list:
    """Train ``net`` (a tiny mcore model, loss from ``net(ids, labels=ids)``) ``steps`` Adam steps on one
    batch over its trainable parameters; the loss of each step."""
    optimizer = nn.Adam(net.trainable_params(), learning_rate=lr)
    net.set_train(True)

    def forward(x):
        return net(x, labels=x)[0]

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)
    losses = []
    for _ in range(steps):
        loss, grads = grad_fn(ids)
        optimizer(grads)
        losses.append(float(loss.asnumpy().reshape(-1)[0]))
    return losses
