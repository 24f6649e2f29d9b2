"""Several named adapters on one net, in PEFT's words: add, switch, list, delete.

    pet_hooks.apply(net, cfg)                       # the adapter "default", active
    pet_hooks.add_adapter(net, "task_b", cfg_b)     # another LoRA (rank, alpha, targets may differ); inactive
    pet_hooks.set_adapter(net, "task_b")            # or a list: several active, their deltas summed
    pet_hooks.active_adapters(net), pet_hooks.list_adapters(net)
    pet_hooks.delete_adapter(net, "default")        # not the active one

The base model is shared; only the active adapters' deltas are trainable and in
``delta_parameters(net)``. Values move between the adapted cells' parameters and the host
(``multi/slots.py``): switching between adapters of the same ranks changes tensor values
only, so a net compiled in graph mode runs on without recompiling; a switch that changes a
cell's total rank, its dtype or its dropout rate, and adding or deleting cells, recompile once.

An optimizer holds the parameters of the cells it was built over: after ``set_adapter`` it
trains the adapter now active there, with the moments it had gathered; build a new optimizer
after a switch (the front doors build theirs at train begin).

Several adapters are a LoRA feature: the other methods keep one adapter per net.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
from mindspore import nn

from . import weighted
from ..config.pet_config import LoraConfig, PetConfigError, check_adapter_name, load_config
from ..errors import PetStateError, UnsupportedCellError
from ..surgery.core import NamedAdapter, PetState, state_owner, after_change, require_state
from ..tuners.lora import inits as lora_init
from . import rows as lora_rows, slots as lora_slots
from ..tuners.common import init_rng
from ..tuners.lora.tuner import LoraTargets, LoraTuner, initial_values, select_targets, single_adapter_reason

__all__ = ["add_adapter", "set_adapter", "active_adapters", "delete_adapter", "list_adapters", "focused",
           "check_hotswap_config", "rescale_adapter",
           "adapter_config", "adapter_per_row", "RowSelection", "add_weighted_adapter", "Names"]

Names = Union[str, Sequence[str]]


def _lora_state(net: nn.Cell, action: str) -> PetState:
    state = require_state(net, action)
    if not isinstance(state.tuner, LoraTuner):
        raise PetStateError(f"cannot {action}: several adapters are a LoRA feature, and {type(net).__name__} has "
                            f"{state.config.pet_type} (one adapter per net)")
    return state


def _known(state: PetState, name, field: str = "adapter_name") -> str:
    if not isinstance(name, str) or name not in state.adapters:
        raise PetConfigError(f"{field} {name!r} is not an adapter of this net; it has {list(state.adapters)}")
    return name


def list_adapters(net: nn.Cell) -> List[str]:
    """The names of the net's adapters, in the order they were added."""
    return list(require_state(net, "list adapters").adapters)


def active_adapters(net: nn.Cell) -> List[str]:
    """The names of the active adapters (their deltas compute and train)."""
    return list(require_state(net, "list the active adapters").active)


def adapter_config(net: nn.Cell, name: str):
    """The config of adapter ``name``."""
    state = require_state(net, "read an adapter's config")
    return state.adapters[_known(state, name)].config


def _check_compatible(state: PetState, names: List[str],
                      fields: Sequence[str] = ("lora_dropout", "param_init_type", "compute_dtype")) -> None:
    """Adapters active together share each cell's dropout and parameter dtype: refuse when they differ."""
    first = state.adapters[names[0]].config
    for name in names[1:]:
        cfg = state.adapters[name].config
        for field in fields:
            if getattr(cfg, field) != getattr(first, field):
                raise PetConfigError(f"adapters {names[0]!r} and {name!r} cannot be active together: their "
                                     f"{field} differ ({getattr(first, field)!r} vs {getattr(cfg, field)!r})")


def _names(state: PetState, names: Names) -> List[str]:
    listed = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else None
    if not listed:
        raise PetConfigError(f"adapter_name must be an adapter's name or a non-empty list of names, got {names!r}")
    for name in listed:
        _known(state, name)
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    if duplicates:
        raise PetConfigError(f"adapter name(s) {duplicates} given more than once")
    return listed


