"""How each known attention cell takes prefix keys and values: the adapter registry.

An adapter is a mixin class derived from :class:`PrefixAttention`. It gives the geometry of
the cell (``geometry(cell) -> (kv_heads, head_dim, hidden_size)``) and a ``construct`` with
the cell's own signature that puts the prefix in front of the cell's keys and values,
widens its mask, and calls the original computation as ``self.pet_base_construct(...)``.
pet_hooks moves each attention cell onto a generated subclass ``(adapter, original class)``,
so graph mode compiles the adapter's source::

    class MyAttentionPrefix(pet_hooks.PrefixAttention):
        @staticmethod
        def geometry(cell):
            return cell.num_heads, cell.head_dim, cell.num_heads * cell.head_dim

        def construct(self, query, key, value, mask):          # MyAttention's own signature
            if self.pet_prefix_active:
                key, value = self.prefix_concat(key, value)    # (batch, heads, prefix + seq, head_dim)
                mask = ops.concat((ops.ones((mask.shape[0], self.pet_prefix_len), mask.dtype), mask), -1)
            return self.pet_base_construct(query, key, value, mask)

    pet_hooks.register_attention(MyAttention, MyAttentionPrefix)

Built in: MindFormers' ``LLamaAttention`` (which already takes ``prefix_keys_values``) and the
mcore core attention (``FlashAttention``, ``McoreCoreAttentionPrefix``),
registered by dotted name so that MindFormers is not imported here. Other models register
their own (``samples/tiny_gpt.py`` does, for its ``CoreAttention``). Note: graph mode cannot call ``super().construct`` from such a mixin (it
recurses), hence ``pet_base_construct``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from mindspore import nn, ops

from ..cell_adapters import CellAdapterRegistry

__all__ = ["PrefixAttention", "LlamaAttentionPrefix", "McoreCoreAttentionPrefix", "register_attention", "unregister_attention",
           "adapter_for", "known_attention_names"]


class PrefixAttention:
    """Base of every attention adapter: the prefix of this cell's layer, in the layouts cells use.

    pet_hooks sets, per cell: ``pet_prefix_len``, ``pet_kv_heads``, ``pet_head_dim``,
    ``pet_kv_dim``, the layer's column range ``pet_kv_start``/``pet_kv_stop`` in the encoder
    output, the shared encoder parameters, ``pet_prefix_dropout`` and ``pet_prefix_active``.
    """

    pet_hooks_prefix = True  # marker: "this instance was patched by pet_hooks"

    @staticmethod
    def geometry(cell) -> Tuple[Optional[int], Optional[int], Optional[int]]:
        """(key/value heads, head size, hidden size) of ``cell``; None where it cannot tell."""
        raise NotImplementedError

    def _pet_layer_prefix(self):
        """(prefix_len, 2 * kv_dim): this layer's keys then values, float32."""
        if self.pet_prefix_projected:
            hidden = ops.tanh(ops.matmul(self.pet_prefix_embedding, ops.transpose(self.pet_prefix_w_in, (1, 0)))
                              + self.pet_prefix_b_in)
            w_out = self.pet_prefix_w_out[self.pet_kv_start:self.pet_kv_stop]
            kv = ops.matmul(hidden, ops.transpose(w_out, (1, 0))) + self.pet_prefix_b_out[self.pet_kv_start:
                                                                                         self.pet_kv_stop]
        else:
            kv = self.pet_prefix_embedding[:, self.pet_kv_start:self.pet_kv_stop]
        return self.pet_prefix_dropout(kv)

    def prefix_key_value(self, batch):
        """(key, value), each (batch, kv_heads, prefix_len, head_dim), float32."""
        kv = self._pet_layer_prefix()
        shape = (1, self.pet_prefix_len, self.pet_kv_heads, self.pet_head_dim)
        key = ops.transpose(ops.reshape(kv[:, :self.pet_kv_dim], shape), (0, 2, 1, 3))
        value = ops.transpose(ops.reshape(kv[:, self.pet_kv_dim:], shape), (0, 2, 1, 3))
        full = (batch, self.pet_kv_heads, self.pet_prefix_len, self.pet_head_dim)
        return ops.broadcast_to(key, full), ops.broadcast_to(value, full)

    def prefix_concat(self, key, value):
        """``key`` / ``value`` (batch, heads, seq, head_dim) with the prefix in front, in their dtype."""
        prefix_key, prefix_value = self.prefix_key_value(key.shape[0])
        key = ops.concat((ops.cast(prefix_key, key.dtype), key), 2)
        value = ops.concat((ops.cast(prefix_value, value.dtype), value), 2)
        return key, value

    def prefix_keys_values_flat(self, batch):
        """(2, batch, prefix_len, kv_dim): MindFormers' ``prefix_keys_values`` layout for one layer."""
        kv = self._pet_layer_prefix()
        kv = ops.reshape(kv, (1, self.pet_prefix_len, 2, self.pet_kv_dim))
        kv = ops.transpose(kv, (2, 0, 1, 3))
        return ops.broadcast_to(kv, (2, batch, self.pet_prefix_len, self.pet_kv_dim))


