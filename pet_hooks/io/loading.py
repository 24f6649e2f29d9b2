"""Tensors into a net's adapter parameters, checked first: what every adapter format's loader ends with.

    load_tensors(net, cfg, {"blocks.0.dense1.lora_A": array, ...}, "adapter_model.safetensors")

``cfg`` is applied first when the net has no PET yet. Every name, shape and dtype is checked
before anything is written (``Parameter.set_data`` would accept a tensor of another shape);
a failed load leaves the net as it was. Values are written in place (``ops.assign``), so a
graph compiled before sees them (hot swap).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mindspore import nn
from mindspore.common import dtype as mstype

from ..utils import ms_compat as _ms_compat
from ..errors import AdapterFileError, PetConfigError, PetStateError
from ..multi.adapters import add_adapter, check_hotswap_config, delete_adapter, focused, rescale_adapter
from ..surgery.core import all_delta_parameters, apply, get_state, remove, saved_parameters
from . import saved_copies

__all__ = ["load_tensors"]


def _aligned(params: Dict[str, object], tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A foreign file's tensors renamed to the delta whose name ends with theirs, where exactly one does.

    MindFormers names parameters without the prefix of a top cell built with ``auto_prefix=False``
    (``TrainingQwen3ForCausalLM``'s ``model.``): its ``decoder.layers.0....lora_A`` is pet_hooks'
    ``model.decoder.layers.0....lora_A``, the delta named by its cell path.
    """
    out = {}
    for name, value in tensors.items():
        if name not in params:
            tails = [p for p in params if p.endswith("." + name)]
            name = tails[0] if len(tails) == 1 else name
        out[name] = value
    return out


def _check_fit(net: nn.Cell, tensors: Dict[str, np.ndarray], path: str, *, deltas_only: bool = False,
               cast_floats: bool = False) -> list:
    """Pair every adapter parameter with its tensor; any mismatch is an error naming it.

    ``deltas_only`` leaves out base parameters the config keeps trainable (a foreign file
    does not hold them); ``cast_floats`` accepts a float tensor of another width.
    """
    params = {p.name: p for p in (all_delta_parameters(net) if deltas_only else saved_parameters(net))}
    if deltas_only:
        tensors = _aligned(params, tensors)
    tensors = saved_copies.align_adapter_names(tensors, params)     # modules_to_save: the adapter's own name
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise AdapterFileError(f"{path} has no tensor for parameter(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} of {type(net).__name__}")
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise AdapterFileError(f"{path} holds tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"that match no adapter parameter of {type(net).__name__}")
    pairs = []
    for name, param in params.items():
        array = tensors[name]
        if tuple(array.shape) != tuple(param.shape):
            raise AdapterFileError(f"{path}: tensor '{name}' has shape {tuple(array.shape)}, "
                             f"the net's parameter has shape {tuple(param.shape)}")
        expected = np.dtype(np.float32 if param.dtype == mstype.bfloat16 else mstype.dtype_to_nptype(param.dtype))
        if array.dtype != expected and not (cast_floats and array.dtype.kind == "f" and expected.kind == "f"):
            raise AdapterFileError(f"{path}: tensor '{name}' has dtype {array.dtype}, "
                             f"the net's parameter has dtype {param.dtype}")
        pairs.append((param, array.astype(expected, copy=False)))
    return pairs


def load_tensors(net: nn.Cell, cfg, tensors: Dict[str, np.ndarray], source: str, *,
                 deltas_only: bool = False, cast_floats: bool = False, adapter_name: Optional[str] = None,
                 hotswap: bool = False) -> nn.Cell:
    """Apply ``cfg`` when ``net`` has no PET, then write ``tensors`` into its adapter parameters.

    With ``adapter_name`` the tensors go to that adapter: added with ``cfg`` when the net has no
    adapter of that name, or with ``hotswap`` written over an existing one's values (``cfg`` may
    then differ from its config in the scaling only). Everything is checked before anything is
    written; on error the net is left as it was.
    """
    if adapter_name is not None:
        return _load_named(net, cfg, tensors, source, adapter_name, hotswap, deltas_only, cast_floats)
    if hotswap:
        raise PetConfigError("hotswap=True replaces the values of a named adapter: give adapter_name= too")
    state = get_state(net)
    if state is not None and cfg is not None and state.config != cfg:
        raise PetStateError(f"{source} holds a different PET config than the one applied to "
                         f"{type(net).__name__}: {cfg.to_dict()} vs {state.config.to_dict()}")
    applied_here = state is None
    if applied_here:
        if cfg is None:
            raise PetStateError(f"{source} carries no PET config and {type(net).__name__} has no PET applied: "
                             f"pass cfg=... (the pet_config the checkpoint was trained with)")
        apply(net, cfg.for_loading())        # the values follow: an init that reads nothing (issue 30 item 2)
    try:
        _write_checked(net, tensors, source, deltas_only, cast_floats)
    except BaseException:
        if applied_here:
            remove(net)
        raise
    return net


def _write_checked(net: nn.Cell, tensors: Dict[str, np.ndarray], source: str, deltas_only: bool,
                   cast_floats: bool) -> None:
    """Check every tensor against the net's adapter parameters, then write them all (or none)."""
    pairs = _check_fit(net, tensors, source, deltas_only=deltas_only, cast_floats=cast_floats)
    # Writing can still fail half-way (an interrupt, memory): keep copies to put back, so the
    # net ends up either fully loaded or exactly as it was.
    originals = [(param, param.data.copy()) for param, _ in pairs]
    try:
        for param, array in pairs:      # in place: graphs compiled before see the new values (hot swap)
            _ms_compat.write_values(param, array)
    except BaseException:
        for param, value in originals:
            _ms_compat.write_values(param, value)
        raise


def _load_named(net: nn.Cell, cfg, tensors: Dict[str, np.ndarray], source: str, name: str, hotswap: bool,
                deltas_only: bool, cast_floats: bool) -> nn.Cell:
    """:func:`load_tensors` into the adapter ``name``: new (applied or added), or hot-swapped."""

    state = get_state(net)
    exists = state is not None and name in state.adapters
    if hotswap and not exists:
        raise PetStateError(f"hotswap=True replaces an existing adapter's values, but {type(net).__name__} has no "
                            f"adapter {name!r} (it has {list(state.adapters) if state else []})")
    if exists and not hotswap:
        raise PetStateError(f"adapter {name!r} already exists: load with hotswap=True to replace its values, or "
                            f"delete_adapter(net, {name!r}) first")
    if not exists and cfg is None:
        raise PetStateError(f"{source} carries no PET config: pass cfg=... to add it as adapter {name!r}")
    if exists and cfg is not None:
        check_hotswap_config(state, name, cfg, source)
    if state is None:
        apply(net, cfg, adapter_name=name)
    elif not exists:
        add_adapter(net, name, cfg)
    try:
        with focused(net, name):
            _write_checked(net, tensors, source, deltas_only, cast_floats)
    except BaseException:
        if state is None:
            remove(net)
        elif not exists:
            delete_adapter(net, name)
        raise
    if exists and cfg is not None:
        rescale_adapter(state, name, cfg)                   # a new scaling: data, written into the scales
    return net