def set_adapter(net: nn.Cell, names: Names) -> nn.Cell:
    """Make ``names`` (one name or a list) the active adapters; the others stop computing and training.

    Raises:
        PetConfigError: an unknown or repeated name, or adapters that cannot be active together.
        PetStateError: the net is merged (unmerge first). The net is left as it was.
    """
    state = _lora_state(net, "set the adapter")
    names = _names(state, names)
    if state.merged:
        raise PetStateError("cannot set_adapter on a merged net: call pet_hooks.unmerge(net) first")
    _check_compatible(state, names)
    if names == state.active:
        return net
    structural = lora_slots.compose(state, names)
    after_change(net, state, structural)
    return net


def check_hotswap_config(state: PetState, name: str, cfg, source: str) -> None:
    """A hot swap of adapter ``name`` may bring another scaling (``lora_alpha``, ``use_rslora``,
    ``alpha_pattern``), nothing else: PetStateError naming ``source`` when ``cfg`` differs from the adapter's
    config in more. ``rank_pattern`` may be spelled otherwise (a PEFT file's names) if every cell keeps its rank."""
    old = state.adapters[name].config
    if isinstance(old, LoraConfig) and type(cfg) is type(old):
        same = dataclasses.replace(cfg, lora_alpha=old.lora_alpha, use_rslora=old.use_rslora, rank_pattern={},
                                   alpha_pattern={}) == dataclasses.replace(old, rank_pattern={}, alpha_pattern={})
        same = same and all(cfg.for_module(path).lora_rank == old.for_module(path).lora_rank
                            for path in state.adapters[name].paths)
    else:
        same = cfg == old
    if not same:
        raise PetStateError(f"{source} does not fit adapter {name!r} for a hot swap: its config "
                            f"{cfg.to_dict()} differs from the adapter's {old.to_dict()} in more than "
                            f"lora_alpha / use_rslora / alpha_pattern (ranks and targets must be the same)")


def rescale_adapter(state: PetState, name: str, cfg) -> None:
    """Adapter ``name`` takes ``cfg`` (checked by :func:`check_hotswap_config`): a new scaling is data, written
    into the cells' scales; the same config changes nothing."""
    if cfg != state.adapters[name].config:
        state.adapters[name].config = cfg
        lora_slots.compose(state, state.active)


def _check_new_name(state: PetState, name) -> None:
    check_adapter_name(name)
    if name in state.adapters:
        raise PetConfigError(f"adapter_name {name!r} is taken: the net has adapters {list(state.adapters)} "
                             f"(delete_adapter first, or load with hotswap=True to replace its values)")


def _refuse_single_only(configs) -> None:
    """DoRA (a magnitude per cell) and PiSSA / OLoRA (the base weight replaced by one adapter's residual) keep
    one adapter per net: refuse another next to them."""
    for who, cfg in configs:
        if getattr(cfg, "use_dora", False):
            raise PetConfigError(f"add_adapter: {who} uses DoRA (use_dora), which keeps one adapter per net")
        if lora_init.mutates_base(cfg):
            raise PetConfigError(f"add_adapter: {who} uses init_lora_weights={cfg.init_lora_weights!r}, which "
                                 f"replaces the base weights by its residual; it keeps one adapter per net")
        if getattr(cfg, "lora_bias", False):
            # the bias is one [out] vector per cell, outside the rank slots several adapters share (multi/slots.py)
            raise PetConfigError(f"add_adapter: {who} uses lora_bias=True, which keeps one adapter per net")
        if getattr(cfg, "trainable_token_indices", None) is not None:     # config trainable_token_indices
            raise PetConfigError(f"add_adapter: {who} has trainable_token_indices, whose rows pet_hooks keeps for "
                                 f"one adapter per net (not yet switched with set_adapter)")
        if getattr(cfg, "modules_to_save", None):    # config modules_to_save: its copies follow one adapter
            raise PetConfigError(f"add_adapter: {who} has modules_to_save {cfg.modules_to_save!r}, whose copies "
                                 f"pet_hooks keeps for one adapter per net (not yet switched with set_adapter)")


