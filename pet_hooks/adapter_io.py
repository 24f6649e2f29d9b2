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

import json
import os
import tempfile
from typing import Dict

import numpy as np
from mindspore import nn
from mindspore.common import dtype as mstype

from . import _ms_compat
from ._version import __version__
from .config import PetConfigError, load_config
from .surgery import all_delta_parameters, apply, get_state, remove, saved_parameters

__all__ = ["save_adapter", "load_adapter", "load_tensors", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _to_numpy(param) -> np.ndarray:
    # numpy has no bfloat16: such deltas are stored as float32 and cast back on load.
    if param.dtype == mstype.bfloat16:
        return param.astype(mstype.float32).asnumpy()
    return param.asnumpy()


def _atomic_write(path: str, write) -> None:
    """Write through ``write(handle)`` into a temp file beside ``path``, then os.replace it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(net: nn.Cell, directory: str, format: str = "pet_hooks", name_map=None,  # pylint: disable=redefined-builtin
                 **peft_fields) -> str:
    """Write the adapter of ``net`` to ``directory`` (created if needed); returns the directory.

    ``format="peft"`` writes a LoRA adapter as Hugging Face PEFT does, the cell paths turned
    into the other framework's names by ``name_map`` (``"llama"``, a mapping or a callable;
    see :mod:`pet_hooks.peft_format`); ``peft_fields`` may set ``task_type`` and
    ``base_model_name_or_path`` there.
    """
    if format == "peft":
        from .peft_format import save_peft
        return save_peft(net, directory, name_map, **peft_fields)
    if format != "pet_hooks":
        raise ValueError(f"unknown adapter format {format!r}; use 'pet_hooks' or 'peft'")
    if name_map is not None or peft_fields:
        raise ValueError("name_map, task_type and base_model_name_or_path apply to format='peft' only")
    from safetensors.numpy import save  # local: only saving and loading need it

    state = get_state(net)
    if state is None:
        raise ValueError(f"cannot save an adapter: {type(net).__name__} has no PET applied")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {p.name: np.ascontiguousarray(_to_numpy(p)) for p in saved_parameters(net)}
    meta = {
        "pet_config": state.config.to_dict(),
        "pet_hooks_version": __version__,
        "base_model_class": f"{type(net).__module__}.{type(net).__qualname__}",
        "format": "pet_hooks",
    }
    blob = save(tensors, metadata={"format": "pet_hooks"})
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda h: h.write(blob))
    text = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda h: h.write(text))
    return directory


def _read_tensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError / OSError
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _check_fit(net: nn.Cell, tensors: Dict[str, np.ndarray], path: str, *, deltas_only: bool = False,
               cast_floats: bool = False) -> list:
    """Pair every adapter parameter with its tensor; any mismatch is an error naming it.

    ``deltas_only`` leaves out base parameters the config keeps trainable (a foreign file
    does not hold them); ``cast_floats`` accepts a float tensor of another width.
    """
    params = {p.name: p for p in (all_delta_parameters(net) if deltas_only else saved_parameters(net))}
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"{path} has no tensor for parameter(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} of {type(net).__name__}")
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise ValueError(f"{path} holds tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"that match no adapter parameter of {type(net).__name__}")
    pairs = []
    for name, param in params.items():
        array = tensors[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(array.shape)}, "
                             f"the net's parameter has shape {tuple(param.shape)}")
        expected = np.dtype(np.float32 if param.dtype == mstype.bfloat16 else mstype.dtype_to_nptype(param.dtype))
        if array.dtype != expected and not (cast_floats and array.dtype.kind == "f" and expected.kind == "f"):
            raise ValueError(f"{path}: tensor '{name}' has dtype {array.dtype}, "
                             f"the net's parameter has dtype {param.dtype}")
        pairs.append((param, array.astype(expected, copy=False)))
    return pairs


def load_tensors(net: nn.Cell, cfg, tensors: Dict[str, np.ndarray], source: str, *,
                 deltas_only: bool = False, cast_floats: bool = False) -> nn.Cell:
    """Apply ``cfg`` when ``net`` has no PET, then write ``tensors`` into its adapter parameters.

    Everything is checked before anything is written; on error the net is left as it was.
    """
    state = get_state(net)
    if state is not None and cfg is not None and state.config != cfg:
        raise ValueError(f"{source} holds a different PET config than the one applied to "
                         f"{type(net).__name__}: {cfg.to_dict()} vs {state.config.to_dict()}")
    applied_here = state is None
    if applied_here:
        if cfg is None:
            raise ValueError(f"{source} carries no PET config and {type(net).__name__} has no PET applied: "
                             f"pass cfg=... (the pet_config the checkpoint was trained with)")
        apply(net, cfg)
    try:
        pairs = _check_fit(net, tensors, source, deltas_only=deltas_only, cast_floats=cast_floats)
    except BaseException:
        if applied_here:
            remove(net)
        raise
    # Writing can still fail half-way (an interrupt, memory): keep copies to put back, so the
    # net ends up either fully loaded or exactly as it was.
    originals = [(param, param.data.copy()) for param, _ in pairs]
    try:
        for param, array in pairs:      # in place: graphs compiled before see the new values (hot swap)
            _ms_compat.write_values(param, array)
    except BaseException:
        for param, value in originals:
            _ms_compat.write_values(param, value)
        if applied_here:
            remove(net)
        raise
    return net


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None


def load_adapter(net: nn.Cell, directory: str, cfg=None, name_map=None) -> nn.Cell:
    """Load an adapter into ``net`` and return it.

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
    if os.path.isfile(directory):
        from .mindformers_io import read_mindformers_lora
        return load_tensors(net, None if cfg is None else load_config(cfg), read_mindformers_lora(directory),
                            directory, deltas_only=True, cast_floats=True)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter file not found: {path}")
    from .peft_format import is_peft_config, load_peft
    doc = _read_json(config_path)
    if is_peft_config(doc):
        return load_peft(net, directory, doc, name_map, cfg)
    if name_map is not None:
        raise ValueError(f"name_map applies to PEFT adapters; {config_path} is a pet_hooks adapter")
    try:
        saved = load_config(config_path)
    except PetConfigError as err:
        raise PetConfigError(f"{config_path}: {err}") from None
    if cfg is not None and load_config(cfg) != saved:
        raise ValueError(f"cfg differs from the config saved in {config_path}")
    return load_tensors(net, saved, _read_tensors(weights_path), weights_path)
