"""Checkpoints both ways with MindFormers: its LoRA checkpoints in, merged full checkpoints out.

    pet_hooks.load_adapter(net, "mindformers_lora.ckpt", cfg=pet_config)   # names *.mindpet_delta_lora_a/_b
    pet_hooks.save_merged_checkpoint(net, "merged.ckpt")                   # plain MindFormers loads it

MindFormers names a LoRA layer's deltas ``<cell>.mindpet_delta_lora_a`` ([r, in]) and
``<cell>.mindpet_delta_lora_b`` ([out, r]); pet_hooks names them ``<cell>.lora_A`` /
``<cell>.lora_B``, same shapes, same scaling ``alpha / r``. Checkpoints are read with
MindSpore's own reader (protobuf, no pickle) or safetensors.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.common import dtype as mstype

from .surgery import all_delta_parameters, get_state, switch_parameters

__all__ = ["read_mindformers_lora", "save_merged_checkpoint", "to_mindformers_name", "from_mindformers_name"]

_SUFFIXES = {".mindpet_delta_lora_a": ".lora_A", ".mindpet_delta_lora_b": ".lora_B"}


def from_mindformers_name(name: str) -> str:
    for theirs, ours in _SUFFIXES.items():
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def to_mindformers_name(name: str) -> str:
    for theirs, ours in _SUFFIXES.items():
        if name.endswith(ours):
            return name[: -len(ours)] + theirs
    return name


def _read(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    return {name: param.astype(mstype.float32).asnumpy() if param.dtype == mstype.bfloat16 else param.asnumpy()
            for name, param in ms.load_checkpoint(path).items()}


def read_mindformers_lora(path: str) -> Dict[str, np.ndarray]:
    """The LoRA deltas of a MindFormers checkpoint, keyed by pet_hooks' names (base weights ignored)."""
    if not path.endswith((".ckpt", ".safetensors")):
        raise ValueError(f"{path}: expected a MindFormers checkpoint ending in .ckpt or .safetensors")
    try:
        tensors = _read(path)
    except Exception as err:  # the readers' own errors: corrupt or truncated files
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None
    deltas = {from_mindformers_name(name): value for name, value in tensors.items()
              if name.endswith(tuple(_SUFFIXES))}
    if not deltas:
        raise ValueError(f"{path} holds no MindFormers LoRA tensors (names ending in "
                         f"{' or '.join(_SUFFIXES)})")
    return deltas


def _refuse_tied(net: nn.Cell, state) -> None:
    """A LoRA weight that another cell also holds (tied embeddings: ``lm_head.weight`` is the
    token embedding) cannot be merged into one tensor without changing that other cell too."""
    owners: Dict[int, list] = {}
    for path, cell in net.cells_and_names():
        for param in cell.get_parameters(expand=False):
            owners.setdefault(id(param), []).append(path)
    for record in state.injections:
        others = [p for p in owners.get(id(record.cell.weight), []) if p != record.path]
        if others:
            raise ValueError(f"cannot merge the LoRA of '{record.path}': its weight "
                             f"'{record.cell.weight.name}' is tied to '{others[0]}' (tie_word_embeddings), so "
                             f"merging would change that cell too; leave '{record.path}' out of target_modules "
                             f"or keep the adapter separate")


def save_merged_checkpoint(net: nn.Cell, path: str) -> str:
    """Write a full checkpoint of ``net`` with every LoRA delta folded into its base weight.

    The net itself is not changed (the merge is computed aside, in float32); the checkpoint
    holds the base parameter names only, so a plain model without pet_hooks loads it.
    """
    state = get_state(net)
    if state is None or state.config.pet_type != "lora":
        raise ValueError(f"save_merged_checkpoint needs a net with LoRA applied; {type(net).__name__} has "
                         f"{'no PET' if state is None else state.config.pet_type}")
    _refuse_tied(net, state)
    deltas = {id(p) for p in all_delta_parameters(net) + switch_parameters(net)}
    merged = {}
    if not state.merged:  # a merged net already holds the merged weights
        for record in state.injections:
            weight = state.tuner.base_weight(record.cell)
            value = weight.astype(mstype.float32).asnumpy() + state.tuner.delta_in_weight_layout(record.cell)
            merged[id(weight)] = ms.Tensor(value, mstype.float32).astype(weight.dtype)
    entries = [{"name": p.name, "data": merged.get(id(p), p.data)}
               for p in net.get_parameters() if id(p) not in deltas]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ms.save_checkpoint(entries, path)
    return path
