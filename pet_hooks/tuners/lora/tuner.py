"""LoRA injected into ``nn.Dense``, MindFormers' ``Linear`` (legacy) and ``ColumnParallelLinear`` /
``RowParallelLinear`` (mcore), ``nn.MultiheadAttention`` and the embeddings, by swapping classes.

Graph mode compiles the *source* of ``type(cell).construct`` and ignores a wrapped
method, so each matched cell is moved onto a generated subclass (``LoraDense_of_Dense``)
whose ``construct`` is the base layer's own computation with the LoRA branch added before
the activation::

    y = act(x @ W^T + b + scaling * dropout(x) @ A^T @ B^T)

The base parameters stay where they were (same objects, same names); the deltas are new
Parameters named ``<cell path>.lora_A`` ([r, in]) and ``<cell path>.lora_B`` ([out, r], zeros).
Undo is the mirror: the original class back, the added attributes deleted.

A cell whose parent reads its weights instead of calling it (``out_proj`` inside
``nn.MultiheadAttention``) would never run its branch; for those the parent is patched too,
computing with the effective weight (``lora/mha.py``, which also adapts the attention cell's
own input projection). The mcore projections return ``(output, bias)`` and carry a tensor-parallel
layout; their branch and its sharded primitives are in ``lora/mcore.py``. Embeddings (``nn.Embedding``,
MindFormers' ``LlamaEmbedding`` and mcore ``VocabParallelEmbedding``) take PEFT's embedding LoRA, A and B
named ``lora_embedding_A`` / ``_B`` (``lora/embedding.py``). This module chooses between them by the base
cell's class (``_mixin_for``) and keeps the one flow for all.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ...utils.ms_compat import write_values
from ...config.pet_config import LoraConfig
from ...errors import AdapterFileError, PetConfigError, UnsupportedCellError
from ...matching.cells import is_excluded, select_cells
from . import (dora as lora_dora, embedding as lora_embedding, experts as lora_experts, inits as lora_init,
               layout as lora_layout, mcore as lora_mcore, mha as lora_mha)
from ..base import Injection, Tuner
from ..common import init_rng, inject_all, patched_class, restore
from .scale import add_scale, scaled_a

__all__ = ["LoraTuner", "LoraTargets", "LoraInjection", "LoraLayer", "is_lora_cell", "scaled_a"]

logger = logging.getLogger("pet_hooks")

_MATMUL_TB = ops.MatMul(transpose_b=True)
# Attributes a LoRA cell gains; removed again by eject() in the same order.
_ADDED_ATTRS = ("lora_A", "lora_B", "lora_dropout", "lora_scaling", "lora_compute_dtype", "pet_lora_scale",
                "pet_lora_rank_scaling",
                "pet_lora_in", "pet_lora_out", "lora_A_w2", "lora_B_w2", "pet_lora_bmm", lora_dora.MAGNITUDE,
                lora_dora.MERGED_NORM, lora_init.RESIDUAL_ATTR) + lora_layout.PRIMITIVE_ATTRS + lora_embedding.ADDED_ATTRS


class LoraLayer:
    """Mixin for the generated classes: the branch, shared by every supported base layer."""

    pet_hooks_lora = True  # marker: "this instance was patched by pet_hooks"

    def _lora_branch(self, x2):
        """``scaling * dropout(x2) @ A^T @ B^T`` for 2-D ``x2``, in the branch compute dtype.

        The scaling multiplies A (r x in values) rather than the branch output (tokens x out
        values): the same product, one elementwise pass over the layer's output fewer in the
        forward and in the backward pass.
        """
        h = ops.cast(x2, self.lora_compute_dtype)
        if self.lora_dropout is not None:       # None when the rate is 0: no cell to build or run
            h = self.lora_dropout(h)
        h = _MATMUL_TB(h, ops.cast(scaled_a(self), self.lora_compute_dtype))
        return _MATMUL_TB(h, ops.cast(self.lora_B, self.lora_compute_dtype))


    def _sharded_branch(self, x2):
        """``_lora_branch`` on the cell's own (sharded) MatMul primitives."""
        h = ops.cast(x2, self.lora_compute_dtype)
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        h = self.pet_lora_matmul_a(h, ops.cast(scaled_a(self), self.lora_compute_dtype))
        return self.pet_lora_matmul_b(h, ops.cast(self.lora_B, self.lora_compute_dtype))


