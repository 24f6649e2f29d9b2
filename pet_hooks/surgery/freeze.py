"""Freezing: which parameters train after ``apply``, and the undo record of the flags before.

After ``apply`` exactly the deltas train, plus base parameters the config asks to keep
trainable with MindFormers' ``freeze_exclude`` (fnmatch wildcards over parameter names), and
the base biases of LoRA's ``bias`` (PEFT's: ``"all"``, every parameter named ``bias`` or
``*.bias``; ``"lora_only"``, the ``bias`` of the adapted cells, whose class then says
``pet_hooks_lora``); ``freeze_include`` wildcards freeze what they match unless ``freeze_exclude`` also does::

    before = freeze_for_pet(net, deltas, cfg)   # {param name: requires_grad before}
    restore_requires_grad(net, before)
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Dict, Iterable, List, Optional

from mindspore import Parameter, nn

from ..config.pet_config import PetConfig

__all__ = ["freeze_for_pet", "restore_requires_grad", "kept_trainable", "delta_requires_grad"]


def _matches(name: str, patterns: Optional[List[str]]) -> bool:
    return bool(patterns) and any(fnmatch(name, p) for p in patterns)


def delta_requires_grad(name: str, cfg: PetConfig) -> bool:
    """Whether the delta ``name`` trains under ``cfg``: unless ``freeze_include`` freezes it (and
    ``freeze_exclude`` does not take it back)."""
    return not (_matches(name, cfg.freeze_include) and not _matches(name, cfg.freeze_exclude))


def _trained_biases(net: nn.Cell, cfg: PetConfig) -> set:
    """ids of the base biases LoRA's ``bias`` trains (PEFT's ``_mark_only_adapters_as_trainable``)."""
    bias = getattr(cfg, "bias", "none")
    if bias == "all":
        return {id(p) for p in net.get_parameters() if p.name == "bias" or p.name.endswith(".bias")}
    if bias == "lora_only":
        return {id(cell.bias) for _, cell in net.cells_and_names()
                if getattr(type(cell), "pet_hooks_lora", False) is True and isinstance(getattr(cell, "bias", None),
                                                                                        Parameter)}
    return set()


def kept_trainable(net: nn.Cell, cfg: PetConfig, delta_ids: set) -> List[Parameter]:
    """Base parameters that ``freeze_exclude`` or LoRA's ``bias`` keeps trainable (and the adapter saves)."""
    biases = _trained_biases(net, cfg)
    return [p for p in net.get_parameters()
            if id(p) not in delta_ids and (id(p) in biases or (_matches(p.name, cfg.freeze_exclude)
                                                                 and not _matches(p.name, cfg.freeze_include)))]


def freeze_for_pet(net: nn.Cell, deltas: Iterable[Parameter], cfg: PetConfig,
                   switches: Iterable[Parameter] = ()) -> Dict[str, bool]:
    """Freeze every base parameter, unfreeze the deltas and the kept ones (never a switch).

    Returns the ``requires_grad`` flags before, keyed by parameter name, for the undo.
    """
    delta_ids = {id(p) for p in deltas}
    switch_ids = {id(p) for p in switches}
    before = {p.name: p.requires_grad for p in net.get_parameters()
              if id(p) not in delta_ids and id(p) not in switch_ids}
    if cfg.freeze_exclude:
        # A pattern may name deltas only (MindFormers' published ``freeze_include: ['*']``,
        # ``freeze_exclude: ['*lora*']`` keeps the deltas trainable): it must match some parameter.
        names = list(before) + [p.name for p in net.get_parameters() if id(p) in delta_ids]
        unmatched = [pat for pat in cfg.freeze_exclude if not any(fnmatch(n, pat) for n in names)]
        if unmatched:
            raise ValueError(f"freeze_exclude pattern(s) {unmatched} match no parameter of "
                             f"{type(net).__name__}")
    keep = {id(p) for p in kept_trainable(net, cfg, delta_ids | switch_ids)}
    for param in net.get_parameters():
        if id(param) in switch_ids:
            param.requires_grad = False
        elif id(param) in delta_ids:
            param.requires_grad = delta_requires_grad(param.name, cfg)
        else:
            param.requires_grad = id(param) in keep
    return before


def restore_requires_grad(net: nn.Cell, before: Dict[str, bool]) -> None:
    """Put back the flags ``freeze_for_pet`` recorded (parameters it did not see are left alone)."""
    for param in net.get_parameters():
        if param.name in before:
            param.requires_grad = before[param.name]