class LlamaAttentionPrefix(PrefixAttention):
    """MindFormers 1.9 ``LLamaAttention``: its own ``prefix_keys_values`` path, mask widened as LlamaModel does."""

    @staticmethod
    def geometry(cell):
        if cell.use_past:
            raise ValueError("incremental decoding (use_past=True) is not supported by the prefix methods yet")
        return cell.n_kv_head, cell.head_dim, cell.hidden_size

    def construct(self, x, freqs_cis, mask=None, batch_valid_length=None, block_tables=None, slot_mapping=None,
                  prefix_keys_values=None, q_seq_lens=None, kv_mask=None, seq_chunk=None, actual_seq_len=None):
        if self.pet_prefix_active:
            prefix_keys_values = self.prefix_keys_values_flat(x.shape[0])
            # LlamaModel's mask: 1 = masked; the prefix columns are visible to every query.
            mask = ops.concat((ops.zeros(mask.shape[:-1] + (self.pet_prefix_len,), mask.dtype), mask), -1)
        return self.pet_base_construct(x, freqs_cis, mask, batch_valid_length, block_tables, slot_mapping,
                                       prefix_keys_values, q_seq_lens, kv_mask, seq_chunk, actual_seq_len)


class McoreCoreAttentionPrefix(PrefixAttention):
    """MindFormers 1.9 mcore core attention (``FlashAttention`` of the training graph: Qwen3, ...): the prefix
    goes in front of the keys and values it is given, and its mask is widened as ``GPTModel`` widens it.

    The target is ``self_attention.core_attention``, not ``SelfAttention``: MindFormers' own prefix path
    there (``Attention._cat_prefix``) concatenates along axis 2 (``Concat(2)``) tensors that are
    ``[S, B, heads, head_dim]``, so it fails for every prefix ("shapes of tensors must match except in
    given concat axis 2"). The core attention receives keys and values ``[S_kv, B, kv_heads, head_dim]``
    (rotary applied, float16 for the kernel) and a mask ``[B, 1, S, S_kv]`` where 1 is masked; the
    prefix keys take no rotary embedding, as in MindFormers' and PEFT's prefix methods. Context
    parallelism and the ``TND`` layout are refused. A core attention of another class with the same
    call (such as a CPU stand-in) can use this adapter through :func:`register_attention` if it has
    the model's ``config``.
    """

    @staticmethod
    def geometry(cell):
        config = cell.config
        if (config.context_parallel_size or 1) > 1:
            raise ValueError("context parallelism (context_parallel_size > 1) is not supported by the prefix methods")
        if config.input_layout == "TND":
            raise ValueError("the TND layout (packed sequences) is not supported by the prefix methods")
        heads = config.num_attention_heads
        return config.num_query_groups or heads, config.kv_channels, config.hidden_size

    def construct(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                  packed_seq_params=None, alibi_mask=None, prefix=None, padding_mask=None,
                  actual_seq_qlen=None, actual_seq_kvlen=None):
        if self.pet_prefix_active:
            batch = key.shape[1]
            kv = ops.reshape(self._pet_layer_prefix(), (self.pet_prefix_len, 1, 2, self.pet_kv_heads, self.pet_head_dim))
            full = (self.pet_prefix_len, batch, self.pet_kv_heads, self.pet_head_dim)
            key = ops.concat((ops.cast(ops.broadcast_to(kv[:, :, 0], full), key.dtype), key), 0)
            value = ops.concat((ops.cast(ops.broadcast_to(kv[:, :, 1], full), value.dtype), value), 0)
            attention_mask = ops.concat((ops.zeros(attention_mask.shape[:-1] + (self.pet_prefix_len,),
                                                   attention_mask.dtype), attention_mask), -1)
        return self.pet_base_construct(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params, alibi_mask, prefix, padding_mask, actual_seq_qlen,
                                       actual_seq_kvlen)


_REGISTRY = CellAdapterRegistry(
    "register_attention", "pkg.mod.Attention", PrefixAttention, "pet_hooks.PrefixAttention", ("geometry", "construct"),
    patched_flag="pet_hooks_prefix", builtin={
        "mindformers.models.llama.llama_transformer.LLamaAttention": LlamaAttentionPrefix,
        "mindformers.parallel_core.training_graph.transformer.flash_attention.FlashAttention":
            McoreCoreAttentionPrefix})


def register_attention(cls: Union[type, str], adapter: type) -> None:
    """Teach the prefix methods how ``cls`` (a Cell class or its dotted name) takes prefix key/values.

    ``adapter`` is a :class:`PrefixAttention` subclass with ``geometry`` and ``construct``.
    """
    _REGISTRY.register(cls, adapter)


def unregister_attention(cls: Union[type, str]) -> None:
    """Forget what ``register_attention(cls, ...)`` taught; cells already patched stay patched."""
    _REGISTRY.unregister(cls)


def adapter_for(cell: nn.Cell) -> Optional[type]:
    """The adapter registered for the class of ``cell`` (or its nearest registered base)."""
    return _REGISTRY.adapter_for(cell)


def known_attention_names() -> list:
    return _REGISTRY.known()