def _refuse_experts(cells, action: str) -> None:
    """Cells whose LoRA kind keeps one adapter per net (grouped MoE experts) refuse another."""
    single = [(path, reason) for path, cell in cells for reason in (single_adapter_reason(cell),) if reason]
    if single:
        raise UnsupportedCellError(f"cannot {action}: cell '{single[0][0]}' {single[0][1]}")


def add_adapter(net: nn.Cell, adapter_name: str, cfg) -> nn.Cell:
    """Add the LoRA adapter ``adapter_name`` of config ``cfg`` to a net that has PET; it starts inactive.

    Its rank, alpha and targets may differ from the other adapters'. Cells no adapter adapted yet
    are adapted now (a structural change); the adapter's values are initialised as ``apply`` would.

    Raises:
        PetConfigError: a bad or taken name, a config that is not LoRA or that freezes or keeps
            parameters (``freeze_include`` / ``freeze_exclude``: one net, one set of frozen base
            weights), a pattern that matches nothing. The net is left as it was.
    """
    state = _lora_state(net, "add an adapter")
    _check_new_name(state, adapter_name)
    cfg = load_config(cfg)
    if not isinstance(cfg, LoraConfig):
        raise PetConfigError(f"add_adapter takes a LoRA config; pet_type {cfg.pet_type!r} keeps one adapter per net")
    for field in ("freeze_include", "freeze_exclude", "bias"):
        if getattr(cfg, field) and getattr(cfg, field) != "none":
            raise PetConfigError(f"add_adapter: {field} {getattr(cfg, field)!r} would change which base parameters "
                                 f"train, which all adapters of a net share; set it on the first adapter only")
    _refuse_single_only([("the new adapter", cfg)] + [(repr(n), a.config) for n, a in state.adapters.items()])
    adapted = {injection.path: injection for injection in state.cells}
    model = state_owner(net)                   # the cell apply adapted (net may wrap it): paths relative to it
    targets = select_targets(model, cfg, include_adapted=True)        # validates; changes nothing
    _refuse_experts(list(targets) + [(r.path, r.cell) for r in state.cells], "add an adapter")
    rng = init_rng(cfg)
    stored = {}
    for path, cell in targets:                  # drawn in net order, as apply would for this config
        stored[path] = initial_values(cell, cfg.for_module(path), rng)
    new = LoraTargets([(p, c) for p, c in targets if p not in adapted],
                      {p: c for p, c in targets.parents.items() if p not in adapted})
    injections = state.tuner.inject(new, cfg) if new else []
    order = {path: index for index, (path, _) in enumerate(model.cells_and_names())}
    state.cells = sorted(state.cells + injections, key=lambda injection: order[injection.path])
    state.adapters[adapter_name] = NamedAdapter(adapter_name, cfg, [path for path, _ in targets], stored)
    lora_slots.compose(state, state.active)     # the new cells parked: scale 0, not trainable
    after_change(net, state, bool(injections))
    return net


def delete_adapter(net: nn.Cell, adapter_name: str) -> nn.Cell:
    """Delete an inactive adapter; cells no remaining adapter adapts get their original class back.

    Raises:
        PetConfigError: an unknown name. PetStateError: the adapter is active (set another first).
    """
    state = _lora_state(net, "delete an adapter")
    _known(state, adapter_name)
    if adapter_name in state.active:
        raise PetStateError(f"cannot delete adapter {adapter_name!r}: it is active; set_adapter to another first "
                            f"(or pet_hooks.remove(net) to take PET away)")
    for injection in state.cells:
        if adapter_name in injection.occupants:
            lora_slots.bank(state, injection)
    del state.adapters[adapter_name]
    targeted = {path for adapter in state.adapters.values() for path in adapter.paths}
    orphans = [injection for injection in state.cells if injection.path not in targeted]
    for injection in reversed(orphans):
        state.tuner.eject(injection)
    state.cells = [injection for injection in state.cells if injection.path in targeted]
    for adapter in state.adapters.values():
        for path in [p for p in adapter.stored if p not in targeted]:
            del adapter.stored[path]
    lora_slots.compose(state, state.active)
    after_change(net, state, bool(orphans))
    return net


