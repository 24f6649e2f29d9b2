"""Config ``modules_to_save`` (PEFT's): a trainable copy of each named cell, computed instead of it.

    apply(net, {"pet_type": "lora", "target_modules": ["k"], "modules_to_save": ["down"]})

As PEFT's ``ModulesToSaveWrapper`` (``peft/utils/other.py``): every cell whose dotted path ends with an
entry (PEFT's ``key.endswith(target_key)``, plain string ends) gets a copy of itself whose parameters are
clones, named ``<path>.modules_to_save.<adapter>.<param>`` and trainable; the original's parameters stay
frozen and are never written. The cell is moved onto a generated subclass (graph mode compiles the
source of ``construct``, so a wrapped method would be skipped there) whose ``construct`` calls the copy, or
its own computation while the adapter is disabled. The parent's attribute keeps the same cell object, so
base parameter names and the parent's structure do not change; ``uninstall`` takes the copy away and
gives the cell its class back, bit for bit the original.

The switch is structural (a Python bool read when graph mode compiles), not data: a data switch would
compute both the copy and the original on every call. Switching therefore recompiles, which only
``disable_adapters`` does. ``freeze_exclude`` stays what it was: the original trained in place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from mindspore import Parameter, nn

from ..errors import NoMatchError, PetConfigError, UnsupportedCellError
from ..matching.cells import nearest_names
from ..tuners.common import patched_class, strip_attrs

__all__ = ["SavedCopy", "select", "install", "uninstall", "set_active", "copy_parameters", "unloaded_values",
           "COPY_ATTR", "ON_ATTR"]

COPY_ATTR = "pet_mts_copy"      # the copy, a sub-cell of the original
ON_ATTR = "pet_mts_on"          # True: the copy computes; False (disable_adapters): the original does


class ModulesToSaveMixin:
    """The copy computes in place of the cell while ``pet_mts_on``, called as the cell was."""

    def construct(self, *args, **kwargs):
        if self.pet_mts_on:
            return self.pet_mts_copy(*args, **kwargs)
        return self.pet_base_construct(*args, **kwargs)


@dataclass
class SavedCopy:
    """One cell of ``modules_to_save``: the cell, its class before, its copy and the copy's parameters."""

    path: str
    cell: nn.Cell
    original_class: type
    copy: nn.Cell
    params: List[Parameter]


def _name_matches(path: str, entry: str) -> bool:
    """PEFT's rule (``_set_trainable``): the module's name ends with the entry."""
    return path.endswith(entry)


def select(net: nn.Cell, names: Sequence[str], adapted: Sequence[str]) -> List[Tuple[str, nn.Cell]]:
    """The cells ``names`` select, in net order. ``adapted`` are the cells the method adapts.

    Raises NoMatchError for an entry matching no cell (naming it and the nearest cell names), and
    PetConfigError for a cell that the method also adapts, or that holds / sits inside another match
    or an adapted cell: one copy would hold the other's parameters twice.
    """
    cells = [(path, cell) for path, cell in net.cells_and_names() if path]
    for entry in names:
        if not any(_name_matches(path, entry) for path, _ in cells):
            # entries are ends of paths: offer the ends of the net's paths ("dense1", "mlp.dense1", ...)
            ends = dict.fromkeys(".".join(parts[i:]) for parts in (path.split(".") for path, _ in cells)
                                 for i in range(len(parts)))
            close = nearest_names(entry, list(ends))
            raise NoMatchError(f"modules_to_save entry {entry!r} matches no cell of {type(net).__name__} (a cell "
                               f"matches when its path ends with the entry)"
                               + (f"; nearest cell names: {close}" if close else ""))
    chosen = [(path, cell) for path, cell in cells if any(_name_matches(path, entry) for entry in names)]
    def nested(one: str, two: str) -> bool:
        return one.startswith(two + ".") or two.startswith(one + ".")

    for path, cell in chosen:
        if path in adapted:
            raise PetConfigError(f"modules_to_save cell '{path}' is also a target of the adapter: a cell is either "
                                 f"adapted or copied, not both")
        inside = [other for other in adapted if nested(path, other)]
        inside += [other for other, _ in chosen if other != path and nested(path, other)]
        if inside:
            raise PetConfigError(f"modules_to_save cell '{path}' and {'adapted' if inside[0] in adapted else 'copied'} "
                                 f"cell '{inside[0]}' are nested: name cells that do not contain each other")
        if isinstance(cell.__dict__.get(ON_ATTR), bool) or hasattr(cell, COPY_ATTR):
            raise UnsupportedCellError(f"modules_to_save cell '{path}' ({type(cell).__name__}) already has a copy")
    return chosen


