"""Checkpoints both ways with MindFormers: its LoRA checkpoints in, merged full checkpoints out.

    pet_hooks.load_adapter(net, "mindformers_lora.ckpt", cfg=pet_config)   # names *.mindpet_delta_lora_a/_b
    pet_hooks.save_merged_checkpoint(net, "merged.ckpt")                   # plain MindFormers loads it

MindFormers names a LoRA layer's deltas ``<cell>.mindpet_delta_lora_a`` ([r, in]) and
``<cell>.mindpet_delta_lora_b`` ([out, r]) on legacy models, ``<cell>.lora_A.weight`` /
``<cell>.lora_B.weight`` on the mcore ones (Qwen3, ...); pet_hooks names them ``<cell>.lora_A`` /
``<cell>.lora_B``, same shapes, same scaling ``alpha / r``. Checkpoints are read with
MindSpore's own reader (protobuf, no pickle) or safetensors.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.common import dtype as mstype

from ..errors import AdapterFileError, PetStateError
from ..utils.files import read_safetensors
from ..surgery import modules_to_save, trainable_tokens
from ..surgery.core import all_delta_parameters, get_state, refuse_tied, switch_parameters
from ..tuners import all_tuners

__all__ = ["read_mindformers_lora", "save_merged_checkpoint", "from_mindformers_name"]


def _suffixes() -> List[Tuple[str, str]]:
    """[(".mindpet_delta_lora_a", ".lora_A"), ...]: MindFormers' delta name endings and ours, every method's."""
    return [(f".{theirs}", f".{ours}") for tuner in all_tuners() if tuner.mindformers
            for theirs, ours in tuner.mindformers.weights.items()]


def from_mindformers_name(name: str) -> str:
    for theirs, ours in _suffixes():
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def _read(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return {name: param.astype(mstype.float32).asnumpy() if param.dtype == mstype.bfloat16 else param.asnumpy()
            for name, param in ms.load_checkpoint(path).items()}


def read_mindformers_lora(path: str) -> Dict[str, np.ndarray]:
    """The LoRA deltas of a MindFormers checkpoint, keyed by pet_hooks' names (base weights ignored)."""
    if not path.endswith((".ckpt", ".safetensors")):
        raise AdapterFileError(f"{path}: expected a MindFormers checkpoint ending in .ckpt or .safetensors")
    try:
        tensors = _read(path)
    except Exception as err:  # the readers' own errors: corrupt or truncated files
        raise AdapterFileError(f"{path}: not a readable checkpoint ({err})") from None
    theirs = tuple(suffix for suffix, _ in _suffixes())
    deltas = {from_mindformers_name(name): value for name, value in tensors.items() if name.endswith(theirs)}
    if not deltas:
        raise AdapterFileError(f"{path} holds no MindFormers LoRA tensors (names ending in "
                               f"{' or '.join(theirs)})")
    return deltas


def save_merged_checkpoint(net: nn.Cell, path: str) -> str:
    """Write a full checkpoint of ``net`` with every delta folded into its base weight (LoRA, IA3).

    The net itself is not changed (the merge is computed aside, in float32); the checkpoint
    holds the base parameter names only, so a plain model without pet_hooks loads it.
    """
    state = get_state(net)
    if state is None or not state.tuner.can_merge:
        raise PetStateError(f"save_merged_checkpoint needs a net with a method that merges (LoRA, IA3); "
                            f"{type(net).__name__} has "
                         f"{'no PET' if state is None else state.config.pet_type}")
    refuse_tied(net, state, "save_merged_checkpoint")
    deltas = {id(p) for p in all_delta_parameters(net) + switch_parameters(net)}
    merged = {}
    if not state.merged:  # a merged net already holds the merged weights
        for injection in state.injections:
            for weight, delta in state.tuner.weight_deltas(injection):
                value = weight.astype(mstype.float32).asnumpy() + delta
                merged[id(weight)] = ms.Tensor(value, mstype.float32).astype(weight.dtype)
    # config modules_to_save: the trained copy in place of its original, as PEFT's merge_and_unload leaves it
    merged.update((key, copy.data) for key, copy in modules_to_save.unloaded_values(state.copies).items())
    merged.update(trainable_tokens.unloaded_values(state.tokens))      # trainable_token_indices: rows replaced
    entries = [{"name": p.name, "data": merged.get(id(p), p.data)}
               for p in net.get_parameters() if id(p) not in deltas]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ms.save_checkpoint(entries, path)
    return path
