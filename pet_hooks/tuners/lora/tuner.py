"""LoRA as a tuner: select the cells, give each its branch, undo it; what differs per cell is its kind's.

The flow is the same for every cell LoRA adapts (``nn.Dense``, MindFormers' ``Linear`` and mcore
projections, ``nn.MultiheadAttention``, grouped MoE experts, the embeddings, and kinds users register);
what differs is asked of the cell's kind (``lora/kind.py``), which the dispatcher picks once per cell
(``lora/dispatch.py``, the one place that asks a cell's type) and the injection keeps::

    targets = select_targets(net, cfg)          # validated; the net is unchanged
    injections = LoraTuner().inject(targets, cfg)  # each cell on its kind's generated class, deltas added

Graph mode compiles the *source* of ``type(cell).construct`` and ignores a wrapped method, so
each matched cell is moved onto a generated subclass (``LoraDense_of_Dense``) of its kind's
``mixin`` and its own class, whose ``construct`` is the base computation with the branch added::

    y = act(x @ W^T + b + scaling * dropout(x) @ A^T @ B^T)

The base parameters stay where they were (same objects, same names); the deltas are new
Parameters named ``<cell path>.lora_A`` ([r, in]) and ``<cell path>.lora_B`` ([out, r], zeros), or
the kind's own names (an embedding's are PEFT's). Undo is the mirror: the original class back, the
added attributes deleted. A cell whose parent reads its weights instead of calling it (``out_proj``
inside ``nn.MultiheadAttention``) would never run its branch; the parent's kind then computes with
the effective weight (``reads_child`` / ``attach_child``). A variant (DoRA, ``lora/dora.py``) is
an object the kinds that support it call: its layer class goes before the kind's mixin, and merging
goes through it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn
from mindspore.common import dtype as mstype

from ...utils.ms_compat import write_values
from ...config.pet_config import LoraConfig
from ...errors import UnsupportedCellError
from ...matching.cells import is_excluded, module_excluded, select_cells
from ...matching.patterns import check_pattern_keys
from . import inits as lora_init
from ..base import Injection, Tuner
from ..common import init_rng, inject_all, restore
from .dispatch import kind_of, unsupported_reason, variant_of
from .kind import LoraKind, LoraLayer, LoraVariant, kind_attrs, param_data
from .linear import LoraDense, LoraLinear
from .peft_layout import MINDFORMERS_LAYOUT, LoraPeftLayout
from .scale import add_scale, scaled_a

__all__ = ["LoraTuner", "LoraTargets", "LoraInjection", "LoraLayer", "LoraDense", "LoraLinear", "is_lora_cell",
           "scaled_a", "param_data", "select_targets", "base_weight", "takes_dropout", "initial_values",
           "rows_reason", "single_adapter_reason", "is_linear"]

logger = logging.getLogger("pet_hooks")


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    """None when LoRA can adapt ``cell``, else the reason it cannot."""
    kind = kind_of(cell)
    return unsupported_reason() if kind is None else kind.refuse(cell)


def _can_adapt_with(cell: nn.Cell, cfg: LoraConfig) -> Optional[str]:
    """``_can_adapt``, and what ``cfg``'s variant (DoRA) and init need of the cell's kind."""
    kind = kind_of(cell)
    if kind is None:
        return unsupported_reason()
    variant = variant_of(cfg)
    return kind.refuse(cell) or (variant.reason(kind) if variant is not None else None) or kind.init_reason(cfg)


def is_linear(cell: nn.Cell) -> bool:
    """A linear layer in PEFT's sense, what ``target_modules: "all-linear"`` selects (its kind's ``is_linear``)."""
    kind = kind_of(cell)
    return kind is not None and kind.is_linear


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

    A selected cell brings its kind's companions along (a ``nn.MultiheadAttention``'s ``out_proj``,
    PEFT's rule) unless ``exclude_layers`` excludes them. ``include_adapted`` (another adapter of a
    LoRA net) selects cells LoRA already adapted too.
    """
    def can_adapt(cell):
        return None if include_adapted and is_lora_cell(cell) else _can_adapt_with(cell, cfg)

    chosen = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=can_adapt,
                          skip=lambda path, cell: (is_lora_cell(cell) and not include_adapted)
                          or path.rsplit(".", 1)[-1] == "lora_dropout",
                          exclude_modules=cfg.exclude_modules, layers_to_transform=cfg.layers_to_transform,
                          layers_pattern=cfg.layers_pattern, is_linear=is_linear,
                          linear_refusal=lambda cell: None if include_adapted and is_lora_cell(cell)
                          else _can_adapt(cell))
    paths = {path for path, _ in chosen}
    targets: List[Tuple[str, nn.Cell]] = []
    for path, cell in chosen:
        targets.append((path, cell))
        for extra_path, extra in _kind(cell, path).companions(path, cell):
            if extra_path not in paths and not is_excluded(extra_path, cfg.exclude_layers) \
                    and not module_excluded(extra_path, cfg.exclude_modules):
                targets.append((extra_path, extra))
                paths.add(extra_path)
    variant = variant_of(cfg)
    by_path = dict(net.cells_and_names())
    parents = {}
    for path, cell in targets:
        unreached = _kind(cell, path).unreached_reason(net, cell)
        if unreached:
            raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) cannot take LoRA: {unreached}")
        parent_path, _, leaf = path.rpartition(".")
        parent = by_path.get(parent_path)
        parent_kind = kind_of(parent) if parent is not None else None
        if parent_kind is not None and parent_kind.reads_child(parent, leaf):
            parents[path] = parent
            if variant is not None:
                raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) is read by its parent "
                                           f"{type(parent).__name__}: {variant.label} is not supported there")
    check_pattern_keys(cfg, [path for path, _ in targets])     # every rank_pattern / alpha_pattern key selects one
    return LoraTargets(targets, parents)


