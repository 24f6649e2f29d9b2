"""LoRA on MindFormers' mcore projections: ``ColumnParallelLinear`` and ``RowParallelLinear``.

MindFormers 1.9's current training models (Qwen3, Qwen3-MoE, DeepSeek-V3, from
``mindformers.parallel_core.training_graph``) project with these two cells. Each returns
``(output, bias)``: ``bias`` is the unadded bias when ``skip_bias_add`` is set, else None. The
branch is added to ``output`` after the base computation, exactly where MindFormers' own mcore
LoRA (``tensor_parallel/lora_layers.py``) adds it::

    output, bias = base(x)                       # the base layer's own (sharded) computation
    output = output + scaling * dropout(x) @ A^T @ B^T     (A: [r, in], B: [out, r])

so ``skip_bias_add`` keeps its meaning (the bias is not in ``output`` either way the base
leaves it), and the transpose convention of the base weight (``transpose_b``) does not matter
to the branch: A and B are always stored ``[r, in]`` / ``[out, r]`` (PEFT's and MindFormers'
layout). The branch is computed in the layer's ``compute_dtype`` (MindFormers' ``lora_A`` /
``lora_B`` are linear layers of the same config) and added in the output's dtype.

The base computation is not copied: the generated class calls ``pet_base_construct`` (the
original ``construct``), so the base keeps its ``Morph`` and the shard layout MindFormers gave it.

**Tensor-parallel layout** (``lora/layout.py``). Each adapted cell gets its own two MatMul
primitives, sharded as MindFormers (``ColumnParallelLinearWithLoRA``: A is a ``LinearNoTP``, B a
``ColumnParallelLinear``; ``RowParallelLinearWithLoRA``: A a ``RowParallelLinear``, B a
``LinearNoTP``) and PEFT do. With ``d = data_parallel * context_parallel`` (the token rows) and
``t = tensor_model_parallel``:

==================  =========================  =========================
base                ``x @ A^T`` (A ``[r, in]``)  ``h @ B^T`` (B ``[out, r]``)
==================  =========================  =========================
ColumnParallel      ``((d, 1), (1, 1))``        ``((d, 1), (t, 1))``  B split along out, as W
RowParallel         ``((d, t), (1, t))``        ``((d, 1), (1, 1))``  A split along in, as W;
                                                                      the partial sums are reduced
LinearNoTP          ``((d, 1), (1, 1))``        ``((d, 1), (1, 1))``
SequenceParallel    ``((d*t, 1), (1, 1))``      ``((d*t, 1), (1, 1))``  (DeepSeek-V3's MLA down projection,
                                                                      shared experts)
==================  =========================  =========================

Under semi-auto parallel MindSpore inserts the AllReduce after the row-parallel ``x @ A^T``
(its contracted dimension is split), the reduce the base layer does after its own matmul.
The strategies are set whatever the parallel mode (a primitive's strategy is ignored outside
(semi-)auto parallel), read from the cell's ``config`` at ``apply`` time.

**Mixture-of-experts.** The routed experts of Qwen3-MoE / DeepSeek-V3 (``FFNGroupedGEMM``) are
adapted in weight space, one pair per expert (``lora/experts.py``); their attention projections
and shared experts are the projections here.

Not adapted (the reason is the error ``apply`` gives): a layer whose weight is passed at call
time (``skip_weight_param_allocation``, e.g. an output layer tied to the embedding), a
row-parallel layer with ``sequence_parallel`` (its output is scattered along the sequence), and
subclasses whose ``construct`` or ``shard`` pet_hooks does not know.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

from mindspore import nn, ops

from . import layout as lora_layout

__all__ = ["LoraColumnParallelLinear", "LoraRowParallelLinear", "is_mcore_linear", "mixin_for",
           "in_out_channels", "strategies"]

_LAYERS = "mindformers.parallel_core.training_graph.tensor_parallel.layers"


class _McoreBranch:
    """The branch on an mcore projection's input, shaped like the base output."""

    def _mcore_branch(self, input_, like):
        x_shape = ops.shape(input_)
        h = ops.reshape(ops.cast(input_, self.lora_compute_dtype), (-1, x_shape[-1]))
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        h = self.pet_lora_matmul_a(h, ops.cast(self.lora_A * ops.cast(self.pet_lora_scale, ops.dtype(self.lora_A)),
                                               self.lora_compute_dtype))
        h = self.pet_lora_matmul_b(h, ops.cast(self.lora_B, self.lora_compute_dtype))
        return ops.cast(ops.reshape(h, ops.shape(like)), ops.dtype(like))


