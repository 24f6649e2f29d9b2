"""A small GPT in plain MindSpore (the sample model); it knows nothing about PET but one thing.

Layout (names chosen like MindFormers' GPT2 so its LoRA patterns apply unchanged)::

    embedding / position_embedding
    blocks.{i}.ln1, blocks.{i}.attention.{dense1,dense2,dense3}   query / key / value
                    blocks.{i}.attention.core_attention            softmax(q k^T / sqrt(d) + mask) v
                    blocks.{i}.attention.projection
    blocks.{i}.ln2, blocks.{i}.mlp.{mapping (gelu), projection}
    ln_f, head

    net = TinyGPT(GPTConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4))
    logits = net(input_ids)                  # (batch, seq, vocab)

The one thing: at the end, how its ``CoreAttention`` takes the prefix key/values of P-Tuning v2
and Prefix-Tuning, registered through ``pet_hooks.register_attention`` as any model's author
would (pet_hooks itself knows only MindFormers' attention); and, the same way, how ``TinyGPT``
takes prompt tuning's virtual tokens (``pet_hooks.register_prompt_model``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops


@dataclass
class GPTConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seq_length: int = 64
    mlp_ratio: int = 4


class CoreAttention(nn.Cell):
    """``softmax(q k^T / sqrt(d) + mask_bias) v`` on (batch, heads, seq, head_dim) tensors.

    ``mask`` is 1 where a query may attend and 0 elsewhere, shape (q_len, k_len).
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, query, key, value, mask):
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))) * self.scale
        scores = scores + (1.0 - mask) * -1e9
        return ops.matmul(self.softmax(scores), value)


class Attention(nn.Cell):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.dense1 = nn.Dense(cfg.hidden_size, cfg.hidden_size)   # query
        self.dense2 = nn.Dense(cfg.hidden_size, cfg.hidden_size)   # key
        self.dense3 = nn.Dense(cfg.hidden_size, cfg.hidden_size)   # value
        self.core_attention = CoreAttention(self.num_heads, self.head_dim)
        self.projection = nn.Dense(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return ops.transpose(ops.reshape(x, (batch, seq, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def construct(self, x, mask):
        batch, seq, hidden = x.shape
        query = self._heads(self.dense1(x))
        key = self._heads(self.dense2(x))
        value = self._heads(self.dense3(x))
        context = self.core_attention(query, key, value, mask)
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (batch, seq, hidden))
        return self.projection(context)


class MLP(nn.Cell):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.mapping = nn.Dense(cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size, activation="gelu")
        self.projection = nn.Dense(cfg.mlp_ratio * cfg.hidden_size, cfg.hidden_size)

    def construct(self, x):
        return self.projection(self.mapping(x))


class Block(nn.Cell):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm((cfg.hidden_size,))
        self.attention = Attention(cfg)
        self.ln2 = nn.LayerNorm((cfg.hidden_size,))
        self.mlp = MLP(cfg)

    def construct(self, x, mask):
        x = x + self.attention(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Cell):
    """A decoder-only language model: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.blocks = nn.CellList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm((cfg.hidden_size,))
        self.head = nn.Dense(cfg.hidden_size, cfg.vocab_size, has_bias=False)
        self.causal_mask = Tensor(np.tril(np.ones((cfg.seq_length, cfg.seq_length), np.float32)))
        self.positions = Tensor(np.arange(cfg.seq_length, dtype=np.int32))

    def construct(self, input_ids):
        seq = input_ids.shape[1]
        x = self.embedding(input_ids) + self.position_embedding(self.positions[:seq])
        mask = self.causal_mask[:seq, :seq]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


class LMLoss(nn.Cell):
    """Mean next-token cross entropy: (logits (b, s, v), labels (b, s)) -> scalar."""

    def construct(self, logits, labels):
        vocab = logits.shape[-1]
        return ops.cross_entropy(ops.reshape(logits, (-1, vocab)), ops.reshape(labels, (-1,)))


class GPTWithLoss(nn.Cell):
    """The sample GPT and its loss in one cell: (input_ids, labels) -> loss."""

    def __init__(self, net: TinyGPT):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss = LMLoss()

    def construct(self, input_ids, labels):
        return self.loss(self.net(input_ids), labels)


def build(seed: int = 0, **overrides) -> TinyGPT:
    """A TinyGPT with reproducible weights."""
    ms.set_seed(seed)
    return TinyGPT(GPTConfig(**overrides))


# ----------------------------------------------------------------------------- prefix methods
from pet_hooks import PrefixAttention, register_attention  # noqa: E402  (the one PET-aware part)


class CoreAttentionPrefix(PrefixAttention):
    """``CoreAttention(query, key, value, mask)`` with a prefix: (b, h, s, d) tensors, mask 1 = attend."""

    @staticmethod
    def geometry(cell):
        return cell.num_heads, cell.head_dim, cell.num_heads * cell.head_dim

    def construct(self, query, key, value, mask):
        if self.pet_prefix_active:
            key, value = self.prefix_concat(key, value)
            mask = ops.concat((ops.ones((mask.shape[0], self.pet_prefix_len), mask.dtype), mask), -1)
        return self.pet_base_construct(query, key, value, mask)


register_attention(CoreAttention, CoreAttentionPrefix)


# ----------------------------------------------------------------------------- prompt tuning (issue 30 item 2)
from pet_hooks import PromptModel, register_prompt_model  # noqa: E402


class TinyGPTPrompt(PromptModel):
    """``TinyGPT(input_ids)`` with prompt tuning: placeholder ids in front (so the causal mask and the position
    table cover them), their embedding rows replaced by the prompt, their logits dropped."""

    @staticmethod
    def embedding_path(cell):
        return "embedding"

    def construct(self, input_ids):
        if self.pet_prompt_active:
            return self.without_prompt(self.pet_base_construct(self.with_prompt_ids(input_ids)))
        return self.pet_base_construct(input_ids)


register_prompt_model(TinyGPT, TinyGPTPrompt)
