"""Several LoRA adapters sharing each adapted cell: which values sit in the cell's parameters, and the rest.

The compiled graph holds one branch per adapted cell, whatever the number of adapters. Its
parameters are the cell's "slot"::

    lora_A [R, in]   lora_B [out, R]   pet_lora_scale [R, 1]    R = the sum of the ranks it holds

The slot holds the rows (A) and columns (B) of the cell's *occupants*, the adapters listed in
the injection's ``occupants``, concatenated along the rank in that order; each row's scale is its
adapter's scaling while the adapter is active, else 0. ``B_1 s_1 A_1 + B_2 s_2 A_2`` is one
rank-(r1 + r2) product, so several active adapters add up as PEFT adds them. Every other
adapter's values for the cell live on the host, in ``NamedAdapter.stored``.

Switching (:func:`compose`) copies values out of the slot and in: when the new occupants have
the same total rank and dtype, only tensor values change and a graph compiled before keeps
running (no recompile); otherwise the slot gets new Parameters of the new shape, a structural
change the caller reports to graph mode. A cell that no active adapter adapts keeps what it
holds with its scales at 0 ("parked": it adds exactly nothing and does not train), so switching
between adapters of different targets is a data change too.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np
from mindspore import Parameter, nn
from mindspore.common import dtype as mstype

from ..utils.ms_compat import write_values
from ..utils.files import to_numpy
from ..surgery.freeze import delta_requires_grad
from ..tuners.lora.tuner import param_data, takes_dropout

__all__ = ["RANK_AXIS", "SLOT_ATTRS", "compose", "bank", "adapter_arrays", "slot_objects", "live", "scaling_of"]

#: the delta attributes of a slot and the axis of each along which the rank runs
RANK_AXIS: Mapping[str, int] = {"lora_A": -2, "lora_B": -1}
#: what a slot consists of (the deltas, the scale, the dropout cell)
SLOT_ATTRS = ("lora_A", "lora_B", "pet_lora_scale", "lora_dropout")


def _rank(state, name: str, path: str) -> int:
    """Adapter ``name``'s rank in the cell at ``path`` (its ``rank_pattern`` may give the cell its own)."""
    return int(state.adapters[name].config.for_module(path).lora_rank)


def scaling_of(state, name: str, path: str) -> float:
    """Adapter ``name``'s scaling in the cell at ``path`` (its ``rank_pattern`` / ``alpha_pattern`` apply)."""
    return state.adapters[name].config.for_module(path).scaling


def rows_of(state, injection, name: str) -> slice:
    """The rank positions of ``name`` in the injection's slot."""
    offset = 0
    for occupant in injection.occupants:
        rank = _rank(state, occupant, injection.path)
        if occupant == name:
            return slice(offset, offset + rank)
        offset += rank
    raise KeyError(name)


def _take(array: np.ndarray, attr: str, rows: slice) -> np.ndarray:
    """A copy of ``rows`` along the rank axis (``asnumpy`` shares the tensor's memory, which the next
    write into the slot overwrites)."""
    index = [slice(None)] * array.ndim
    index[RANK_AXIS[attr]] = rows
    return np.array(array[tuple(index)], copy=True, order="C")


def _slot_arrays(injection) -> Dict[str, np.ndarray]:
    return {attr: to_numpy(getattr(injection.cell, attr)) for attr in RANK_AXIS}