class LoraColumnParallelLinear(_McoreBranch):
    """``ColumnParallelLinear`` (MindFormers 1.9, training graph) with the LoRA branch added to its output."""

    pet_hooks_lora = True

    def construct(self, input_, weight=None):
        output, bias = self.pet_base_construct(input_, weight)
        output = output + self._mcore_branch(input_, output)
        return output, bias


class LoraRowParallelLinear(_McoreBranch):
    """``RowParallelLinear`` (MindFormers 1.9, training graph) with the LoRA branch added to its output."""

    pet_hooks_lora = True

    def construct(self, input_):
        output, bias = self.pet_base_construct(input_)
        output = output + self._mcore_branch(input_, output)
        return output, bias


def _layers():
    # Only look if MindFormers' mcore layers are already imported: a net cannot hold one otherwise.
    return sys.modules.get(_LAYERS)


def _known_classes():
    """{class: (mixin, kind)} for the mcore projections whose construct and shard pet_hooks knows."""
    layers = _layers()
    if layers is None:
        return {}
    return {layers.ColumnParallelLinear: (LoraColumnParallelLinear, "column"),
            layers.LinearNoTP: (LoraColumnParallelLinear, "replicated"),
            layers.SequenceParallelLinear: (LoraColumnParallelLinear, "sequence"),
            layers.RowParallelLinear: (LoraRowParallelLinear, "row")}


def is_mcore_linear(cell: nn.Cell) -> bool:
    """True for any ``ColumnParallelLinear`` / ``RowParallelLinear`` (subclasses included)."""
    layers = _layers()
    return layers is not None and isinstance(cell, (layers.ColumnParallelLinear, layers.RowParallelLinear))


def _kind(cell: nn.Cell) -> Tuple[Optional[type], Optional[str], Optional[type]]:
    known = _known_classes()
    for klass in type(cell).__mro__:
        if klass in known:
            return known[klass][0], known[klass][1], klass
    return None, None, None


def mixin_for(cell: nn.Cell) -> Tuple[Optional[type], Optional[str]]:
    """(mixin, None) when LoRA can adapt the mcore projection ``cell``, else (None, reason)."""
    mixin, kind, base = _kind(cell)
    name = type(cell).__name__
    if mixin is None:
        return None, f"{name} is an mcore projection pet_hooks does not know"
    for method in ("construct", "shard"):
        if getattr(type(cell), method) is not getattr(base, method):
            return None, (f"{name} overrides {base.__name__}.{method}, whose computation or layout pet_hooks "
                          f"cannot reproduce")
    if getattr(cell, "skip_weight_param_allocation", False):
        return None, (f"{name} has skip_weight_param_allocation (its weight is passed at call time, e.g. an output "
                      f"layer tied to the embedding): there is no weight of its own to adapt")
    if kind == "row" and getattr(cell, "sequence_parallel", False):
        return None, f"{name} with sequence_parallel scatters its output along the sequence; not supported"
    return mixin, None


def in_out_channels(cell: nn.Cell) -> Tuple[int, int]:
    return int(cell.input_size), int(cell.output_size)


def _sizes(cell: nn.Cell) -> Tuple[int, int]:
    """(token-row split d = dp * cp, tensor-parallel t) from the cell's TransformerConfig."""
    config = cell.config

    def size(attr):
        value = getattr(config, attr, None)
        return int(value) if value else 1

    return size("data_parallel_size") * size("context_parallel_size"), size("tensor_model_parallel_size")


def strategies(cell: nn.Cell) -> lora_layout.Strategies:
    """The in-strategies of ``x @ A^T`` and ``h @ B^T`` for an mcore projection (the table above)."""
    rows, tp = _sizes(cell)
    kind = _kind(cell)[1]
    if kind == "column":
        return lora_layout.from_splits(rows, 1, tp)
    if kind == "row":
        return lora_layout.from_splits(rows, tp, 1)
    if kind == "sequence":          # weight replicated, the input's sequence split by cp * tp
        return lora_layout.from_splits(rows * tp, 1, 1)
    return lora_layout.from_splits(rows, 1, 1)