@contextlib.contextmanager
def _held(net: nn.Cell, state: PetState) -> Iterator[None]:
    """After the block the net holds the very Parameter objects (values, flags) and active adapters it held
    before; what the block wrote into an adapter's values stays with that adapter."""
    before_active, held = list(state.active), lora_slots.slot_objects(state)
    flags = {id(p): p.requires_grad for injection in state.cells for p in injection.params}
    try:
        yield
    finally:
        lora_slots.compose(state, before_active, reuse=held)
        for injection in state.cells:
            for param in injection.params:
                param.requires_grad = flags.get(id(param), param.requires_grad)


@contextlib.contextmanager
def focused(net: nn.Cell, adapter_name: str) -> Iterator[PetState]:
    """Inside the block ``adapter_name`` alone is active, with parameters of its exact shapes: what the file
    formats read and write. After it, the net holds the very Parameter objects it held before, with their
    values (an optimizer built over them stays valid), and the adapter keeps what was written in the block."""
    state = require_state(net, "choose an adapter")
    _known(state, adapter_name)
    if state.active == [adapter_name]:
        yield state
        return
    with _held(net, state):
        lora_slots.compose(state, [adapter_name])
        yield state


class RowSelection:
    """What :func:`adapter_per_row` gives: the adapter of each row; :meth:`set` changes them."""

    def __init__(self, state: PetState, names: List[str]):
        self._state = state
        self.names = names

    def set(self, names: Sequence[str]) -> None:
        """Another adapter per row, as many rows: only tensor values change (no recompile)."""
        names = _row_names(self._state, names)
        if len(names) != len(self.names):
            raise PetConfigError(f"adapter_per_row: {len(names)} row names for a selection of {len(self.names)} rows; "
                                 f"open a new adapter_per_row block for another batch size")
        lora_rows.write_masks(self._state, names)
        self.names = names