class LoraDense(LoraLayer):
    """``nn.Dense.construct`` (MindSpore 2.9) with the branch added before the activation."""

    def construct(self, x):
        x_shape = self.shape_op(x)
        x2 = self.reshape(x, (-1, x_shape[-1]))
        out = self.matmul(x2, self.weight)
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        out = out + ops.cast(self._lora_branch(x2), ops.dtype(out))
        if self.activation_flag:
            out = self.activation(out)
        if len(x_shape) != 2:
            out = self.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],))
        return out


class LoraLinear(LoraLayer):
    """``mindformers.modules.layers.Linear.construct`` (1.9, no experts) with the branch added.

    The branch runs on the cell's own MatMuls (``pet_lora_matmul_a`` / ``_b``), sharded from the
    base matmul's strategy (``lora/layout.py``).
    """

    def construct(self, x, group_list=None):
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        x = self.reshape(x, (-1, self.in_channels))
        ori_dtype = ops.dtype(x)
        weight = self.cast(self.weight, self.dtype)
        x = self.cast(x, self.dtype)
        out = self.matmul(x, weight)
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.dtype))
        out = out + self.cast(self._sharded_branch(x), self.dtype)
        if self.activation_flag:
            out = self.activation(out)
        out = ops.cast(out, ori_dtype)
        return self.reshape(out, out_shape)


def _mindformers_linear() -> Optional[type]:
    # Only look if MindFormers is already imported: importing it costs seconds, and a
    # net cannot hold a Linear unless it was.
    module = sys.modules.get("mindformers.modules.layers")
    return getattr(module, "Linear", None)


def _mixin_for(cell: nn.Cell) -> Tuple[Optional[type], Optional[str]]:
    """(mixin, None) when LoRA can adapt ``cell``, else (None, reason)."""
    linear = _mindformers_linear()
    if lora_mha.is_mha(cell):
        reason = lora_mha.mha_reason(cell)
        return (None, reason) if reason else (lora_mha.LoraMultiheadAttention, None)
    if lora_mcore.is_mcore_linear(cell):
        return lora_mcore.mixin_for(cell)
    if lora_experts.is_grouped_experts(cell):
        reason = lora_experts.reason(cell)
        return (None, reason) if reason else (lora_experts.LoraGroupedExperts, None)
    if lora_embedding.is_embedding(cell):
        return lora_embedding.mixin_for(cell)
    if isinstance(cell, nn.Dense):
        base, mixin = nn.Dense, LoraDense
    elif linear is not None and isinstance(cell, linear):
        if cell.expert_flag or cell.use_gmm:
            return None, "Linear with experts (expert_num > 1 or use_gmm) is not supported"
        base, mixin = linear, LoraLinear
    else:
        return None, ("LoRA adapts mindspore.nn.Dense, mindspore.nn.MultiheadAttention, "
                      "mindformers.modules.layers.Linear, MindFormers' ColumnParallelLinear / RowParallelLinear / "
                      "FFNGroupedGEMM (grouped MoE experts) and the embeddings " + lora_embedding.SUPPORTED)
    if type(cell).construct is not base.construct:
        return None, (f"{type(cell).__name__} overrides {base.__name__}.construct, whose computation "
                      f"pet_hooks cannot reproduce")
    return mixin, None


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    """None when LoRA can adapt ``cell``, else the reason it cannot."""
    return _mixin_for(cell)[1]


