"""What every tuner does the same way: the generated class, the all-or-nothing injection, the undo.

A tuner adds attributes to each target cell and moves the cell onto a generated subclass
``(mixin, original class)`` whose ``construct`` graph mode compiles; ``restore`` is the exact
mirror::

    injections = inject_all(targets, ADDED_ATTRS, add=lambda i, path, cell: [...params...],
                         mixin_of=lambda cell: MyMixin)      # ADDED_ATTRS, or a function of the cell
    for injection in reversed(injections):
        restore(injection)
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn

from ..errors import UnsupportedCellError
from ..matching.cells import select_cells
from ..utils.ms_compat import write_values
from .base import Injection, Tuner

__all__ = ["SwitchedTuner", "init_rng", "patched_class", "inject_all", "restore", "strip_attrs", "loaded_class",
           "mindformers_linear", "linear_experts_reason", "projection_reason", "weight_is_out_in", "shared_switch"]

logger = logging.getLogger("pet_hooks")


def _in_multi_process_job() -> bool:
    """True in one process of a distributed job (msrun sets MS_WORKER_NUM, rank tables RANK_SIZE)."""
    for var in ("MS_WORKER_NUM", "RANK_SIZE"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def init_rng(cfg) -> np.random.Generator:
    """Seeded by ``cfg.seed``, else by ``mindspore.set_seed`` when set (the same deltas on every rank).

    With neither, a process of a distributed job uses seed 0: nothing broadcasts initial
    parameters between ranks, and differently initialised deltas would silently train a
    different model on every rank.
    """
    seed = cfg.seed if cfg.seed is not None else ms.get_seed()
    if seed is None and _in_multi_process_job():
        logger.warning("pet_hooks: no seed given (config 'seed' or mindspore.set_seed) in a distributed job; "
                       "initialising the deltas with seed 0 so that every rank starts from the same values")
        seed = 0
    return np.random.default_rng(seed)


_CLASS_CACHE: Dict[Tuple[type, type], type] = {}


def patched_class(mixin: type, original: type) -> type:
    """One generated subclass per (mixin, original class), reused so classes do not pile up.

    ``pet_base_construct`` is the original computation: graph mode cannot follow
    ``super().construct`` from a mixin (it recurses), but it can call this. A class generated over a
    generated one (mixed batches over an adapted cell) keeps the first one's: the base layer's own.
    """
    key = (mixin, original)
    if key not in _CLASS_CACHE:
        base = getattr(original, "pet_base_construct", original.construct)
        _CLASS_CACHE[key] = type(f"{mixin.__name__}_of_{original.__name__}", (mixin, original),
                                 {"__module__": mixin.__module__, "pet_base_construct": base})
    return _CLASS_CACHE[key]


def strip_attrs(cell: nn.Cell, names: Sequence[str]) -> None:
    """Delete whichever of ``names`` the cell holds (plain attributes, parameters or sub-cells)."""
    for name in names:
        if name in cell.__dict__ or name in cell._params or name in cell._cells:  # pylint: disable=protected-access
            delattr(cell, name)


def restore(injection: Injection) -> None:
    """The mirror of the injection for one cell: original class back, added attributes gone."""
    injection.cell.__class__ = injection.original_class
    strip_attrs(injection.cell, injection.added)


def inject_all(targets: List[Tuple[str, nn.Cell]], added: Union[Tuple[str, ...], Callable[[nn.Cell], Tuple[str, ...]]],
               add: Callable[[int, str, nn.Cell], List[Parameter]],
               mixin_of: Callable[[nn.Cell], type]) -> List[Injection]:
    """Patch every target: ``add(index, path, cell)`` sets the attributes and returns the cell's deltas.

    ``added`` names the attributes a cell gains, or gives them per cell (``added(cell)``: LoRA's
    depend on the cell's kind). All or nothing: an error undoes what was done, and a cell already
    holding one of the attribute names is refused before anything is written to it.
    """
    done: List[Injection] = []
    try:
        for index, (path, cell) in enumerate(targets):
            names = added(cell) if callable(added) else added
            clash = [name for name in names if hasattr(cell, name)]
            if clash:
                raise UnsupportedCellError(f"cell '{path}' ({type(cell).__name__}) already has attribute(s) {clash}")
            mixin = mixin_of(cell)
            try:
                params = add(index, path, cell)
            except BaseException:
                strip_attrs(cell, names)
                raise
            done.append(Injection(path, cell, type(cell), names, list(params)))
            cell.__class__ = patched_class(mixin, type(cell))
    except BaseException:
        for injection in reversed(done):
            restore(injection)
        raise
    return done


# ----------------------------------------------------------------------------- projections
def loaded_class(module: str, name: str) -> Optional[type]:
    """The class ``name`` of ``module`` when that module is already imported, else None.

    Only looks, never imports: importing MindFormers costs seconds, and a net cannot hold one of
    its cells unless it was imported.
    """
    return getattr(sys.modules.get(module), name, None)


def mindformers_linear() -> Optional[type]:
    """MindFormers' legacy ``Linear`` class when MindFormers is already imported, else None."""
    return loaded_class("mindformers.modules.layers", "Linear")


def linear_experts_reason(cell: nn.Cell) -> Optional[str]:
    """Why a MindFormers ``Linear`` with experts cannot be adapted (every method refuses it), or None."""
    if cell.expert_flag or cell.use_gmm:
        return "Linear with experts (expert_num > 1 or use_gmm) is not supported"
    return None


def projection_reason(cell: nn.Cell, method: str) -> Optional[str]:
    """None when ``cell`` is an ``nn.Dense`` or a MindFormers ``Linear`` without experts (what the
    methods that wrap a whole projection's call can adapt), else why not, naming ``method``."""
    linear = mindformers_linear()
    if isinstance(cell, nn.Dense):
        return None
    if linear is not None and isinstance(cell, linear):
        return linear_experts_reason(cell)
    return f"{method} adapts mindspore.nn.Dense and mindformers.modules.layers.Linear"


def weight_is_out_in(cell: nn.Cell) -> bool:
    """True when the cell's weight is stored [out, in] (Dense; Linear with transpose_b), False for [in, out]."""
    return getattr(cell, "transpose_b", True) is not False


def shared_switch(name: str, on_value: float = 1.0) -> Parameter:
    """One switch Parameter (a float32 scalar) for all the cells of one adapter: switching is one write
    of its value, a data change that graph mode needs no recompile for (as LoRA's ``pet_lora_scale``)."""
    return Parameter(np.array(on_value, np.float32), name=name, requires_grad=False)


class LinearTargets:
    """Target selection of a method on Dense / MindFormers Linear cells (LoHa, LoKr, VeRA, AdaLoRA): the cells
    the five selection fields choose (``target_modules``, ``exclude_layers``, ``exclude_modules``,
    ``layers_to_transform``, ``layers_pattern``) that :func:`projection_reason` accepts, skipping cells the
    method already patched (their class carries ``pet_hooks_<pet_type>``)."""

    label: str
    pet_types: Tuple[str, ...]

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return projection_reason(cell, self.label)

    def is_linear(self, cell: nn.Cell) -> bool:
        return self.can_adapt(cell) is None

    def select_targets(self, net: nn.Cell, cfg):
        marker = f"pet_hooks_{self.pet_types[0]}"
        return select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=self.can_adapt,
                            skip=lambda path, cell: getattr(type(cell), marker, False) is True,
                            exclude_modules=cfg.exclude_modules, layers_to_transform=cfg.layers_to_transform,
                            layers_pattern=cfg.layers_pattern, is_linear=self.is_linear)


class SwitchedTuner(Tuner):
    """A tuner whose cells are moved onto a generated class (:func:`inject_all`) and share one on/off
    switch Parameter (:func:`shared_switch`, 1 or 0), kept on every adapted cell as ``switch_attr``:
    undoing is :func:`restore`, the deltas are the injection's parameters, and switching is one write of
    the shared switch, a data change (IA3, the bottleneck adapters)."""

    switch_is_data = True      # on/off writes the switch only: no recompile
    switch_attr: str = ""

    def eject(self, injection: Injection) -> None:
        restore(injection)

    def deltas_of(self, injection: Injection) -> List[Parameter]:
        return list(injection.params)

    def set_active(self, injections, active: bool) -> None:
        for switch in self.switch_parameters(injections):
            write_values(switch, np.array(1.0 if active else 0.0, np.float32))

    def switch_parameters(self, injections) -> List[Parameter]:
        switches = (getattr(injection.cell, self.switch_attr) for injection in injections)
        return list({id(switch): switch for switch in switches}.values())
