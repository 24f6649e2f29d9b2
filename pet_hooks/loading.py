"""Tensors into a net's adapter parameters, checked first: what every adapter format's loader ends with.

    load_tensors(net, cfg, {"blocks.0.dense1.lora_A": array, ...}, "adapter_model.safetensors")

``cfg`` is applied first when the net has no PET yet. Every name, shape and dtype is checked
before anything is written (``Parameter.set_data`` would accept a tensor of another shape);
a failed load leaves the net as it was. Values are written in place (``ops.assign``), so a
graph compiled before sees them (hot swap).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from mindspore import nn
from mindspore.common import dtype as mstype

from . import _ms_compat
from .errors import AdapterFileError, PetStateError
from .surgery import all_delta_parameters, apply, get_state, remove, saved_parameters

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
                 deltas_only: bool = False, cast_floats: bool = False) -> nn.Cell:
    """Apply ``cfg`` when ``net`` has no PET, then write ``tensors`` into its adapter parameters.

    Everything is checked before anything is written; on error the net is left as it was.
    """
    state = get_state(net)
    if state is not None and cfg is not None and state.config != cfg:
        raise PetStateError(f"{source} holds a different PET config than the one applied to "
                         f"{type(net).__name__}: {cfg.to_dict()} vs {state.config.to_dict()}")
    applied_here = state is None
    if applied_here:
        if cfg is None:
            raise PetStateError(f"{source} carries no PET config and {type(net).__name__} has no PET applied: "
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
