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

Each base class of the table is one :class:`McoreLinearKind` (the dispatcher asks the most
specific first: ``SequenceParallelLinear`` and ``LinearNoTP`` subclass ``ColumnParallelLinear``).
"""
from __future__ import annotations

from typing import Optional, Tuple

from mindspore import nn, ops

from ..common import loaded_class
from . import layout as lora_layout
from .kind import LoraKind
from .scale import scaled_a, scaled_bias

__all__ = ["LoraColumnParallelLinear", "LoraRowParallelLinear", "McoreLinearKind", "KINDS"]

_LAYERS = "mindformers.parallel_core.training_graph.tensor_parallel.layers"


class _McoreBranch:
    """The branch on an mcore projection's input, shaped like the base output."""

    def _mcore_branch(self, input_, like):
        x_shape = ops.shape(input_)
        h = ops.reshape(ops.cast(input_, self.lora_compute_dtype), (-1, x_shape[-1]))
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        h = self.pet_lora_matmul_a(h, ops.cast(scaled_a(self), self.lora_compute_dtype))
        h = self.pet_lora_matmul_b(h, ops.cast(self.lora_B, self.lora_compute_dtype))
        if self.lora_B_bias is not None:        # lora_bias (added to output, whatever skip_bias_add does)
            h = h + scaled_bias(self, self.lora_compute_dtype)
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


def _sizes(cell: nn.Cell) -> Tuple[int, int]:
    """(token-row split d = dp * cp, tensor-parallel t) from the cell's TransformerConfig."""
    config = cell.config

    def size(attr):
        value = getattr(config, attr, None)
        return int(value) if value else 1

    return size("data_parallel_size") * size("context_parallel_size"), size("tensor_model_parallel_size")


class McoreLinearKind(LoraKind):
    """One mcore projection class of the table above: its mixin and how its branch is laid out.

    ``splits(rows, tp)`` gives the ``(rows, k, n)`` of :func:`lora_layout.from_splits`: the token rows, the
    weight's input and output splits.
    """

    extra_attrs = lora_layout.PRIMITIVE_ATTRS
    rows_reason = "MindFormers' mcore layers take sequence-major input (rows are not the leading axis)"
    is_linear = True
    lora_bias = True

    def __init__(self, class_name: str, mixin: type, splits, row_parallel: bool = False) -> None:
        self.class_name = class_name
        self.name = f"MindFormers' {class_name}"
        self.mixin = mixin
        self.splits = splits
        self.row_parallel = row_parallel

    def base_class(self) -> Optional[type]:
        """The class, when MindFormers' mcore layers are already imported (a net cannot hold one otherwise)."""
        return loaded_class(_LAYERS, self.class_name)

    def recognises(self, cell: nn.Cell) -> bool:
        base = self.base_class()
        return base is not None and isinstance(cell, base)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        base, name = self.base_class(), type(cell).__name__
        for method in ("construct", "shard"):
            if getattr(type(cell), method) is not getattr(base, method):
                return (f"{name} overrides {base.__name__}.{method}, whose computation or layout pet_hooks "
                        f"cannot reproduce")
        if getattr(cell, "skip_weight_param_allocation", False):
            return (f"{name} has skip_weight_param_allocation (its weight is passed at call time, e.g. an output "
                    f"layer tied to the embedding): there is no weight of its own to adapt")
        if self.row_parallel and getattr(cell, "sequence_parallel", False):
            return f"{name} with sequence_parallel scatters its output along the sequence; not supported"
        return None

    def io_channels(self, cell: nn.Cell) -> Tuple[int, int]:
        return int(cell.input_size), int(cell.output_size)

    def compute_dtype(self, cell: nn.Cell):
        return cell.compute_dtype          # config.compute_dtype (MindFormers' lora_A / lora_B are layers of it)

    def strategies(self, cell: nn.Cell) -> lora_layout.Strategies:
        """The in-strategies of ``x @ A^T`` and ``h @ B^T`` (the table above)."""
        rows, tp = _sizes(cell)
        return lora_layout.from_splits(*self.splits(rows, tp))

    def add_extras(self, cell: nn.Cell) -> None:
        lora_layout.add_primitives(cell, self.strategies(cell))


#: the most specific first (the dispatcher asks them in this order)
KINDS = (
    # weight replicated, the input's sequence split by cp * tp
    McoreLinearKind("SequenceParallelLinear", LoraColumnParallelLinear, lambda rows, tp: (rows * tp, 1, 1)),
    McoreLinearKind("LinearNoTP", LoraColumnParallelLinear, lambda rows, tp: (rows, 1, 1)),
    McoreLinearKind("ColumnParallelLinear", LoraColumnParallelLinear, lambda rows, tp: (rows, 1, tp)),
    McoreLinearKind("RowParallelLinear", LoraRowParallelLinear, lambda rows, tp: (rows, tp, 1), row_parallel=True),
)