def _kind(cell: nn.Cell, path: str) -> LoraKind:
    """The kind of a cell that must have one (a target): UnsupportedCellError naming it otherwise."""
    kind = kind_of(cell)
    if kind is None:
        raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) cannot take LoRA: {unsupported_reason()}")
    return kind


# -- what several adapters (pet_hooks.multi) ask of a cell, answered by its kind ------------------------
def base_weight(cell: nn.Cell) -> Optional[Parameter]:
    """The base weight the branch of ``cell`` adds to (``in_proj_weight`` for an attention cell, the table of
    an embedding; None for grouped experts or a cell LoRA does not know)."""
    kind = kind_of(cell)
    return kind.base_weight(cell) if kind is not None else None


def takes_dropout(cell: nn.Cell, read_by_parent: bool) -> bool:
    """False where ``lora_dropout`` is not applied, as in PEFT: a delta folded into a weight (no branch input
    of its own) and an embedding (PEFT never calls the dropout it builds there)."""
    return not read_by_parent and _kind(cell, type(cell).__name__).takes_dropout


def initial_values(cell: nn.Cell, cfg: LoraConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """{"lora_A", "lora_B"}: the values a new adapter (``add_adapter``) starts the cell with, as its kind draws
    them (an embedding's are PEFT's: A zeros, B normal); ``cfg`` is the cell's own (``cfg.for_module(path)``)."""
    return _kind(cell, type(cell).__name__).initial_values(cell, cfg, rng)


def rows_reason(injection: Injection) -> Optional[str]:
    """Why the injection's cell cannot take one adapter per row of a batch (its kind's reason, or its reading
    parent's), None when it can."""
    owner = injection.parent_kind if injection.parent is not None else injection.kind
    return owner.rows_reason


def single_adapter_reason(cell: nn.Cell) -> Optional[str]:
    """Why ``cell`` keeps one adapter per net (grouped experts), None when it need not."""
    kind = kind_of(cell)
    return kind.single_adapter_reason if kind is not None else None


# -- inject / eject -----------------------------------------------------------------------------------
@dataclass
class LoraInjection(Injection):
    """An Injection with the cell's kind and variant, which may also have patched the cell's parent (which reads
    the cell's weights).

    ``parent_original`` is the parent's class before, when this injection swapped it (else None).
    """

    kind: Optional[LoraKind] = None
    variant: Optional[LoraVariant] = None
    parent: Optional[nn.Cell] = None
    parent_kind: Optional[LoraKind] = None
    parent_original: Optional[type] = None
    #: the adapters whose A rows / B columns the cell's ``lora_A`` / ``lora_B`` hold, in order (``multi/slots.py``)
    occupants: List[str] = field(default_factory=list)
    base_init: Optional[lora_init.BaseInit] = None     # PiSSA / OLoRA: the original weight, A0, B0


def _inject(targets: List[Tuple[str, nn.Cell]], cfg: LoraConfig) -> List[Injection]:
    """Give every target its LoRA branch. All or nothing: on error the done part is undone."""
    rng = init_rng(cfg)
    parents: Dict[str, nn.Cell] = getattr(targets, "parents", {})
    variant = variant_of(cfg)
    kinds = {id(cell): _kind(cell, path) for path, cell in targets}

    def mixin_of(cell):
        mixin = kinds[id(cell)].mixin
        return variant.mixin(mixin) if variant is not None else mixin

    injections = inject_all(targets, lambda cell: kind_attrs(kinds[id(cell)], variant),
                         lambda index, path, cell: _add_branch(path, cell, kinds[id(cell)], variant, cfg, rng,
                                                               path in parents),
                         mixin_of=mixin_of)
    done: List[LoraInjection] = []
    try:
        for injection in injections:
            kind = kinds[id(injection.cell)]
            done.append(LoraInjection(**vars(injection), kind=kind, variant=variant))
            done[-1].base_init = lora_init.write_residual(injection.cell, kind.base_weight(injection.cell),
                                                          lambda w, c=injection.cell, k=kind: k.in_weight_layout(c, w))
            parent = parents.get(injection.path)
            if parent is not None:
                parent_kind = kind_of(parent)
                original = parent_kind.attach_child(parent)
                done[-1].parent, done[-1].parent_kind, done[-1].parent_original = parent, parent_kind, original
    except BaseException:
        for injection in reversed(done):
            _eject(injection)
        for injection in reversed(injections[len(done):]):
            restore(injection)
        raise
    if cfg.lora_dropout > 0:
        _warn_no_dropout(done, cfg.lora_dropout)
    return done


def _warn_no_dropout(injections: List[LoraInjection], rate: float) -> None:
    """One warning per kind that drops no input: its cells and the children it reads."""
    groups: Dict[int, Tuple[LoraKind, List[str]]] = {}
    for injection in injections:
        owner = injection.parent_kind if injection.parent is not None else injection.kind
        if injection.parent is not None or not injection.kind.takes_dropout:
            groups.setdefault(id(owner), (owner, []))[1].append(injection.path)
    for owner, paths in groups.values():
        owner.warn_no_dropout(paths, rate)


def _add_branch(path: str, cell: nn.Cell, kind: LoraKind, variant: Optional[LoraVariant], cfg: LoraConfig,
                rng: np.random.Generator, read_by_parent: bool = False) -> List[Parameter]:
    """The cell's deltas (its kind's), dropout, switch, compute dtype, the kind's extras, the variant's own.
    Everything below reads the cell's own rank and alpha (``rank_pattern`` / ``alpha_pattern``)."""
    cfg = cfg.for_module(path)
    cell.lora_B_bias = None             # lora_bias: the kinds that take it set it in add_deltas
    drawn = kind.add_deltas(path, cell, cfg, rng)
    cell.lora_dropout = None
    # A branch folded into a weight (attention cells), an embedding: no input of its own to drop.
    if cfg.lora_dropout > 0 and kind.takes_dropout and not read_by_parent:
        cell.lora_dropout = nn.Dropout(p=float(cfg.lora_dropout))
        cell.lora_dropout.set_train(cell.training)
    add_scale(path, cell, cfg)
    cell.lora_compute_dtype = (getattr(mstype, cfg.compute_dtype) if cfg.compute_dtype is not None
                               else kind.compute_dtype(cell))
    kind.add_extras(cell)
    if drawn.residual is not None:      # written by _inject once every cell is patched (all or nothing)
        cell.__dict__[lora_init.RESIDUAL_ATTR] = drawn.residual
    params = list(drawn.params)
    if variant is not None:
        params += variant.init(path, cell, kind, drawn, cfg)
    return params


def _eject(injection: LoraInjection) -> None:
    """The mirror of inject for one cell (and of the patch of its parent, if it made one)."""
    if injection.parent is not None:
        injection.parent_kind.detach_child(injection.parent, injection.parent_original)
    lora_init.restore_base(injection.base_init)
    restore(injection)


class LoraTuner(Tuner):
    """LoRA as a :class:`~pet_hooks.tuners.base.Tuner`: a branch on every cell of a kind it knows; what differs
    per cell is asked of the injection's kind and variant."""

    label = "LoRA"
    pet_types = ("lora",)
    # Turning the branch on or off (disable_adapters, merge/unmerge) only writes pet_lora_scale's
    # value: the graph stays the same, so graph mode needs no recompile.
    switch_is_data = True
    can_merge = True
    peft = LoraPeftLayout()
    mindformers = MINDFORMERS_LAYOUT

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def base_weight(self, cell: nn.Cell) -> Optional[Parameter]:
        return base_weight(cell)

    def is_linear(self, cell: nn.Cell) -> bool:
        return is_linear(cell)

    def select_targets(self, net: nn.Cell, cfg: LoraConfig) -> LoraTargets:
        return select_targets(net, cfg)

    def inject(self, targets, cfg: LoraConfig) -> List[Injection]:
        return _inject(targets, cfg)

    def eject(self, injection: Injection) -> None:
        _eject(injection)

    def deltas_of(self, injection: Injection) -> List[Parameter]:
        return list(injection.params)

    def set_active(self, injections, active: bool) -> None:
        """Write each cell's scale: its rows' scalings, or 0. Data, not structure."""
        for injection in injections:
            cell = injection.cell
            write_values(cell.pet_lora_scale, cell.pet_lora_rank_scaling[:, None] * (1.0 if active else 0.0))

    def switch_parameters(self, injections) -> List[Parameter]:
        return [injection.cell.pet_lora_scale for injection in injections]

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """The kind's: ``lora_B``, zero at init, gets a gradient from the first step whenever the branch is
        reached, and a B with no gradient stays exactly zero even under weight decay; an embedding's ``lora_A``
        (PEFT's embedding init is the other way round); the experts' two B's."""
        return injection.kind.grad_sentinels(injection.cell)

    def io_channels(self, injection: Injection) -> Tuple[int, int]:
        """(in, out) of the projection the branch adds to (an attention cell's packed in-projection)."""
        return injection.kind.io_channels(injection.cell)

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        if injection.variant is not None:
            return injection.variant.weight_deltas(injection.kind, injection.cell)
        return injection.kind.weight_deltas(injection.cell)

    def merge_weights(self, injection: Injection) -> List[Parameter]:
        return injection.kind.merge_weights(injection.cell)

    def merge_reason(self, injection: Injection) -> Optional[str]:
        return injection.kind.merge_reason(injection.cell)

    def weight_readers(self, net: nn.Cell, injection: Injection) -> List[str]:
        """Cells that compute with the adapted weight passed at call time (an mcore output layer tied to an
        adapted embedding)."""
        return injection.kind.weight_readers(net, injection.cell)

    def group_anchor(self, injection: Injection) -> Optional[Parameter]:
        """The layer's ``weight``; an embedding's table, whatever its attribute is called."""
        return injection.kind.group_anchor(injection.cell)

    def merge(self, injection: Injection, sign: int) -> None:
        if injection.variant is None:
            super().merge(injection, sign)
        elif sign > 0:          # DoRA is multiplicative: W' = f (W + s B A), unmerged with the kept norms
            injection.variant.merge(injection.kind, injection.cell)
        else:
            injection.variant.unmerge(injection.kind, injection.cell)
