"""The causal-LM loss in row chunks, without the full logits: ``chunked_loss: <rows>`` (opt-in).

On the CPU in graph mode the output head and its cross-entropy hold about 15 float32 copies of the
``[batch x seq, vocab]`` logits (about 1.5 GB for SmolLM2's 49,152 words at 4 x 128 tokens,
docs/memory_and_speed.md), kept from the forward pass for the backward one. With
``chunked_loss: R`` the head and the loss of MindFormers' ``LlamaForCausalLM`` are computed
together, ``R`` rows of hidden states at a time: each chunk's logits, its log-sum-exp and its
gradient ``dL/dh = (softmax - onehot) * mask / sum(mask) @ W`` are computed in the forward pass and
dropped, so only ``dL/dh`` (``[rows, hidden]``) waits for the backward pass, whose custom ``bprop``
scales it by the incoming gradient. The chunks run in a loop on a tensor counter, which graph mode
compiles once: one set of ``[R, vocab]`` kernels (measured on SmolLM2, 30 blocks, 4 x 128: 6,322 ->
4,920 MB peak with ``R = 32``; a Python loop, unrolled into a kernel set per chunk, saved 143 MB). The
loss is MindFormers' ``CrossEntropyLoss`` (``sum(ce * mask) / (sum(mask) + 1e-8)``) and the gradients
equal the unchunked model's within float rounding (tests/surgery/test_chunked_loss.py, both modes).

How it is put on, non-invasively like the adapters: two cells change class, and ``remove`` gives
them back theirs.

* ``lm_head`` moves onto a subclass whose ``construct`` returns its input in training (the model's
  ``construct`` then reshapes the hidden states where it reshaped the logits, and casts them to
  float32), and its own class's ``construct`` otherwise, so evaluation and generation are unchanged.
* ``loss`` moves onto a subclass whose ``construct`` takes those hidden states, the labels and the
  mask and calls :class:`ChunkedHeadLoss`, which reads the head's weight (tied or not).

What it refuses, with the reason: a model that is not a ``LlamaForCausalLM`` (its ``construct`` is
the one whose training path is known to feed the head's output only to the loss), a head with a
bias, a trainable head weight (the chunked backward gives no weight gradient), a head pet_hooks
adapted, a loss configured for per-token sums, sequence pipelines or loss monitoring, and semi/auto
parallel modes (the head's sharding would be lost).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..errors import PetConfigError, UnsupportedCellError
from ..tuners.common import loaded_class, patched_class, strip_attrs

__all__ = ["ChunkedHeadLoss", "HeadLossSwap", "install", "uninstall", "chunk_loss_and_grad"]

_LLAMA = ("mindformers.models.llama.llama", "LlamaForCausalLM")
_LOSS = ("mindformers.core.loss.loss", "CrossEntropyLoss")
_MATMUL_TB = ops.MatMul(transpose_b=True)
_MATMUL = ops.MatMul()
_LOSS_ATTRS = ("pet_chunked_loss", "pet_head_weight")     # what install puts on the loss cell
_ONE_HOT = ops.OneHot()           # MindFormers' _LogSoftmax's
_ONE = Tensor(1.0, ms.float32)
_ZERO = Tensor(0.0, ms.float32)


def chunk_loss_and_grad(h, weight, labels, mask, denom):
    """One chunk: ``(sum of its masked cross-entropies, d loss / d h)`` for ``h`` [rows, hidden] (float32),
    ``weight`` [vocab, hidden], ``labels`` [rows] and ``mask`` [rows]; ``denom`` is the whole batch's
    ``sum(mask) + 1e-8``. Both as MindFormers' ``CrossEntropyLoss`` computes them, ids outside the
    vocabulary included (an all-zero one-hot)."""
    logits = _MATMUL_TB(h, weight)                                     # [rows, vocab]
    top = ops.stop_gradient(logits.max(axis=-1, keepdims=True))
    exp = ops.exp(logits - top)
    total = exp.sum(-1, keepdims=True)
    onehot = _ONE_HOT(labels, logits.shape[-1], _ONE, _ZERO)            # all zeros for an id outside the vocabulary
    picked = (logits * onehot).sum(-1, keepdims=True)
    # -sum(log_softmax * one_hot), MindFormers' NLL: log-sum-exp minus the label's logit, 0 without a label
    ce = ((ops.log(total) + top) * onehot.sum(-1, keepdims=True) - picked).reshape(-1)
    # MindFormers' own backward (its _NLLLoss.bprop): (softmax - one_hot) per masked row, also for a row whose
    # label is outside the vocabulary (a zero loss, but a gradient); kept, so that both train alike
    grad_logits = (exp / total - onehot) * (mask / denom).reshape(-1, 1)
    return (ce * mask).sum(), _MATMUL(grad_logits, weight)


class ChunkedHeadLoss(nn.Cell):
    """``loss(h @ W^T, labels, mask)`` by chunks of ``rows`` rows; the output packs ``dL/dh`` [n, hidden]
    and, as a last row, the loss (MindSpore's graph mode cannot differentiate a cell with a custom bprop
    that returns a tuple, so one tensor carries both; the loss cell reads the loss back)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.zeros = ops.ZerosLike()

    def construct(self, h, labels, mask, weight):
        if weight.dtype != ms.float32:
            weight = ops.cast(weight, ms.float32)
        denom = mask.sum() + 1e-8
        n, hidden = h.shape
        pad = (-n) % self.rows                       # rows that fill the last chunk: masked, no label
        if pad:
            h = ops.concat((h, ops.zeros((pad, hidden), h.dtype)), 0)
            labels = ops.concat((labels, ops.full((pad,), -1, dtype=labels.dtype)), 0)
            mask = ops.concat((mask, ops.zeros((pad,), mask.dtype)), 0)
        chunks = (n + pad) // self.rows
        h = h.reshape(chunks, self.rows, hidden)
        labels = labels.reshape(chunks, self.rows)
        mask = mask.reshape(chunks, self.rows)
        grad = ops.zeros((chunks, self.rows, hidden), ms.float32)
        loss = ops.zeros((), ms.float32)
        # A loop on a tensor counter, not a Python loop: graph mode compiles its body once, so the kernels over
        # [rows, vocab] exist once (the CPU keeps memory per kernel, docs/memory_and_speed.md); unrolled, the
        # chunks' kernels together would hold what the whole logits' do.
        index = Tensor(0, ms.int32)
        while index < chunks:
            part, chunk_grad = chunk_loss_and_grad(h[index], weight, labels[index], mask[index], denom)
            loss = loss + part
            grad[index] = chunk_grad
            index = index + 1
        grad = grad.reshape(-1, hidden)[:n]
        loss = loss / denom
        return ops.concat((grad, ops.broadcast_to(loss.reshape(1, 1), (1, hidden))), 0)

    def bprop(self, h, labels, mask, weight, out, dout):
        # The weight is an input, not an attribute: MindSpore's graph mode fails to build the zero gradient of a
        # parameter read inside a cell with a custom bprop ("The func graph is empty ... zeros_like"). Its gradient
        # here is zero by contract (install refuses a trainable head weight).
        n = h.shape[0]
        return dout[n, 0] * out[:n], self.zeros(labels), self.zeros(mask), self.zeros(weight)


