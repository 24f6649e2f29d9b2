"""A PiSSA / OLoRA adapter saved as a plain LoRA on the original weights (PEFT's weight conversion).

PiSSA and OLoRA train on a residual base weight ``W_res = W - s B0 A0``; their adapter is usable
only with that residual. PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
(``LoraModel.subtract_mutated_init``) turns it into a standard LoRA on the original ``W``::

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] @ [A ; A0]

a LoRA of rank 2r with ``lora_alpha`` doubled (``* sqrt(2)`` with ``use_rslora``) so that the scaling
stays ``s``, and ``init_lora_weights: true``. pet_hooks keeps A0 and B0 in the Injection
(with the original weight, which ``remove`` writes back), so no initial adapter needs saving::

    pet_hooks.save_as_lora(net, "plain_lora/")                    # pet_hooks' layout
    pet_hooks.save_as_lora(net, "hf/", format="peft", name_map="llama")

The files are those of :func:`pet_hooks.save_adapter` (the same names, layout and atomic writes):
it saves the adapter twice (as trained, and with A0 / B0 written in for a moment and then put
back bit for bit) and joins the two.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from safetensors.numpy import load_file, save

from ..config.lora_patterns import PATTERN_FIELDS
from ..utils.ms_compat import write_values
from ..errors import PetStateError
from ..utils.files import CONFIG_NAME, WEIGHTS_NAME, json_text, write_bytes
from ..surgery.core import get_state

__all__ = ["save_as_lora"]


def _residual_injections(net):
    state = get_state(net)
    injections = [] if state is None else [r for r in state.injections if getattr(r, "base_init", None) is not None]
    if state is None or state.config.pet_type != "lora" or not injections:
        raise PetStateError(f"save_as_lora needs a LoRA initialised with init_lora_weights 'pissa', 'pissa_niter_N' "
                            f"or 'olora'; {type(net).__name__} has "
                            f"{'no PET' if state is None else state.config.pet_type + ' with init_lora_weights=' + repr(getattr(state.config, 'init_lora_weights', None))}")
    if state.config.use_dora:
        raise PetStateError("save_as_lora: a DoRA adapter is not a sum of low-rank products; it has no plain LoRA form")
    return state, injections


def _save(net, directory, fmt, name_map, peft_fields):
    from .adapter_io import save_adapter      # local: adapter_io imports much of the package
    return save_adapter(net, directory, format=fmt, name_map=name_map, **peft_fields)


def _join(now: dict, init: dict) -> dict:
    out = {}
    for key, value in now.items():
        if key.endswith(("lora_A", "lora_A.weight")):
            out[key] = np.ascontiguousarray(np.concatenate([value, init[key]], axis=0))
        elif key.endswith(("lora_B", "lora_B.weight")):
            out[key] = np.ascontiguousarray(np.concatenate([value, -init[key]], axis=1))
        else:
            out[key] = value
    return out


def _doubled(cfg: dict, rank_key: str, rslora: bool) -> dict:
    cfg = dict(cfg)
    cfg[rank_key] *= 2
    cfg["lora_alpha"] = cfg["lora_alpha"] * (math.sqrt(2.0) if rslora else 2)
    # rank_pattern / alpha_pattern: every cell's own rank doubles and its scaling stays (as PEFT's
    # save_pretrained does; PEFT refuses rsLoRA here, the sqrt(2) keeps alpha / sqrt(r) per cell too)
    if cfg.get("rank_pattern"):
        cfg["rank_pattern"] = {key: 2 * value for key, value in cfg["rank_pattern"].items()}
    if cfg.get("alpha_pattern"):
        cfg["alpha_pattern"] = {key: value * (math.sqrt(2.0) if rslora else 2)
                                for key, value in cfg["alpha_pattern"].items()}
    cfg["init_lora_weights"] = True
    return cfg


def save_as_lora(net, directory, format: str = "pet_hooks", name_map=None,  # pylint: disable=redefined-builtin
                 **peft_fields) -> str:
    """Write ``net``'s PiSSA / OLoRA adapter as a plain LoRA of rank 2r for the original weights (see the module
    docstring); arguments as :func:`pet_hooks.save_adapter`. The net is left as it was."""
    state, injections = _residual_injections(net)
    with tempfile.TemporaryDirectory(prefix="pet_hooks_as_lora_") as tmp:
        now_dir, init_dir = os.path.join(tmp, "now"), os.path.join(tmp, "init")
        _save(net, now_dir, format, name_map, peft_fields)
        kept = [(r.cell.lora_A, r.cell.lora_A.asnumpy().copy(), r.base_init.a0) for r in injections] + \
               [(r.cell.lora_B, r.cell.lora_B.asnumpy().copy(), r.base_init.b0) for r in injections]
        try:
            for param, _, initial in kept:
                write_values(param, initial)
            _save(net, init_dir, format, name_map, peft_fields)
        finally:
            for param, value, _ in kept:
                write_values(param, value)
        tensors = _join(load_file(os.path.join(now_dir, WEIGHTS_NAME)), load_file(os.path.join(init_dir, WEIGHTS_NAME)))
        with open(os.path.join(now_dir, CONFIG_NAME), encoding="utf-8") as handle:
            doc = json.load(handle)
    rslora = bool(state.config.use_rslora)
    if "peft_type" in doc:
        doc = _doubled(doc, "r", rslora)
        meta = {"format": "pt"}
    else:
        doc["pet_config"] = _doubled(doc["pet_config"], "lora_rank", rslora)
        meta = {"format": "pet_hooks"}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_bytes(os.path.join(directory, WEIGHTS_NAME), save(tensors, metadata=meta))
    write_bytes(os.path.join(directory, CONFIG_NAME), json_text(doc, PATTERN_FIELDS).encode("utf-8"))
    return directory