def _occupant_values(state, injection, name: str, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Copies of occupant ``name``'s rows (A) and columns (B) of the slot ``arrays``."""
    rows = rows_of(state, injection, name)
    return {attr: _take(arrays[attr], attr, rows) for attr in RANK_AXIS}


def adapter_arrays(state, name: str) -> Dict[str, Dict[str, np.ndarray]]:
    """cell path -> {"lora_A": [r, in], "lora_B": [out, r]} of adapter ``name``, wherever its values are."""
    adapter = state.adapters[name]
    by_path = {injection.path: injection for injection in state.cells}
    out = {}
    for path in adapter.paths:
        injection = by_path[path]
        if name in injection.occupants:
            out[path] = _occupant_values(state, injection, name, _slot_arrays(injection))
        else:
            out[path] = {attr: np.array(value) for attr, value in adapter.stored[path].items()}
    return out


def bank(state, injection) -> None:
    """Copy the values of the injection's occupants out of its slot into their ``stored`` arrays; it is then vacant."""
    if not injection.occupants:
        return
    arrays = _slot_arrays(injection)
    for name in injection.occupants:
        state.adapters[name].stored[injection.path] = _occupant_values(state, injection, name, arrays)
    injection.occupants = []


def live(state, injection, names: Iterable[str]) -> List[str]:
    """The adapters among ``names`` that adapt the injection's cell, in the order given."""
    return [name for name in names if injection.path in state.adapters[name].paths]


def _install(cell: nn.Cell, attr: str, values: np.ndarray, dtype, reuse: Optional[Parameter]) -> bool:
    """Put ``values`` into the cell's ``attr``: written into the Parameter there (or into ``reuse``, put back)
    when its shape and dtype fit, else a new Parameter of the same name. True when the cell now holds
    another Parameter object (a change of structure for graph mode)."""
    current = getattr(cell, attr)
    for param in (reuse, current):
        if param is not None and tuple(param.shape) == tuple(values.shape) and param.dtype == dtype:
            write_values(param, values)
            if param is current:
                return False
            setattr(cell, attr, param)
            return True
    setattr(cell, attr, Parameter(param_data(values, dtype), name=current.name, requires_grad=False))
    return True


def _rate(dropout: Optional[nn.Cell]) -> float:
    return 0.0 if dropout is None else float(dropout.p)


def _set_dropout(cell: nn.Cell, injection, rate: float, reuse: Dict[str, object]) -> bool:
    """Give the cell a dropout of ``rate`` (none at 0, and none where LoRA applies none: a branch folded into a
    weight, an embedding), the one held before when ``reuse`` has it. True when it changed."""
    wanted = float(rate) if takes_dropout(cell, getattr(injection, "parent", None) is not None) else 0.0
    if "lora_dropout" in reuse and reuse["lora_dropout"] is not cell.lora_dropout:
        before = reuse["lora_dropout"]
        if _rate(before) == wanted:
            cell.lora_dropout = before
            return True
    if _rate(cell.lora_dropout) == wanted:
        return False
    if wanted == 0.0:
        cell.lora_dropout = None
    else:
        cell.lora_dropout = nn.Dropout(p=wanted)
        cell.lora_dropout.set_train(cell.training)
    return True


def _fill(state, injection, wanted: List[str], kept: Dict[str, object]) -> bool:
    """The slot's values: ``wanted``'s (the occupants banked first), or the Parameter objects held before
    (``kept``). True when the cell holds other Parameter objects now."""
    cell = injection.cell
    changed = False
    if wanted and wanted != injection.occupants:
        bank(state, injection)
        stored = [state.adapters[name].stored.pop(injection.path) for name in wanted]
        dtype = getattr(mstype, state.adapters[wanted[0]].config.param_init_type)
        for attr, axis in RANK_AXIS.items():
            values = np.concatenate([arrays[attr] for arrays in stored], axis=axis)
            changed |= _install(cell, attr, values, dtype, kept.get(attr))
        injection.occupants = wanted
    elif kept and any(getattr(cell, attr) is not kept[attr] for attr in RANK_AXIS):
        for attr in RANK_AXIS:               # same occupants, other objects: put the old ones back
            current = getattr(cell, attr)
            changed |= _install(cell, attr, to_numpy(current), current.dtype, kept[attr])
    else:
        return False
    injection.params = [cell.lora_A, cell.lora_B]
    return changed


def _switch(state, injection, names: List[str], wanted: List[str], kept: Dict[str, object]) -> bool:
    """Each rank row's scale (its adapter's scaling while active and the net enabled, else 0), the deltas'
    ``requires_grad`` (trainable where an active adapter adapts the cell) and the dropout of the active
    ones. True when the cell changed structure."""
    cell = injection.cell
    path = injection.path
    scaling = [np.full(_rank(state, name, path), scaling_of(state, name, path) if name in names else 0.0,
                       np.float32) for name in injection.occupants]
    cell.pet_lora_rank_scaling = (np.concatenate(scaling) if scaling
                                  else np.zeros(int(cell.lora_A.shape[-2]), np.float32))
    if injection.occupants:
        cell.lora_scaling = scaling_of(state, injection.occupants[0], path)
    on = cell.pet_lora_rank_scaling[:, None] * (1.0 if state.enabled else 0.0)
    changed = _install(cell, "pet_lora_scale", on, mstype.float32, kept.get("pet_lora_scale"))
    for param in injection.params:
        param.requires_grad = bool(wanted) and delta_requires_grad(param.name, state.adapters[wanted[0]].config)
    if wanted:
        changed |= _set_dropout(cell, injection, state.adapters[wanted[0]].config.lora_dropout, kept)
    return changed


def slot_objects(state) -> Dict[int, Dict[str, object]]:
    """id(injection) -> the objects its slot holds now, for :func:`compose` to put back (``reuse``)."""
    return {id(injection): {attr: getattr(injection.cell, attr) for attr in SLOT_ATTRS} for injection in state.cells}


def compose(state, names: List[str], reuse: Optional[Dict[int, Dict[str, object]]] = None) -> bool:
    """Make ``names`` the active adapters: their values into the slots of the cells they adapt, every
    scale and ``requires_grad`` flag set. ``reuse`` (from :func:`slot_objects`) puts back the very
    Parameter objects held before. True when a cell changed structure (graph mode must recompile)."""
    structural = False
    for injection in state.cells:
        wanted = live(state, injection, names)
        kept = (reuse or {}).get(id(injection), {})
        structural |= _fill(state, injection, wanted, kept)
        structural |= _switch(state, injection, names, wanted, kept)
    state.activate(names, [injection for injection in state.cells if live(state, injection, names)])
    return structural
