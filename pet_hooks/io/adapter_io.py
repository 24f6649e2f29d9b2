"""Adapters on disk: ``save_adapter`` / ``load_adapter``.

A directory holds two files::

    adapter_config.json          {"pet_config": {...}, "pet_hooks_version": ..., "base_model_class": ...}
    adapter_model.safetensors    only the deltas (and parameters the config kept trainable),
                                 keyed by parameter name

``load_config("dir/adapter_config.json")`` reads the config back. Each file is written to a
temporary file in the same directory, flushed, fsync'ed and moved over the old one with
``os.replace`` (weights first, then config), so a crash mid-save leaves the previous
adapter readable. Loading checks every name, shape and dtype before writing anything into
the net, and a failed load leaves the net as it was.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from mindspore import nn

from .._version import __version__
from ..config.lora_patterns import PATTERN_FIELDS
from ..config.pet_config import PetConfigError, load_config
from ..errors import AdapterNotFoundError, PetStateError
from ..utils.files import CONFIG_NAME, WEIGHTS_NAME, json_text, read_json, read_safetensors, to_numpy, write_bytes
from .loading import load_tensors
from .mindformers_io import read_mindformers_lora
from .peft_format import is_peft_config, load_peft, save_peft
from ..multi.adapters import focused
from ..surgery.core import DEFAULT_ADAPTER, get_state, saved_parameters

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]


def _subfolder(directory: str, name: str) -> str:
    """Where adapter ``name`` of several goes, as PEFT lays them out: "default" in ``directory`` itself."""
    return directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)


def save_adapter(net: nn.Cell, directory: str, format: str = "pet_hooks", name_map=None,  # pylint: disable=redefined-builtin
                 adapter_name: Optional[str] = None, **peft_fields) -> str:
    """Write the adapter of ``net`` to ``directory`` (created if needed); returns the directory.

    ``adapter_name`` picks one of several adapters (by default the active one); ``"all"`` writes
    every adapter, each in its own folder as PEFT does (``"default"`` in ``directory``, the others
    in ``directory/<name>``). ``format="peft"`` writes a LoRA adapter as Hugging Face PEFT does,
    the cell paths turned into the other framework's names by ``name_map`` (``"llama"``, a mapping
    or a callable; see :mod:`pet_hooks.io.peft_format`); ``peft_fields`` may set ``task_type`` and
    ``base_model_name_or_path`` there.
    """
    if format not in ("pet_hooks", "peft"):
        raise PetConfigError(f"unknown adapter format {format!r}; use 'pet_hooks' or 'peft'")
    if format != "peft" and (name_map is not None or peft_fields):
        raise PetConfigError("name_map, task_type and base_model_name_or_path apply to format='peft' only")
    state = get_state(net)
    if state is None:
        raise PetStateError(f"cannot save an adapter: {type(net).__name__} has no PET applied")
    directory = os.fspath(directory)
    if adapter_name == "all":
        for name in list(state.adapters):
            save_adapter(net, _subfolder(directory, name), format, name_map, adapter_name=name, **peft_fields)
        return directory
    if adapter_name is None:
        if len(state.active) > 1:
            raise PetStateError(f"adapters {state.active} are active: name the one to save with adapter_name= "
                                f"(or 'all')")
        adapter_name = state.active[0]
    with focused(net, adapter_name):
        if format == "peft":
            return save_peft(net, directory, name_map, **peft_fields)
        return _save_own(net, directory)


def _save_own(net: nn.Cell, directory: str) -> str:
    """The pet_hooks layout of the net's (single active) adapter."""
    from safetensors.numpy import save  # local: only saving and loading need it

    state = get_state(net)
    os.makedirs(directory, exist_ok=True)
    tensors = {p.name: np.ascontiguousarray(to_numpy(p)) for p in saved_parameters(net)}
    meta = {
        "pet_config": state.config.to_dict(),
        "pet_hooks_version": __version__,
        "base_model_class": f"{type(net).__module__}.{type(net).__qualname__}",
        "format": "pet_hooks",
    }
    blob = save(tensors, metadata={"format": "pet_hooks"})
    write_bytes(os.path.join(directory, WEIGHTS_NAME), blob)
    # rank_pattern / alpha_pattern keep their order (the first key selecting a cell wins)
    write_bytes(os.path.join(directory, CONFIG_NAME), json_text(meta, PATTERN_FIELDS).encode("utf-8"))
    return directory