def _can_adapt_with(cell: nn.Cell, cfg: LoraConfig) -> Optional[str]:
    """``_can_adapt``, and what ``cfg``'s DoRA and init need (lora/dora.py, lora/inits.py)."""
    mixin, reason = _mixin_for(cell)
    plain = (LoraDense, LoraLinear)
    return reason or lora_dora.reason(mixin, cfg, plain) or lora_init.reason(cfg, mixin, plain,
                                                                              lora_experts.LoraGroupedExperts)


def is_lora_cell(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_hooks_lora", False) is True


class LoraTargets(list):
    """The ``[(path, cell)]`` that ``select_targets`` chose, plus ``parents``: path -> the parent
    of each cell that its parent reads instead of calling (``out_proj`` in a MultiheadAttention)."""

    def __init__(self, items, parents: Dict[str, nn.Cell]):
        super().__init__(items)
        self.parents = parents


def select_targets(net: nn.Cell, cfg: LoraConfig, include_adapted: bool = False) -> LoraTargets:
    """The cells ``cfg`` selects; raises ValueError before anything is changed.

    A selected ``nn.MultiheadAttention`` brings its ``out_proj`` along (PEFT's rule) unless
    ``exclude_layers`` excludes it. ``include_adapted`` (another adapter of a LoRA net) selects
    cells LoRA already adapted too.
    """
    def can_adapt(cell):
        return None if include_adapted and is_lora_cell(cell) else _can_adapt_with(cell, cfg)

    chosen = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=can_adapt,
                          skip=lambda path, cell: (is_lora_cell(cell) and not include_adapted)
                          or path.rsplit(".", 1)[-1] == "lora_dropout")
    paths = {path for path, _ in chosen}
    targets: List[Tuple[str, nn.Cell]] = []
    for path, cell in chosen:
        targets.append((path, cell))
        out_path = f"{path}.out_proj"
        if lora_mha.is_mha(cell) and out_path not in paths and not is_excluded(out_path, cfg.exclude_layers):
            targets.append((out_path, cell.out_proj))
            paths.add(out_path)
    by_path = dict(net.cells_and_names())
    parents = {}
    for path, cell in targets:
        unreached = lora_embedding.is_embedding(cell) and lora_embedding.unreached_reason(net, cell)
        if unreached:
            raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) cannot take LoRA: {unreached}")
        parent_path, _, leaf = path.rpartition(".")
        parent = by_path.get(parent_path)
        if lora_mha.reads_child(parent, leaf):
            parents[path] = parent
            if cfg.use_dora:
                raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) is read by its parent "
                                           f"{type(parent).__name__}: DoRA (use_dora: true) is not supported there")
    return LoraTargets(targets, parents)


def io_channels(cell: nn.Cell) -> Tuple[int, int]:
    """(in, out) of the projection the branch of ``cell`` adds to."""
    if lora_mha.is_mha(cell):
        return lora_mha.in_out_channels(cell)
    if lora_mcore.is_mcore_linear(cell):
        return lora_mcore.in_out_channels(cell)
    if lora_experts.is_grouped_experts(cell):        # per expert, weight1 (gate and up)
        _, hidden, ffn = lora_experts.sizes(cell)
        return hidden, 2 * ffn
    if lora_embedding.is_embedding(cell):            # A [r, num_embeddings], B [dim, r]
        return lora_embedding.io_channels(cell)
    return int(cell.in_channels), int(cell.out_channels)


def base_weight(cell: nn.Cell) -> Parameter:
    """The base weight the branch of ``cell`` adds to (``in_proj_weight`` for an attention cell, the table of
    an embedding)."""
    if lora_mha.is_mha(cell):
        return cell.in_proj_weight
    return lora_embedding.base_weight(cell) if lora_embedding.is_embedding(cell) else cell.weight


def takes_dropout(cell: nn.Cell, read_by_parent: bool) -> bool:
    """False where ``lora_dropout`` is not applied, as in PEFT: a delta folded into a weight (no branch input
    of its own) and an embedding (PEFT never calls the dropout it builds there)."""
    return not (lora_mha.delta_in_weight(cell, read_by_parent) or lora_embedding.is_embedding(cell))