class PassThroughHead:
    """Mixin for ``lm_head`` (``patched_class``): its input in training, its own computation otherwise."""

    def construct(self, x):
        if self.training:
            return x            # the hidden states go on to the chunked loss; no logits are made
        return self.pet_base_construct(x)


class ChunkedLoss:
    """Mixin for ``loss`` (``patched_class``): the hidden states the head passed through go to the chunked loss."""

    def construct(self, logits, label, input_mask):
        hidden = logits         # in training the head passed the hidden states through
        packed = self.pet_chunked_loss(hidden, label, input_mask, self.pet_head_weight)
        return packed[hidden.shape[0], 0]


@dataclass
class HeadLossSwap:
    """What :func:`install` changed, for :func:`uninstall`."""

    model: nn.Cell
    head_class: type
    loss_class: type


def _causal_lm(net: nn.Cell) -> nn.Cell:
    llama = loaded_class(*_LLAMA)
    found = [cell for _, cell in net.cells_and_names()
             if llama is not None and isinstance(cell, llama) and type(cell).construct is llama.construct]
    if len(found) != 1:
        raise UnsupportedCellError(
            f"chunked_loss: {type(net).__name__} holds {len(found)} MindFormers LlamaForCausalLM models (with that "
            f"class's own construct); chunked_loss computes that model's head and loss, so it needs exactly one "
            f"(leave chunked_loss unset for other models)")
    return found[0]


def _refusal(model: nn.Cell) -> Optional[str]:
    """Why the head and loss of ``model`` cannot be chunked, or None."""
    head, loss = getattr(model, "lm_head", None), getattr(model, "loss", None)
    loss_class = loaded_class(*_LOSS)
    if type(loss) is not loss_class:
        return f"its loss is {type(loss).__name__}, not MindFormers' CrossEntropyLoss"
    if loss.calculate_per_token_loss or loss.seq_pipe or loss.need_monitor:
        return "its CrossEntropyLoss returns per-token sums or monitors the local loss"
    if ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel"):
        return "semi/auto parallel mode: the head's sharding would be lost"
    weight = getattr(head, "weight", None)
    if weight is None or getattr(head, "has_bias", False):
        return f"its lm_head ({type(head).__name__}) has no weight or has a bias"
    if weight.requires_grad:
        return f"the head weight {weight.name} trains (the chunked backward gives it no gradient)"
    if type(head).__module__.startswith("pet_hooks."):
        return f"its lm_head is {type(head).__name__}: pet_hooks adapted it"
    if getattr(head, "transpose_b", True) is not True or len(weight.shape) != 2:
        return "its lm_head's weight is not stored [vocab, hidden]"
    return None


def install(net: nn.Cell, rows: int) -> HeadLossSwap:
    """Compute the loss of the ``LlamaForCausalLM`` in ``net`` by chunks of ``rows`` rows (see the module's
    docstring); nothing is changed when it raises."""
    model = _causal_lm(net)
    reason = _refusal(model)
    if reason is not None:
        raise PetConfigError(f"chunked_loss: cannot chunk the loss of {type(model).__name__}: {reason}")
    swap = HeadLossSwap(model, type(model.lm_head), type(model.loss))
    # Plain attributes, not registered: the weight is the head's (or the tied embedding's) parameter already,
    # and registering it on the loss would give the net a second path to it.
    for name, value in zip(_LOSS_ATTRS, (ChunkedHeadLoss(int(rows)), model.lm_head.weight)):
        object.__setattr__(model.loss, name, value)
    model.lm_head.__class__ = patched_class(PassThroughHead, swap.head_class)
    model.loss.__class__ = patched_class(ChunkedLoss, swap.loss_class)
    return swap


def uninstall(swap: Optional[HeadLossSwap]) -> None:
    """Give the head and the loss their classes back (nothing when ``swap`` is None)."""
    if swap is None:
        return
    swap.model.lm_head.__class__ = swap.head_class
    swap.model.loss.__class__ = swap.loss_class
    strip_attrs(swap.model.loss, _LOSS_ATTRS)
