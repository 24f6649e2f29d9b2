"""What differs per kind of base cell LoRA adapts: the :class:`LoraKind` contract, the branch mixin, the variant base.

PEFT has one LoRA layer class per kind of base module (``lora.Linear``, ``lora.Embedding``, ...),
chosen by a list of dispatchers (``lora/model.py::_create_new_module``). Here a kind is one
:class:`LoraKind` object, and the cell is not wrapped but moved onto a generated subclass of its
own class (graph mode compiles the source of ``type(cell).construct``, so the branch must be in a
real class's ``construct``). A kind owns everything the LoRA flow would otherwise decide by asking
the cell's type:

====================  ==================================================================================
which cells           ``recognises`` (the dispatcher asks each kind in turn, ``lora/dispatch.py``),
                      ``refuse`` (a recognised cell it cannot adapt, and why), ``unreached_reason``
the geometry          ``io_channels``, ``base_weight`` and how it is stored (``weight_is_out_in``),
                      ``compute_dtype``, ``group_anchor``
the branch            ``mixin`` (the generated class's first base: the base computation plus the branch),
                      ``leaves`` (the deltas' names), ``add_deltas`` / ``initial_values`` (their values),
                      ``lora_bias`` / ``base_bias`` (whether the branch may add a bias, the base's),
                      ``add_extras`` (its own primitives: the tensor-parallel layout), ``takes_dropout``
merging               ``weight_deltas`` (in the weight's layout), ``merge_weights``, ``weight_readers``
the rest              ``grad_sentinels``, ``variants`` / ``residual_inits`` (what DoRA and the inits
                      may do), a parent that reads a child (``reads_child``, ``attach_child``),
                      ``rows_reason`` / ``single_adapter_reason`` (what several adapters may do)
====================  ==================================================================================

The defaults are those of a linear layer with ``weight`` [out, in] (or [in, out] with
``transpose_b=False``), ``in_channels`` / ``out_channels`` and a branch on its input. A kind of your
own (``pet_hooks.register_lora_kind``, docs/methods.md) usually writes ``recognises``, ``mixin`` and
what its cell stores differently::

    class RectProjKind(LoraKind):
        name = "my_package.RectProj"
        mixin = LoraRectProj                     # a LoraLayer whose construct calls self._lora_branch(x2)
        def recognises(self, cell): return isinstance(cell, RectProj)
        def base_weight(self, cell): return cell.kernel
        def weight_is_out_in(self, cell): return False          # stored [in, out]

A *variant* (PEFT's ``LoraVariant``; DoRA, ``lora/dora.py``) changes the branch of the kinds that
support it: its layer class goes before the kind's mixin and overrides :meth:`LoraLayer._lora_output`,
and it has its own init, weight deltas, merge and unmerge.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ..common import weight_is_out_in
from . import inits as lora_init
from .scale import scaled_a, scaled_bias

__all__ = ["LoraKind", "LoraLayer", "LoraVariant", "Drawn", "param_data", "kind_attrs", "COMMON_ATTRS", "BIAS_LEAF"]

_MATMUL_TB = ops.MatMul(transpose_b=True)

#: what every LoRA cell gains, whatever its kind (removed again on eject); a kind adds its ``extra_attrs``
COMMON_ATTRS = ("lora_A", "lora_B", "lora_dropout", "lora_scaling", "lora_compute_dtype", "pet_lora_scale",
                "pet_lora_rank_scaling", lora_init.RESIDUAL_ATTR, "lora_B_bias")
#: the leaf of ``lora_bias``'s Parameter, ``<cell path>.lora_B_bias`` (PEFT's ``lora_B.bias``); None when off
BIAS_LEAF = "lora_B_bias"

_NUMPY_DTYPES = {mstype.float32: np.float32, mstype.float16: np.float16}


def param_data(values: np.ndarray, dtype):
    """``values`` as data for a Parameter of ``dtype``.

    A NumPy array where NumPy has the dtype: a Parameter built from one costs half as much as
    one built from a Tensor, which is most of apply()'s time on a deep model.
    """
    if dtype in _NUMPY_DTYPES:
        return values.astype(_NUMPY_DTYPES[dtype], copy=False)
    return Tensor(values).astype(dtype)


class LoraLayer:
    """Mixin of the generated classes: the branch, and the hook a variant overrides.

    A kind's mixin subclasses this and writes ``construct``: the base cell's computation with
    ``self._lora_branch(x2)`` (2-D input, unsharded primitives) or ``self._sharded_branch(x2)`` (the
    cell's own ``pet_lora_matmul_a`` / ``_b``) added. A mixin that supports a variant calls
    ``self._lora_output(x2, out)`` on the base product before the bias instead, and defines the
    pieces the variant recombines: ``_branch``, ``_base_bias``, ``_to_base_dtype`` and, for DoRA,
    ``_lora_product``, ``_base_product``, ``_weight_rows`` (``lora/linear.py``).
    """

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
        h = _MATMUL_TB(h, ops.cast(self.lora_B, self.lora_compute_dtype))
        if self.lora_B_bias is not None:        # lora_bias: None otherwise (structure, fixed at apply)
            h = h + scaled_bias(self, self.lora_compute_dtype)
        return h

    def _sharded_branch(self, x2):
        """``_lora_branch`` on the cell's own (sharded) MatMul primitives."""
        h = ops.cast(x2, self.lora_compute_dtype)
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        h = self.pet_lora_matmul_a(h, ops.cast(scaled_a(self), self.lora_compute_dtype))
        h = self.pet_lora_matmul_b(h, ops.cast(self.lora_B, self.lora_compute_dtype))
        if self.lora_B_bias is not None:
            h = h + scaled_bias(self, self.lora_compute_dtype)
        return h

    def _lora_output(self, x2, out):
        """Plain LoRA on the base product ``out`` (no bias yet): ``W x + b + s B A x``, the bias first as in the
        base layer. A variant's layer (DoRA) overrides this."""
        out = self._base_bias(out)
        return out + self._to_base_dtype(self._branch(x2), out)


@dataclass
class Drawn:
    """What :meth:`LoraKind.add_deltas` gave a cell: its delta Parameters and the float32 values they started
    from (``a`` / ``b``, None for a kind with other deltas) and, for PiSSA / OLoRA, the residual base weight."""

    params: List[Parameter]
    a: Optional[np.ndarray] = None
    b: Optional[np.ndarray] = None
    residual: Optional[np.ndarray] = None


class LoraKind(abc.ABC):
    """One kind of base cell LoRA adapts (see the module docstring); instances are stateless."""

    #: what the kind adapts, in messages ("mindspore.nn.Dense")
    name: str = ""
    #: the generated class's first base (a :class:`LoraLayer` subclass or a class with ``pet_hooks_lora = True``)
    mixin: Optional[type] = None
    #: the leaves of the deltas' names, ``<cell path>.<leaf>``: A's, B's
    leaves: Tuple[str, str] = ("lora_A", "lora_B")
    #: what :meth:`add_extras` sets beyond :data:`COMMON_ATTRS` (removed on eject)
    extra_attrs: Tuple[str, ...] = ()
    #: False where ``lora_dropout`` is not applied (a delta folded into a weight, an embedding), as in PEFT
    takes_dropout: bool = True
    #: the variants (``LoraVariant.name``) whose layer the mixin supports
    variants: FrozenSet[str] = frozenset()
    #: True when PiSSA / OLoRA may replace the base weight by its residual
    residual_inits: bool = False
    #: why the kind's cells cannot take one adapter per row of a batch (``adapter_per_row``), None if they can
    rows_reason: Optional[str] = None
    #: why a cell of this kind keeps one adapter per net (``add_adapter`` refuses it), None if it need not
    single_adapter_reason: Optional[str] = None
    #: True for a linear layer in PEFT's sense (what ``target_modules: "all-linear"`` selects): nn.Dense,
    #: MindFormers' Linear and the mcore projections; not embeddings, attention cells or grouped experts
    is_linear: bool = False
    #: True when the kind's branch adds ``lora_B_bias`` (``lora_bias``: a linear layer's output); PEFT refuses it
    #: on embeddings, and the kinds whose branch is not a linear layer's output cannot take it
    lora_bias: bool = False

    def __repr__(self) -> str:
        return f"<LoRA cell kind {self.name or type(self).__name__}>"

    # -- which cells --------------------------------------------------------------------------
    @abc.abstractmethod
    def recognises(self, cell: nn.Cell) -> bool:
        """True when ``cell`` is of this kind (also once adapted: its class then subclasses the original)."""

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        """Why a recognised ``cell`` cannot be adapted (a subclass with a ``construct`` of its own, ...), or None."""
        return None

    def unreached_reason(self, net: nn.Cell, cell: nn.Cell) -> Optional[str]:
        """Why a branch on ``cell`` would miss some of its uses in ``net``, or None."""
        return None

    def companions(self, path: str, cell: nn.Cell) -> List[Tuple[str, nn.Cell]]:
        """Cells a selected ``cell`` brings along as targets (PEFT's rule for an attention cell's out_proj)."""
        return []

    def reads_child(self, cell: nn.Cell, child_name: str) -> bool:
        """True when ``cell`` reads its child ``child_name``'s weights instead of calling it, and the kind knows
        how to put the child's delta into its own computation (:meth:`attach_child`)."""
        return False

    def attach_child(self, cell: nn.Cell) -> Optional[type]:
        """Make ``cell`` compute with its adapted child's delta; its class before when this swapped it."""
        raise NotImplementedError(f"{self!r} reads no child")

    def detach_child(self, cell: nn.Cell, original_class: Optional[type]) -> None:
        """The mirror of :meth:`attach_child` (``original_class``: what it returned)."""
        raise NotImplementedError(f"{self!r} reads no child")

    def warn_no_dropout(self, paths: Sequence[str], rate: float) -> None:
        """Say that ``lora_dropout`` ``rate`` is not applied on ``paths`` (kinds with ``takes_dropout`` False, and
        the children they read)."""

    # -- the geometry -------------------------------------------------------------------------
    def io_channels(self, cell: nn.Cell) -> Tuple[int, int]:
        """(in, out): A's columns and B's rows."""
        return int(cell.in_channels), int(cell.out_channels)

    def base_weight(self, cell: nn.Cell) -> Optional[Parameter]:
        """The base weight the delta ``B @ A`` adds to (None when there is no single one)."""
        return cell.weight

    def weight_is_out_in(self, cell: nn.Cell) -> bool:
        """True when the base weight is stored [out, in], False for [in, out]."""
        return weight_is_out_in(cell)

    def weight_out_in(self, cell: nn.Cell) -> np.ndarray:
        """The base weight as float32 [out, in]."""
        weight = self.base_weight(cell).astype(mstype.float32).asnumpy()
        return weight if self.weight_is_out_in(cell) else weight.T

    def in_weight_layout(self, cell: nn.Cell, out_in: np.ndarray) -> np.ndarray:
        """An [out, in] array laid out as the base weight is stored."""
        return np.ascontiguousarray(out_in if self.weight_is_out_in(cell) else out_in.T)

    def base_bias(self, cell: nn.Cell) -> Optional[Parameter]:
        """The base bias ``lora_bias`` merges into (``bias``), None when the cell has none."""
        bias = getattr(cell, "bias", None)
        return bias if isinstance(bias, Parameter) and getattr(cell, "has_bias", True) is not False else None

    def compute_dtype(self, cell: nn.Cell):
        """The branch's compute dtype when the config sets none: the base weight's."""
        return self.base_weight(cell).dtype

    def group_anchor(self, cell: nn.Cell) -> Optional[Parameter]:
        """The base parameter whose optimizer group the cell's deltas join (its ``weight``)."""
        weight = getattr(cell, "weight", None)
        return weight if isinstance(weight, Parameter) else None

    # -- the deltas ---------------------------------------------------------------------------
    def init_reason(self, cfg) -> Optional[str]:
        """Why ``cfg``'s ``init_lora_weights`` (or ``lora_bias``) cannot be used on this kind, or None."""
        if getattr(cfg, "lora_bias", False) and not self.lora_bias:
            return f"lora_bias=True is not supported on {self.name or type(self).__name__} (linear layers only)"
        return lora_init.reason(cfg, self.residual_inits)

    def initial_arrays(self, cell: nn.Cell, cfg,
                       rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(A [r, in], B [out, r], residual or None), float32, drawn from ``rng`` by ``cfg.init_lora_weights``."""
        in_ch, out_ch = self.io_channels(cell)
        return lora_init.initial_arrays(cfg, rng, in_ch, out_ch, lambda: self.weight_out_in(cell))

    def initial_values(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """{"lora_A", "lora_B"}: what a new adapter (``add_adapter``) starts the cell with: A by ``lora_a_init``,
        B zeros."""
        in_ch, out_ch = self.io_channels(cell)
        return {"lora_A": lora_init.default_a(rng, cfg, (cfg.lora_rank, in_ch)),
                "lora_B": np.zeros((out_ch, cfg.lora_rank), np.float32)}

    def add_deltas(self, path: str, cell: nn.Cell, cfg, rng: np.random.Generator) -> Drawn:
        """Give the cell ``lora_A`` / ``lora_B``, named ``<path>.<leaf>`` (Parameters added after construction
        get no path prefix), of ``cfg.param_init_type``."""
        a, b, residual = self.initial_arrays(cell, cfg, rng)
        dtype = getattr(mstype, cfg.param_init_type)
        cell.lora_A = Parameter(param_data(a, dtype), name=f"{path}.{self.leaves[0]}", requires_grad=True)
        cell.lora_B = Parameter(param_data(b, dtype), name=f"{path}.{self.leaves[1]}", requires_grad=True)
        params = [cell.lora_A, cell.lora_B]
        if getattr(cfg, "lora_bias", False):
            cell.lora_B_bias = Parameter(param_data(lora_init.initial_bias(cfg, rng, b.shape[0]), dtype),
                                         name=f"{path}.{BIAS_LEAF}", requires_grad=True)
            params.append(cell.lora_B_bias)
        return Drawn(params, a, b, residual)

    def add_extras(self, cell: nn.Cell) -> None:
        """What the branch needs beyond the deltas, the switch and the dropout (its own primitives, laid out as
        the base is); called after those are set. Sets exactly ``extra_attrs``."""

    def grad_sentinels(self, cell: nn.Cell) -> List[Parameter]:
        """The deltas whose change shows the branch got a gradient: ``lora_B``, zero at init, moves from the first
        step whenever the branch is reached (A's gradient is ``B^T @ ...``, zero until B moves)."""
        return [cell.lora_B]

    # -- merging ------------------------------------------------------------------------------
    def weight_deltas(self, cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
        """``[(W, B @ (s A))]`` in the weight's layout, float32, each rank row at its own scaling."""
        a = cell.lora_A.astype(mstype.float32).asnumpy()
        b = cell.lora_B.astype(mstype.float32).asnumpy()
        deltas = [(self.base_weight(cell), self.in_weight_layout(cell, b @ (cell.pet_lora_rank_scaling[:, None] * a)))]
        if getattr(cell, BIAS_LEAF, None) is not None:      # lora_bias: the base bias gains scaling * bias
            bias = cell.lora_B_bias.astype(mstype.float32).asnumpy()
            deltas.append((self.base_bias(cell), cell.pet_lora_rank_scaling[0] * bias))
        return deltas

    def merge_weights(self, cell: nn.Cell) -> List[Parameter]:
        """The base weights merging writes (those of :meth:`weight_deltas`, without computing them)."""
        bias = self.base_bias(cell) if getattr(cell, BIAS_LEAF, None) is not None else None
        return [self.base_weight(cell)] + ([bias] if bias is not None else [])

    def merge_reason(self, cell: nn.Cell) -> Optional[str]:
        """Why the cell's branch cannot be merged, or None: a ``lora_bias`` on a cell without a base bias."""
        if getattr(cell, BIAS_LEAF, None) is not None and self.base_bias(cell) is None:
            return ("has lora_bias but its base layer has no bias to merge it into (PEFT: \"Impossible to merge "
                    "LoRA with `lora_bias=True` because the base layer has no bias\")")
        return None

    def weight_readers(self, net: nn.Cell, cell: nn.Cell) -> List[str]:
        """Paths of cells of ``net`` that compute with the base weight without holding it (merging changes them)."""
        return []


class LoraVariant(abc.ABC):
    """A change of the LoRA branch on the kinds that support it (PEFT's ``LoraVariant``: init, forward, merge,
    unmerge). ``layer`` is the forward: a class put before the kind's mixin, overriding
    :meth:`LoraLayer._lora_output`, since graph mode compiles class source."""

    #: the name kinds list in their ``variants``
    name: str = ""
    #: how messages name it ("DoRA (use_dora: true)")
    label: str = ""
    #: what :meth:`init` (and merging) set on a cell (removed on eject)
    attrs: Tuple[str, ...] = ()
    #: the forward: its ``_lora_output`` replaces plain LoRA's
    layer: Optional[type] = None
    #: the generated mixins' names: this, then the kind mixin's name without "Lora" ("DoraDense")
    prefix: str = ""
    _classes: Dict[type, type]

    def __init__(self) -> None:
        self._classes = {}

    def __repr__(self) -> str:
        return f"<LoRA variant {self.name}>"

    @abc.abstractmethod
    def applies(self, cfg) -> bool:
        """True when ``cfg`` asks for this variant."""

    def reason(self, kind: LoraKind) -> Optional[str]:
        """Why the variant cannot be used on ``kind``'s cells, or None."""
        return None if self.name in kind.variants else f"{self.label} is not supported on this cell type"

    def mixin(self, kind_mixin: type) -> type:
        """The class to mix into a cell of the kind whose mixin is ``kind_mixin``: ``layer`` before it (one per
        kind mixin, reused)."""
        if kind_mixin not in self._classes:
            name = kind_mixin.__name__[4:] if kind_mixin.__name__.startswith("Lora") else kind_mixin.__name__
            self._classes[kind_mixin] = type(f"{self.prefix}{name}", (self.layer, kind_mixin),
                                             {"__module__": self.layer.__module__})
        return self._classes[kind_mixin]

    @abc.abstractmethod
    def init(self, path: str, cell: nn.Cell, kind: LoraKind, drawn: Drawn, cfg) -> List[Parameter]:
        """Set the variant's own Parameters on a cell that has its deltas; returns them."""

    @abc.abstractmethod
    def weight_deltas(self, kind: LoraKind, cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
        """``[(W, change)]`` that merging the unmerged cell writes, in the weight's layout, float32."""

    @abc.abstractmethod
    def merge(self, kind: LoraKind, cell: nn.Cell) -> None:
        """Fold the branch into the base weight, keeping what :meth:`unmerge` needs."""

    @abc.abstractmethod
    def unmerge(self, kind: LoraKind, cell: nn.Cell) -> None:
        """Undo :meth:`merge`."""


def kind_attrs(kind: LoraKind, variant: Optional[LoraVariant]) -> Tuple[str, ...]:
    """Every attribute a cell of ``kind`` (with ``variant``) gains: what eject removes, and what a cell must not
    already hold."""
    return COMMON_ATTRS + tuple(kind.extra_attrs) + (tuple(variant.attrs) if variant is not None else ())