def _row_names(state: PetState, names: Sequence[str]) -> List[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise PetConfigError(f"adapter_per_row takes a non-empty list of adapter names (one per row, "
                             f"{lora_rows.BASE!r} for the base model), got {names!r}")
    for name in names:
        if name != lora_rows.BASE:
            _known(state, name, "adapter_per_row name")
    return list(names)


@contextlib.contextmanager
def adapter_per_row(net: nn.Cell, names: Sequence[str]) -> Iterator[RowSelection]:
    """Inside the block row ``b`` of every batch goes through adapter ``names[b]`` (``"__base__"``: none).

    For inference (``net.set_train(False)``): each row's output equals that row run alone with its
    adapter. Entering and leaving the block change the cells (one compile each in graph mode);
    ``selection.set([...])`` inside it changes only values. The rows are the leading axis of
    every adapted cell's input (``nn.Dense``, MindFormers' legacy ``Linear``).

    Raises:
        PetConfigError: unknown names; PetStateError: a merged net or one in training mode;
        UnsupportedCellError: a cell whose delta cannot differ per row, named. The net is left as it was.
    """
    state = _lora_state(net, "select adapters per row")
    rows = _row_names(state, names)
    if state.merged:
        raise PetStateError("adapter_per_row needs the adapters unmerged: call pet_hooks.unmerge(net) first")
    training = [injection.path for injection in state.cells if injection.cell.training]
    if training:
        raise PetStateError(f"adapter_per_row is for inference, but cell '{training[0]}' is in training mode: "
                            f"call net.set_train(False) first")
    biased = [name for name, adapter in state.adapters.items() if getattr(adapter.config, "lora_bias", False)]
    if biased:      # the per-row branch (multi/rows.py) masks rank positions; lora_bias's vector has none
        raise PetConfigError(f"adapter_per_row: adapter {biased[0]!r} uses lora_bias=True, whose bias cannot be "
                             f"selected per row")
    for injection in state.cells:
        reason = lora_rows.unsupported(injection)
        if reason:
            raise UnsupportedCellError(f"adapter_per_row cannot select per row in cell '{injection.path}' "
                                       f"({injection.original_class.__name__}): {reason}")
    everyone = list(state.adapters)
    _check_compatible(state, everyone, ("param_init_type", "compute_dtype"))
    with _held(net, state):
        lora_slots.compose(state, everyone)         # every adapter in every slot
        lora_rows.install(state, rows)
        after_change(net, state, True)
        try:
            yield RowSelection(state, rows)
        finally:
            lora_rows.uninstall(state)
    after_change(net, state, True)


def _paths_pattern(paths: Sequence[str]) -> str:
    """A ``target_modules`` regex that full-matches exactly ``paths``."""
    return "|".join(re.escape(path) for path in paths)


def add_weighted_adapter(net: nn.Cell, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total", seed: Optional[int] = None) -> nn.Cell:
    """Add the adapter ``adapter_name`` combining ``adapters`` with ``weights``, as PEFT's
    ``add_weighted_adapter`` does (``pet_hooks.multi.weighted``: "linear", "cat", "svd", "ties",
    "magnitude_prune", "dare_linear", "dare_ties" and their "_svd" forms; the arguments are PEFT's, plus
    ``seed``, required by the DARE types: their random masks are drawn from it with NumPy, not from
    torch's generator as in PEFT, so the same seed gives the same adapter). It starts inactive; its
    config is the first adapter's with PEFT's new rank and ``lora_alpha`` (= rank) and the union of
    the targets.

    Raises:
        PetConfigError: an unknown or taken name, weights that do not match the adapters, adapters of
            different ranks or (unlike PEFT, which then mixes unrelated cells) different targets for
            the types that combine A and B separately ("linear", "ties", "magnitude_prune", "dare_linear",
            "dare_ties"), a bad argument (a DARE type without ``seed``, its ``density`` outside (0, 1]).
            The net is left as it was.
    """
    state = _lora_state(net, "add a weighted adapter")
    _check_new_name(state, adapter_name)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise PetConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    for name in adapters:
        _known(state, name, "adapters entry")
    if combination_type in weighted.SAME_TARGET_TYPES and len(adapters) > 1:
        first = set(state.adapters[adapters[0]].paths)
        for name in adapters[1:]:
            other = set(state.adapters[name].paths)
            if other != first:
                differ = sorted(first ^ other)
                raise PetConfigError(f"combination_type {combination_type!r} combines A and B of the same cells, but "
                                     f"adapters {adapters[0]!r} and {name!r} adapt different cells ({differ[:3]}); "
                                     f"use 'cat' or 'svd'")
    patterned = [name for name in adapters if state.adapters[name].config.has_patterns]
    if patterned:       # AdapterWeights holds one rank and one scaling per adapter
        cfg = state.adapters[patterned[0]].config
        raise PetConfigError(f"add_weighted_adapter: adapter {patterned[0]!r} has rank_pattern {cfg.rank_pattern!r} / "
                             f"alpha_pattern {cfg.alpha_pattern!r}; weighted merges of adapters whose rank or "
                             f"alpha differs per cell are not supported")
    inputs = []
    for name in adapters:
        cfg = state.adapters[name].config
        arrays = lora_slots.adapter_arrays(state, name)
        inputs.append(weighted.AdapterWeights(
            name=name, rank=cfg.lora_rank, alpha=float(cfg.lora_alpha), scaling=cfg.scaling,
            target_paths=list(state.adapters[name].paths), use_rslora=cfg.use_rslora,
            tensors={path: (a["lora_A"], a["lora_B"]) for path, a in arrays.items()}))
    combined = weighted.combine(inputs, list(weights) if isinstance(weights, (list, tuple)) else weights,
                                combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                                svd_full_matrices=svd_full_matrices, density=density,
                                majority_sign_method=majority_sign_method, svd_driver=svd_driver, seed=seed)
    first = state.adapters[adapters[0]].config
    cfg = dataclasses.replace(first, lora_rank=combined.rank, lora_alpha=combined.alpha,
                              use_rslora=combined.use_rslora, exclude_layers=None, rank_pattern={}, alpha_pattern={},
                              target_modules=_paths_pattern(combined.target_paths),
                              # issue 29: the union of the targets is the selection; no layer or exclusion rule
                              # of the first adapter may narrow it
                              exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    add_adapter(net, adapter_name, cfg)
    stored = state.adapters[adapter_name].stored           # inactive: its values live here
    for path, (a, b) in combined.tensors.items():
        stored[path] = {"lora_A": a.astype(np.float32), "lora_B": b.astype(np.float32)}
    return net