def initial_values(cell: nn.Cell, cfg: LoraConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """{"lora_A", "lora_B"}: the values a new adapter (``add_adapter``) starts the cell with, as ``apply`` would
    draw them (an embedding's are PEFT's: A zeros, B normal)."""
    inner, outer = io_channels(cell)
    if lora_embedding.is_embedding(cell):
        a, b = lora_embedding.initial_arrays(cfg, rng, inner, outer)
        return {"lora_A": a, "lora_B": b}
    return {"lora_A": init_a(rng, cfg, inner), "lora_B": np.zeros((outer, cfg.lora_rank), np.float32)}


def _compute_dtype(cell: nn.Cell, cfg: LoraConfig):
    if cfg.compute_dtype is not None:
        return getattr(mstype, cfg.compute_dtype)
    # Linear computes in its compute_dtype (mcore layers: config.compute_dtype); Dense in its weight's
    # dtype (x must match it).
    if lora_mcore.is_mcore_linear(cell) or lora_experts.is_grouped_experts(cell):
        return cell.compute_dtype
    return cell.dtype if _mixin_for(cell)[0] is LoraLinear else base_weight(cell).dtype


def init_a(rng: np.random.Generator, cfg: LoraConfig, in_channels: int) -> np.ndarray:
    shape = (cfg.lora_rank, in_channels)
    if cfg.lora_a_init == "normal":  # MindSpore's 'normal' initializer, as MindFormers uses
        return rng.normal(0.0, 0.01, size=shape).astype(np.float32)
    # kaiming_uniform(a=sqrt(5)) as PEFT and mindpet: bound = sqrt(6 / ((1 + a^2) * fan_in))
    bound = math.sqrt(6.0 / ((1.0 + 5.0) * in_channels))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


@dataclass
class LoraInjection(Injection):
    """An Injection that may also have patched the cell's parent (which reads the cell's weights).

    ``parent_original`` is the parent's class before, when this injection swapped it (else None).
    """

    parent: Optional[nn.Cell] = None
    parent_original: Optional[type] = None
    #: the adapters whose A rows / B columns the cell's ``lora_A`` / ``lora_B`` hold, in order (``lora_slots``)
    occupants: List[str] = field(default_factory=list)
    base_init: Optional[lora_init.BaseInit] = None     # PiSSA / OLoRA: the original weight, A0, B0


def _inject(targets: List[Tuple[str, nn.Cell]], cfg: LoraConfig) -> List[Injection]:
    """Give every target its LoRA branch. All or nothing: on error the done part is undone."""
    rng = init_rng(cfg)
    parents: Dict[str, nn.Cell] = getattr(targets, "parents", {})
    records = inject_all(targets, _ADDED_ATTRS,
                         lambda index, path, cell: _add_branch(path, cell, cfg, rng, path in parents),
                         mixin_of=lambda cell: lora_dora.mixin_for(_mixin_for(cell)[0], cfg))
    done: List[LoraInjection] = []
    try:
        for record in records:
            done.append(LoraInjection(**vars(record)))
            done[-1].base_init = lora_init.write_residual(record.cell)
            parent = parents.get(record.path)
            if parent is not None:
                original = type(parent)
                swapped = lora_mha.attach_out_proj(parent, patched_class)
                done[-1].parent, done[-1].parent_original = parent, (original if swapped else None)
    except BaseException:
        for record in reversed(done):
            _eject(record)
        for record in reversed(records[len(done):]):
            restore(record)
        raise
    weight_read = [r.path for r in records if lora_mha.delta_in_weight(r.cell, r.path in parents)]
    if weight_read and cfg.lora_dropout > 0:
        logger.warning("pet_hooks: lora_dropout %s is not applied on %s: the delta goes into the weight that "
                       "MultiheadAttention reads (as in PEFT)", cfg.lora_dropout, ", ".join(weight_read))
    embeddings = [r.path for r in records if lora_embedding.is_embedding(r.cell)]
    if embeddings and cfg.lora_dropout > 0:
        logger.warning("pet_hooks: lora_dropout %s is not applied on the embedding(s) %s (as in PEFT)",
                       cfg.lora_dropout, ", ".join(embeddings))
    return done


_NUMPY_DTYPES = {mstype.float32: np.float32, mstype.float16: np.float16}


def param_data(values: np.ndarray, dtype):
    """``values`` as data for a Parameter of ``dtype``.

    A NumPy array where NumPy has the dtype: a Parameter built from one costs half as much as
    one built from a Tensor, which is most of apply()'s time on a deep model.
    """
    if dtype in _NUMPY_DTYPES:
        return values.astype(_NUMPY_DTYPES[dtype], copy=False)
    return Tensor(values).astype(dtype)


def _add_branch(path: str, cell: nn.Cell, cfg: LoraConfig, rng: np.random.Generator,
                read_by_parent: bool = False) -> List[Parameter]:
    if lora_experts.is_grouped_experts(cell) or lora_embedding.is_embedding(cell):
        # experts: one pair per expert and weight, in weight space; embeddings: PEFT's names and init
        module = lora_experts if lora_experts.is_grouped_experts(cell) else lora_embedding
        params = module.add_branch(path, cell, cfg, rng, param_data)
        cell.lora_dropout = None
        add_scale(path, cell, cfg)
        cell.lora_compute_dtype = _compute_dtype(cell, cfg)
        return params
    in_ch, out_ch = io_channels(cell)
    param_dtype = getattr(mstype, cfg.param_init_type)
    a, b, residual = lora_init.initial_arrays(cell, cfg, rng, in_ch, out_ch, lambda: init_a(rng, cfg, in_ch))
    lora_a, lora_b = param_data(a, param_dtype), param_data(b, param_dtype)
    # Explicit names: parameters added after construction get no path prefix.
    cell.lora_A = Parameter(lora_a, name=f"{path}.lora_A", requires_grad=True)
    cell.lora_B = Parameter(lora_b, name=f"{path}.lora_B", requires_grad=True)
    cell.lora_dropout = None
    # A branch folded into a weight (attention cells) has no input of its own to drop.
    if cfg.lora_dropout > 0 and takes_dropout(cell, read_by_parent):
        cell.lora_dropout = nn.Dropout(p=float(cfg.lora_dropout))
        cell.lora_dropout.set_train(cell.training)
    add_scale(path, cell, cfg)
    cell.lora_compute_dtype = _compute_dtype(cell, cfg)
    if lora_mha.is_mha(cell):
        cell.pet_lora_in, cell.pet_lora_out = True, False
    if lora_mcore.is_mcore_linear(cell):
        lora_layout.add_primitives(cell, lora_mcore.strategies(cell))
    elif _mixin_for(cell)[0] is LoraLinear:
        lora_layout.add_primitives(cell, lora_layout.from_matmul(cell))
    if residual is not None:        # written by _inject once every cell is patched (all or nothing)
        cell.__dict__[lora_init.RESIDUAL_ATTR] = residual
    if cfg.use_dora:
        weight = lora_init.weight_out_in(cell) if residual is None else residual
        cell.lora_magnitude_vector = lora_dora.magnitude(path, weight, a, b, cfg.scaling, param_data, param_dtype)
        return [cell.lora_A, cell.lora_B, cell.lora_magnitude_vector]
    return [cell.lora_A, cell.lora_B]


def _eject(record: Injection) -> None:
    """The mirror of inject for one cell (and of the patch of its parent, if it made one)."""
    parent = getattr(record, "parent", None)
    if parent is not None:
        lora_mha.detach_out_proj(parent, record.parent_original)
    lora_init.restore_base(getattr(record, "base_init", None))
    restore(record)


def _delta_in_weight_layout(cell: nn.Cell) -> np.ndarray:
    """``B @ (scaling * A)`` (float32, each rank row its own scaling), transposed when the weight is stored
    [in, out]."""
    a = cell.lora_A.astype(mstype.float32).asnumpy()
    b = cell.lora_B.astype(mstype.float32).asnumpy()
    delta = b @ (cell.pet_lora_rank_scaling[:, None] * a)
    if getattr(cell, "transpose_b", True) is False:
        delta = delta.T
    return delta


class LoraTuner(Tuner):
    """LoRA as a :class:`~pet_hooks.tuners.base.Tuner`: branches on Dense / Linear / the mcore projections /
    MultiheadAttention / the embeddings."""

    label = "LoRA"
    pet_types = ("lora",)
    # Turning the branch on or off (disable_adapters, merge/unmerge) only writes pet_lora_scale's
    # value: the graph stays the same, so graph mode needs no recompile.
    switch_is_data = True
    can_merge = True
    peft_type = "LORA"
    peft_weights = {"lora_A": "lora_A", "lora_B": "lora_B"}
    peft_bare_weights = {lora_dora.MAGNITUDE: lora_dora.MAGNITUDE}     # DoRA's, saved without ".weight"
    # an embedding's A and B, PEFT's names, saved bare too: the second layout a module's tensors may form
    peft_embedding_weights = {leaf: leaf for leaf in lora_embedding.PEFT_LEAVES}
    # legacy (mindpet LoRADense) and mcore (lora_layers.py: lora_A / lora_B are LinearNoTP / ColumnParallelLinear cells)
    mindformers_weights = {"mindpet_delta_lora_a": "lora_A", "mindpet_delta_lora_b": "lora_B",
                           "lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def base_weight(self, cell: nn.Cell) -> Optional[Parameter]:
        return None if lora_experts.is_grouped_experts(cell) else base_weight(cell)

    def peft_layouts(self):
        """``lora_A.weight`` / ``lora_B.weight`` (linear layers), or an embedding's bare ``lora_embedding_A`` / ``_B``."""
        return [(self.peft_weights, self.peft_key_tail), (self.peft_embedding_weights, "")]

    def select_targets(self, net: nn.Cell, cfg: LoraConfig) -> LoraTargets:
        return select_targets(net, cfg)

    def inject(self, targets, cfg: LoraConfig) -> List[Injection]:
        return _inject(targets, cfg)

    def eject(self, record: Injection) -> None:
        _eject(record)

    def deltas_of(self, record: Injection) -> List[Parameter]:
        return list(record.params)

    def set_active(self, records, active: bool) -> None:
        """Write each cell's scale: its rows' scalings, or 0. Data, not structure."""
        for record in records:
            cell = record.cell
            write_values(cell.pet_lora_scale, cell.pet_lora_rank_scaling[:, None] * (1.0 if active else 0.0))

    def switch_parameters(self, records) -> List[Parameter]:
        return [record.cell.pet_lora_scale for record in records]

    def grad_sentinels(self, record: Injection) -> List[Parameter]:
        """``lora_B``: it starts at zero and gets a gradient from the first step whenever the branch
        is reached (A's gradient is ``B^T @ ...``, zero until B moves); a B with no gradient stays
        exactly zero even under weight decay. An embedding starts with A at zero and B random, so there
        it is ``lora_A``."""
        if lora_experts.is_grouped_experts(record.cell):
            return [record.cell.lora_B, record.cell.lora_B_w2]
        if lora_embedding.is_embedding(record.cell):     # PEFT's embedding init is the other way round
            return [record.cell.lora_A]
        return [record.cell.lora_B]

    def io_channels(self, record: Injection) -> Tuple[int, int]:
        """(in, out) of the projection the branch adds to (an attention cell's packed in-projection)."""
        return io_channels(record.cell)

    def weight_deltas(self, record: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        if lora_experts.is_grouped_experts(record.cell):
            return lora_experts.weight_deltas(record.cell)
        if lora_dora.is_dora(record.cell):
            return lora_dora.weight_deltas(record.cell)
        if lora_embedding.is_embedding(record.cell):
            return lora_embedding.weight_deltas(record.cell)
        return [(base_weight(record.cell), _delta_in_weight_layout(record.cell))]

    def merge_weights(self, record: Injection) -> List[Parameter]:
        if lora_experts.is_grouped_experts(record.cell):
            return [record.cell.weight1, record.cell.weight2]
        return [base_weight(record.cell)]

    def weight_readers(self, net: nn.Cell, record: Injection) -> List[str]:
        """An mcore output layer that computes with an adapted embedding's weight passed at call time."""
        return lora_embedding.weight_readers(net, record.cell) if lora_embedding.is_embedding(record.cell) else []

    def group_anchor(self, record: Injection) -> Optional[Parameter]:
        """The layer's ``weight``; an embedding's table, whatever its attribute is called."""
        if lora_embedding.is_embedding(record.cell):
            return lora_embedding.base_weight(record.cell)
        return super().group_anchor(record)

    def merge(self, record: Injection, sign: int) -> None:
        if lora_dora.is_dora(record.cell):      # multiplicative: W' = f (W + s B A), unmerged with the kept norms
            lora_dora.merge(record.cell, sign)
        else:
            super().merge(record, sign)

    # -- Hugging Face PEFT's adapter_config.json ------------------------------------------------
    def peft_fields(self, cfg: LoraConfig) -> dict:
        return {"lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "r": cfg.lora_rank,
                "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora, "init_lora_weights": cfg.init_lora_weights}

    def check_peft_fields(self, doc, config_path: str) -> None:
        for key in ("r", "lora_alpha"):
            if not isinstance(doc.get(key), (int, float)) or isinstance(doc.get(key), bool):
                raise AdapterFileError(f"{config_path}: field {key!r} is missing or not a number")
        try:
            LoraConfig(target_modules=".*", init_lora_weights=doc.get("init_lora_weights", True),
                       use_dora=bool(doc.get("use_dora")))
        except PetConfigError as err:
            raise AdapterFileError(f"{config_path}: {err}") from None

    def config_from_peft(self, doc, target_modules: List[str]) -> LoraConfig:
        return LoraConfig(pet_type="lora", lora_rank=int(doc["r"]), lora_alpha=doc["lora_alpha"],
                          lora_dropout=float(doc.get("lora_dropout") or 0.0),
                          target_modules=target_modules, use_rslora=bool(doc.get("use_rslora")),
                          use_dora=bool(doc.get("use_dora")), init_lora_weights=doc.get("init_lora_weights", True))

    def peft_mismatch(self, doc, config_path: str, net_name: str, applied) -> Optional[str]:
        scaling = doc["lora_alpha"] / (math.sqrt(doc["r"]) if doc.get("use_rslora") else doc["r"])
        if applied.pet_type in self.pet_types and math.isclose(applied.scaling, scaling, rel_tol=1e-6):
            theirs = self.config_from_peft(doc, [".*"])
            if theirs.use_dora != applied.use_dora:
                return f"{config_path}: use_dora={theirs.use_dora} differs from the LoRA applied to {net_name}"
            if (lora_init.mutates_base(theirs) or lora_init.mutates_base(applied)) and \
                    theirs.init_lora_weights != applied.init_lora_weights:
                return (f"{config_path}: init_lora_weights={theirs.init_lora_weights!r} differs from the LoRA applied "
                        f"to {net_name} ({applied.init_lora_weights!r}): its base weight is another residual")
            return None
        return (f"{config_path}: LoRA scaling {scaling:g} (r={doc['r']}, lora_alpha={doc['lora_alpha']}) "
                f"differs from the PET applied to {net_name} "
                f"({applied.pet_type}, scaling {getattr(applied, 'scaling', 'n/a')})")