def load_adapter(net: nn.Cell, directory: str, cfg=None, name_map=None, adapter_name: Optional[str] = None,
                 hotswap: bool = False) -> nn.Cell:
    """Load an adapter into ``net`` and return it.

    With ``adapter_name`` the adapter is added under that name (inactive when the net already
    has PET; the first adapter otherwise), or with ``hotswap=True`` replaces the values of the
    existing adapter of that name in place: shapes must fit, and an active adapter then computes
    with the new values without a recompile. ``"all"`` loads what ``save_adapter(...,
    adapter_name="all")`` wrote, each folder under its name.

    ``directory`` is what :func:`save_adapter` wrote (its config is applied first when ``net``
    has no PET yet), a Hugging Face PEFT LoRA directory (detected by ``peft_type`` in its
    config; ``name_map`` as for saving, by default the first of the same names and the
    built-in maps that fits the net), or a MindFormers LoRA checkpoint file (``.ckpt`` or ``.safetensors``
    whose delta names end in ``mindpet_delta_lora_a`` / ``_b``; give ``cfg`` unless the net
    already has the matching LoRA). Missing files raise FileNotFoundError; a config that
    differs from the net's PET, a corrupt file or a missing or mismatched tensor raise
    ValueError naming it. On any error the net is left as it was.
    """
    directory = os.fspath(directory)
    target = {"adapter_name": adapter_name, "hotswap": hotswap}
    if adapter_name == "all":
        return _load_all(net, directory, cfg, name_map, hotswap)
    if os.path.isfile(directory):
        return load_tensors(net, None if cfg is None else load_config(cfg), read_mindformers_lora(directory),
                            directory, deltas_only=True, cast_floats=True, **target)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise AdapterNotFoundError(f"adapter directory not found: {directory}")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterNotFoundError(f"adapter file not found: {path}")
    doc = read_json(config_path)
    if is_peft_config(doc):
        return load_peft(net, directory, doc, name_map, cfg, **target)
    if name_map is not None:
        raise PetConfigError(f"name_map applies to PEFT adapters; {config_path} is a pet_hooks adapter")
    try:
        saved = load_config(config_path)
    except PetConfigError as err:
        raise PetConfigError(f"{config_path}: {err}") from None
    if cfg is not None and load_config(cfg) != saved:
        raise PetStateError(f"cfg differs from the config saved in {config_path}")
    return load_tensors(net, saved, read_safetensors(weights_path), weights_path, **target)


def _load_all(net: nn.Cell, directory: str, cfg, name_map, hotswap: bool) -> nn.Cell:
    """Every adapter of a folder ``save_adapter(..., adapter_name="all")`` wrote: "default" in it (when
    there), each sub-folder holding an adapter under the sub-folder's name; "default" first."""
    if not os.path.isdir(directory):
        raise AdapterNotFoundError(f"adapter directory not found: {directory}")
    names = [DEFAULT_ADAPTER] if os.path.isfile(os.path.join(directory, CONFIG_NAME)) else []
    names += sorted(entry for entry in os.listdir(directory)
                    if os.path.isfile(os.path.join(directory, entry, CONFIG_NAME)) and entry != DEFAULT_ADAPTER)
    if not names:
        raise AdapterNotFoundError(f"{directory} holds no adapter ({CONFIG_NAME} in it or in a sub-folder)")
    for name in names:
        load_adapter(net, _subfolder(directory, name), cfg, name_map, adapter_name=name, hotswap=hotswap)
    return net
