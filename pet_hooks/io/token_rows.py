"""Config ``trainable_token_indices`` in Hugging Face PEFT's files, both ways (``peft_format`` calls these).

PEFT 0.21 saves an embedding's trainable rows as ``base_model.model.<module>.token_adapter.trainable_tokens_delta``
(``[len(indices), dim]``, the rows' new values; ``TrainableTokensWrapper.adapter_state_dict`` in
``peft/utils/other.py``); a head tied to the embedding saves nothing (it follows the embedding's). The config
holds ``trainable_token_indices``: a list (the model's input embedding) or ``{module name: indices}``.
pet_hooks writes the dict form with the embedding's full path through the name map, and reads both.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from mindspore import nn

from ..config.pet_config import PetConfig
from ..errors import AdapterFileError, PetConfigError
from ..matching.name_maps import MapFn, NameMapSpec, inverse_name_map, resolve_name_map
from ..surgery.core import PetState
from ..surgery.trainable_tokens import DELTA_LEAF
from ..utils.files import to_numpy

__all__ = ["peft_tensors", "split_keys", "our_tensors", "with_tokens"]


def peft_tensors(state: PetState, fn: MapFn, label: str, prefix: str, net: nn.Cell) -> Tuple[Dict[str, np.ndarray],
                                                                                            Optional[dict]]:
    """(PEFT's keys -> the deltas, PEFT's ``trainable_token_indices`` or None when the adapter has none)."""
    tensors: Dict[str, np.ndarray] = {}
    indices: Dict[str, List[int]] = {}
    for rows in state.tokens:
        module = fn(rows.path)
        if not isinstance(module, str) or not module:
            raise PetConfigError(f"name_map {label} leaves trainable_token_indices cell '{rows.path}' of "
                                 f"{type(net).__name__} unmapped; extend the map or pass another")
        tensors[f"{prefix}{module}.{DELTA_LEAF}"] = np.ascontiguousarray(to_numpy(rows.delta))
        indices[module] = list(rows.indices)
    return tensors, (indices or None)


def split_keys(tensors: Mapping[str, np.ndarray], prefix: str) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(their module -> its delta, the other keys)."""
    key_re = re.compile(re.escape(prefix) + r"(.+)\." + re.escape(DELTA_LEAF))
    deltas, rest = {}, {}
    for key, value in tensors.items():
        found = key_re.fullmatch(key)
        if found:
            deltas[found.group(1)] = value
        else:
            rest[key] = value
    return deltas, rest


def our_tensors(net: nn.Cell, deltas: Mapping[str, np.ndarray], doc: Mapping, spec: NameMapSpec,
                weights_path: str, config_path: str) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
    """(our parameter name -> delta, our ``trainable_token_indices`` {cell path: indices}) for PEFT's deltas."""
    declared = doc.get("trainable_token_indices")
    if not deltas:
        if declared:
            raise AdapterFileError(f"{weights_path} holds no '{DELTA_LEAF}' tensor, but {config_path} has "
                                   f"trainable_token_indices {declared!r}")
        return {}, None
    if not declared:
        raise AdapterFileError(f"{weights_path} holds '{DELTA_LEAF}' tensors but {config_path} has no "
                               f"trainable_token_indices")
    label, fn = resolve_name_map(spec)
    inverse = inverse_name_map((path for path, _ in net.cells_and_names()), fn)
    out: Dict[str, np.ndarray] = {}
    ours: Dict[str, List[int]] = {}
    for module, value in sorted(deltas.items()):
        if module not in inverse:
            raise AdapterFileError(f"{weights_path}: trainable tokens of module '{module}' match no cell of "
                                   f"{type(net).__name__} under name map {label}")
        if isinstance(declared, Mapping):
            keys = [key for key in declared if module.endswith(key)]
            if not keys:
                raise AdapterFileError(f"{config_path}: trainable_token_indices names no key that module "
                                       f"'{module}' ends with ({sorted(declared)})")
            indices = list(declared[keys[0]])
        else:
            indices = list(declared)
        if len(indices) != value.shape[0]:
            raise AdapterFileError(f"{weights_path}: '{module}.{DELTA_LEAF}' has {value.shape[0]} rows, "
                                   f"trainable_token_indices lists {len(indices)}")
        out[f"{inverse[module]}.{DELTA_LEAF}"] = value
        ours[inverse[module]] = indices
    return out, ours


def with_tokens(cfg: PetConfig, indices: Optional[dict]) -> PetConfig:
    """``cfg`` with ``trainable_token_indices`` set (LoRA's field) when the file has some."""
    if indices is None:
        return cfg
    if not any(f.name == "trainable_token_indices" for f in dataclasses.fields(cfg)):
        raise PetConfigError(f"trainable_token_indices is LoRA's; pet_type {cfg.pet_type!r} has none")
    return dataclasses.replace(cfg, trainable_token_indices=indices)
