"""Config ``modules_to_save`` in Hugging Face PEFT's files, both ways (``peft_format`` calls these).

PEFT 0.21 saves a ``ModulesToSaveWrapper``'s copy without its ``modules_to_save.<adapter>.`` prefix
(``adapter_state_dict`` in ``peft/utils/other.py``): the copy of ``down`` is
``base_model.model.down.weight`` / ``.bias``, the module's own parameter names, and the config lists
the module names in ``modules_to_save``. pet_hooks names the copy's parameters
``<path>.modules_to_save.<adapter>.<param>`` (:mod:`pet_hooks.surgery.modules_to_save`); here the two
meet through the name map of the cell paths. The parameter names inside a copied cell pass unchanged
(``weight`` / ``bias`` of a Dense are torch's Linear's), so a cell whose parameters another framework
names otherwise (MindFormers' ``embedding_weight``) reads as a missing tensor, an error naming it.
"""
from __future__ import annotations

import dataclasses
import re

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import nn

from ..config.pet_config import PetConfig
from ..errors import AdapterFileError, PetConfigError
from ..matching.name_maps import MapFn, NameMapSpec, inverse_name_map, resolve_name_map
from ..surgery.core import PetState
from ..utils.files import to_numpy

__all__ = ["peft_tensors", "split_keys", "our_tensors", "with_copies", "align_adapter_names"]

_INFIX = ".modules_to_save."


def peft_tensors(state: PetState, fn: MapFn, label: str, prefix: str, net: nn.Cell) -> Tuple[Dict[str, np.ndarray],
                                                                                            Optional[List[str]]]:
    """(PEFT's keys -> the copies' values, PEFT's ``modules_to_save`` list or None when there are no copies)."""
    tensors: Dict[str, np.ndarray] = {}
    theirs: List[str] = []
    for saved in state.copies:
        module = fn(saved.path)
        if not isinstance(module, str) or not module:
            raise PetConfigError(f"name_map {label} leaves modules_to_save cell '{saved.path}' of "
                                 f"{type(net).__name__} unmapped; extend the map or pass another")
        theirs.append(module)
        for param in saved.params:
            local = param.name.split(_INFIX, 1)[1].split(".", 1)[1]      # after "<adapter>."
            tensors[f"{prefix}{module}.{local}"] = np.ascontiguousarray(to_numpy(param))
    return tensors, (theirs or None)


def split_keys(tensors: Mapping[str, np.ndarray], entries: Optional[Sequence[str]], prefix: str,
               weights_path: str) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]:
    """(their module -> {parameter path inside it: array} for the modules_to_save keys, the other keys).

    A key belongs to a copy when a dotted prefix of its module path ends with an entry (PEFT's rule); the
    shortest such prefix is the module (PEFT wraps the outer one).
    """
    copies: Dict[str, Dict[str, np.ndarray]] = {}
    rest: Dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        parts = key[len(prefix):].split(".") if entries and key.startswith(prefix) else []
        cut = next((i for i in range(1, len(parts)) if any(".".join(parts[:i]).endswith(e) for e in entries)), None)
        if cut is None:
            rest[key] = value
        else:
            copies.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = value
    for entry in entries or ():
        if not any(module.endswith(entry) for module in copies):
            raise AdapterFileError(f"{weights_path}: modules_to_save entry {entry!r} (adapter_config.json) has no "
                                   f"tensors ({prefix}<module ending with {entry!r}>.<param>)")
    return copies, rest


def our_tensors(net: nn.Cell, copies: Mapping[str, Mapping[str, np.ndarray]], spec: NameMapSpec,
                adapter_name: str, weights_path: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """(our parameter name -> array, our cell paths of the copies) for PEFT's copy tensors, through ``spec``."""
    label, fn = resolve_name_map(spec)
    inverse = inverse_name_map((path for path, _ in net.cells_and_names()), fn)
    out: Dict[str, np.ndarray] = {}
    paths: List[str] = []
    for module, params in sorted(copies.items()):
        if module not in inverse:
            raise AdapterFileError(f"{weights_path}: modules_to_save module '{module}' matches no cell of "
                                   f"{type(net).__name__} under name map {label}")
        paths.append(inverse[module])
        for local, value in params.items():
            out[f"{inverse[module]}{_INFIX}{adapter_name}.{local}"] = value
    return out, paths


def with_copies(cfg: PetConfig, paths: List[str]) -> PetConfig:
    """``cfg`` with ``modules_to_save`` naming the copied cells by their full paths (None without copies)."""
    return dataclasses.replace(cfg, modules_to_save=list(paths) or None)


_COPY_NAME = re.compile(r"(.+)" + re.escape(_INFIX) + r"([^.]+)\.(.+)")


def align_adapter_names(tensors: Mapping[str, np.ndarray], names) -> Dict[str, np.ndarray]:
    """A file's copy tensors renamed to the net's adapter name (``<path>.modules_to_save.<adapter>.<param>``):
    a native file saved as adapter ``default`` loads as adapter ``b`` too, as PEFT's files (no adapter name) do."""
    wanted = {}
    for name in names:
        found = _COPY_NAME.fullmatch(name)
        if found:
            wanted[(found.group(1), found.group(3))] = name
    out = {}
    for key, value in tensors.items():
        found = _COPY_NAME.fullmatch(key) if key not in wanted.values() else None
        out[wanted.get((found.group(1), found.group(3)), key) if found else key] = value
    return out
