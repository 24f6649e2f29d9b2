"""PEFT files of a method whose adapter belongs to the whole model, not to modules (prompt tuning).

PEFT's prompt tuning directory holds ``adapter_model.safetensors`` with the one key ``prompt_embeddings``
([num_virtual_tokens, hidden]) and an ``adapter_config.json`` with ``peft_type: "PROMPT_TUNING"`` and no
``target_modules``. The method's layout lists those keys (``PeftLayout.whole_weights``: PEFT's key -> our
delta's name); there is no module path, so no name map. ``peft_format.save_peft`` / ``load_peft`` hand
such a method to this module.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np
from mindspore import nn

from ..config.pet_config import load_config
from ..errors import AdapterFileError, PetStateError
from ..surgery.core import get_state
from ..utils.files import CONFIG_NAME, WEIGHTS_NAME, read_safetensors, to_numpy, write_bytes
from .loading import load_tensors

__all__ = ["save", "load"]


def save(state, directory: str, task_type: Optional[str], base_model_name_or_path: Optional[str]) -> str:
    """Write the adapter of ``state`` (a net's PetState) as PEFT writes a prompt-learning adapter."""
    from safetensors.numpy import save as to_bytes

    tuner = state.tuner
    deltas = {p.name: p for injection in state.injections for p in tuner.deltas_of(injection)}
    tensors = {key: np.ascontiguousarray(to_numpy(deltas[name])) for key, name in tuner.peft.whole_weights.items()}
    doc = {"auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
           "peft_type": tuner.peft.peft_type, "revision": None, "task_type": task_type,
           **tuner.peft.fields(state.config)}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_bytes(os.path.join(directory, WEIGHTS_NAME), to_bytes(tensors, metadata={"format": "pt"}))
    write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
    return directory


def load(net: nn.Cell, directory: str, doc: Mapping, tuner, cfg=None, adapter_name: Optional[str] = None,
         hotswap: bool = False) -> nn.Cell:
    """Load such a directory into ``net`` (applying the method first when it has none); returns ``net``."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if adapter_name is not None or hotswap:
        raise PetStateError(f"{config_path}: named adapters and hotswap are a LoRA feature; a "
                            f"{tuner.peft.peft_type} adapter loads as the net's one adapter")
    found = read_safetensors(weights_path)
    expected = set(tuner.peft.whole_weights)
    if set(found) != expected:
        extra = sorted(set(found) - expected)
        raise AdapterFileError(f"{weights_path}: holds keys {sorted(found)[:4]}, expected exactly {sorted(expected)}"
                               + (f" (unexpected '{extra[0]}')" if extra else ""))
    tensors = {name: found[key] for key, name in tuner.peft.whole_weights.items()}
    state = get_state(net)
    if state is None:
        target = load_config(cfg) if cfg is not None else tuner.peft.config_from(doc, [])
    else:
        reason = tuner.peft.mismatch(doc, config_path, type(net).__name__, state.config)
        if reason is not None:
            raise PetStateError(reason)
        target = None
    return load_tensors(net, target, tensors, weights_path, deltas_only=True, cast_floats=True)