def _clone(cell: nn.Cell) -> Tuple[nn.Cell, List[Tuple[str, Parameter]]]:
    """A copy of ``cell`` whose parameters are new Parameters holding the original's values (bit for bit),
    trainable: (the copy, [(dotted name inside the cell, parameter)])."""
    originals = dict(cell.parameters_and_names())
    # the parameters are not deep-copied (the memo hands back the originals): each is replaced by its clone
    # below, so a large table (a head tied to the embedding) is not held three times on the way
    duplicate = copy.deepcopy(cell, {id(param): param for param in originals.values()})
    params = []
    for local in list(dict(duplicate.parameters_and_names())):
        owner_path, _, leaf = local.rpartition(".")
        owner = duplicate
        for part in owner_path.split(".") if owner_path else ():
            owner = getattr(owner, part)
        clone = originals[local].clone(init="same")
        setattr(owner, leaf, clone)
        clone.requires_grad = True
        params.append((local, clone))
    return duplicate, params


def install(net: nn.Cell, targets: List[Tuple[str, nn.Cell]], adapter_name: str) -> List[SavedCopy]:
    """Give every target its copy (all or nothing); the copies' parameters are trainable."""
    done: List[SavedCopy] = []
    try:
        for path, cell in targets:
            duplicate, params = _clone(cell)
            original_class = type(cell)
            setattr(cell, COPY_ATTR, duplicate)
            setattr(cell, ON_ATTR, True)
            for local, param in params:     # after attaching: MindSpore names a parameter when it is set
                param.name = f"{path}.modules_to_save.{adapter_name}.{local}"
            done.append(SavedCopy(path, cell, original_class, duplicate, [p for _, p in params]))
            cell.__class__ = patched_class(ModulesToSaveMixin, original_class)
    except BaseException:
        uninstall(done)
        for path, cell in targets[len(done):]:
            strip_attrs(cell, (COPY_ATTR, ON_ATTR))
        raise
    return done


def uninstall(copies: List[SavedCopy]) -> None:
    """The cells back: their class, no copy (their own parameters were never touched)."""
    for saved in reversed(copies):
        saved.cell.__class__ = saved.original_class
        strip_attrs(saved.cell, (COPY_ATTR, ON_ATTR))


def set_active(copies: List[SavedCopy], active: bool) -> bool:
    """The copies compute (True) or the originals do; True when something changed (graph mode recompiles)."""
    changed = False
    for saved in copies:
        if getattr(saved.cell, ON_ATTR) != active:
            setattr(saved.cell, ON_ATTR, active)
            changed = True
    return changed


def unloaded_values(copies: List[SavedCopy]) -> Dict[int, Parameter]:
    """id(an original's parameter) -> its copy's parameter: what PEFT's ``merge_and_unload`` leaves in the
    model (the copy in place of the original), for a merged full checkpoint."""
    out: Dict[int, Parameter] = {}
    for saved in copies:
        own = dict(saved.cell.parameters_and_names())      # the original's own names ("weight"), not the copy's
        for local, param in saved.copy.parameters_and_names():
            out[id(own[local])] = param
    return out


def copy_parameters(copies: List[SavedCopy]) -> List[Parameter]:
    """Every copy's parameters, in net order: trained and saved with the adapter."""
    return [param for saved in copies for param in saved.params]
