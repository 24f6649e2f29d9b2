"""P-Tuning v2 and Prefix-Tuning: learned key/value prefixes in front of every attention layer.

One prefix encoder serves all layers; its parameters are shared by the attention cells,
each of which reads its own layer's columns (layer-major, keys then values, as MindFormers'
``Ptuning2Encoder`` lays them out)::

    ptuning2, no projection   embedding (pre_seq_len, L * 2 * kv_dim)
    ptuning2, projection      embedding (pre_seq_len, hidden) -> Dense(hidden, projection_dim) -> tanh
                              -> Dense(projection_dim, L * 2 * kv_dim)
    prefixtuning              embedding (prefix_token_num, hidden) -> Dense(hidden, mid_dim) -> tanh
                              -> Dense(mid_dim, L * 2 * kv_dim)

Parameters are named ``pet_prefix_encoder.embedding``, ``pet_prefix_encoder.dense_in.weight`` ...
The attention cells are found by ``target_modules`` or, by default, by the adapter registry
(``tuners/prefix/attention.py``); ``num_layers``, heads and head size come from the cells and are
checked against the MindFormers model_config beside the pet_config when it gives them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn

from ...config.pet_config import PetConfig, PrefixTuningConfig, PTuning2Config
from ...errors import PetConfigError, UnsupportedCellError
from ...matching.cells import named_cells, select_cells
from .attention import adapter_for, known_attention_names
from ..base import Injection, Tuner
from ..common import init_rng, inject_all, restore

__all__ = ["PrefixTuner", "encoder_shapes", "ENCODER"]

_ADDED_ATTRS = ("pet_prefix_embedding", "pet_prefix_w_in", "pet_prefix_b_in", "pet_prefix_w_out",
                "pet_prefix_b_out", "pet_prefix_projected", "pet_prefix_len", "pet_kv_heads", "pet_head_dim",
                "pet_kv_dim", "pet_kv_start", "pet_kv_stop", "pet_prefix_dropout", "pet_prefix_active")
ENCODER = "pet_prefix_encoder"


def _is_prefix_cell(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_hooks_prefix", False) is True


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    if adapter_for(cell) is not None:
        return None
    return ("no prefix attention adapter knows this class (known: " + ", ".join(known_attention_names())
            + "; see pet_hooks.register_attention)")


def _select_targets(net: nn.Cell, cfg: PetConfig) -> List[Tuple[str, nn.Cell]]:
    """The attention cells, one per layer, in net order; ValueError before anything changes."""
    skip = lambda path, cell: _is_prefix_cell(cell) or path.rsplit(".", 1)[-1] == "pet_prefix_dropout"
    if cfg.target_modules is not None:
        targets = select_cells(net, cfg.target_modules, None, can_adapt=_can_adapt, skip=skip)
    else:
        targets = [(p, c) for p, c in named_cells(net) if not skip(p, c) and adapter_for(c) is not None]
        if not targets:
            raise PetConfigError(f"{type(net).__name__} has no attention cell the prefix adapters know "
                             f"(known: {', '.join(known_attention_names())}); name yours with target_modules "
                             f"and teach pet_hooks its layout with pet_hooks.register_attention")
    return targets  # (inject reads and checks their geometry before it changes anything)


def _prefix_len(cfg: PetConfig) -> int:
    return cfg.pre_seq_len if isinstance(cfg, PTuning2Config) else cfg.prefix_token_num


def _mid_dim(cfg: PetConfig) -> Optional[int]:
    if isinstance(cfg, PrefixTuningConfig):
        return cfg.mid_dim
    return cfg.projection_dim if cfg.prefix_projection else None


def _geometry(targets: List[Tuple[str, nn.Cell]], cfg: PetConfig) -> Tuple[int, int, int, int]:
    """(num_layers, kv_heads, head_dim, hidden): read off the cells, checked against the model_config."""
    hints = cfg.model_hints
    found = set()
    for path, cell in targets:
        try:
            found.add(tuple(adapter_for(cell).geometry(cell)))
        except (AttributeError, ValueError) as err:
            raise UnsupportedCellError(f"cannot adapt the attention cell '{path}' ({type(cell).__name__}): {err}") from None
    if len(found) > 1:
        raise UnsupportedCellError(f"the attention cells {[p for p, _ in targets]} differ in (kv heads, head size, hidden): "
                         f"{sorted(found)}; one prefix encoder needs them equal")
    kv_heads, head_dim, hidden = found.pop()
    # key/value heads; Qwen3Config (mcore) names them num_key_value_heads, its layers num_hidden_layers and
    # its head size head_dim
    heads_hint = (hints.get("n_kv_heads") or hints.get("num_key_value_heads") or hints.get("num_attention_heads")
                  or hints.get("num_heads"))
    layers_hint = hints.get("num_layers") or hints.get("num_hidden_layers")
    channels_hint = hints.get("kv_channels") or hints.get("head_dim")
    if hints.get("hidden_size") and (hints.get("num_attention_heads") or hints.get("num_heads")):
        heads = hints.get("num_attention_heads") or hints["num_heads"]
        if hints["hidden_size"] % heads:
            raise PetConfigError(f"model_config num_heads {heads} does not divide hidden_size {hints['hidden_size']}")
    kv_heads = kv_heads or heads_hint
    head_dim = head_dim or channels_hint
    hidden = hidden or hints.get("hidden_size")
    for name, value in (("num_heads", kv_heads), ("kv_channels", head_dim), ("hidden_size", hidden)):
        if not value:
            raise PetConfigError(f"cannot tell {name} from the attention cells; give it in the model_config "
                             f"beside pet_config")
    checks = [("num_layers", layers_hint, len(targets)), ("kv_channels", channels_hint, head_dim),
              ("num_heads", heads_hint, kv_heads)]
    for name, hint, actual in checks:
        if hint is not None and hint != actual:
            raise PetConfigError(f"model_config {name} is {hint} but the model has {actual} "
                             f"({len(targets)} attention cells, {kv_heads} key/value heads of size {head_dim})")
    return len(targets), kv_heads, head_dim, hidden


def encoder_shapes(cfg: PetConfig, num_layers: int, kv_dim: int, hidden: int) -> Dict[str, tuple]:
    """Parameter name -> shape of the prefix encoder (what trains)."""
    length, mid, out = _prefix_len(cfg), _mid_dim(cfg), num_layers * 2 * kv_dim
    if mid is None:
        return {f"{ENCODER}.embedding": (length, out)}
    return {f"{ENCODER}.embedding": (length, hidden), f"{ENCODER}.dense_in.weight": (mid, hidden),
            f"{ENCODER}.dense_in.bias": (mid,), f"{ENCODER}.dense_out.weight": (out, mid),
            f"{ENCODER}.dense_out.bias": (out,)}


def _encoder(cfg: PetConfig, shapes: Dict[str, tuple]) -> Dict[str, Parameter]:
    rng = init_rng(cfg)
    params = {}
    for name, shape in shapes.items():
        if name.endswith("embedding"):
            value = rng.normal(0.0, 0.01 if len(shapes) == 1 else 1.0, size=shape)
        elif name.endswith("bias"):
            value = np.zeros(shape)
        else:  # nn.Dense's default: kaiming_uniform(a=sqrt(5)), bound 1 / sqrt(fan_in)
            bound = 1.0 / math.sqrt(shape[1])
            value = rng.uniform(-bound, bound, size=shape)
        params[name] = Parameter(Tensor(value.astype(np.float32)), name=name, requires_grad=True)
    return params


def _inject(targets: List[Tuple[str, nn.Cell]], cfg: PetConfig) -> List[Injection]:
    """Give every attention cell its layer's prefix (the encoder parameters shared). All or nothing."""
    num_layers, kv_heads, head_dim, hidden = _geometry(targets, cfg)
    kv_dim = kv_heads * head_dim
    params = _encoder(cfg, encoder_shapes(cfg, num_layers, kv_dim, hidden))
    shared = list(params.values())
    projected = len(params) > 1

    def add(layer: int, path: str, cell: nn.Cell) -> List[Parameter]:
        cell.pet_prefix_embedding = params[f"{ENCODER}.embedding"]
        for attr, key in (("pet_prefix_w_in", "dense_in.weight"), ("pet_prefix_b_in", "dense_in.bias"),
                          ("pet_prefix_w_out", "dense_out.weight"), ("pet_prefix_b_out", "dense_out.bias")):
            setattr(cell, attr, params.get(f"{ENCODER}.{key}"))
        cell.pet_prefix_projected = projected
        cell.pet_prefix_len = _prefix_len(cfg)
        cell.pet_kv_heads, cell.pet_head_dim, cell.pet_kv_dim = kv_heads, head_dim, kv_dim
        cell.pet_kv_start, cell.pet_kv_stop = layer * 2 * kv_dim, (layer + 1) * 2 * kv_dim
        cell.pet_prefix_dropout = nn.Dropout(p=float(cfg.dropout_rate))
        cell.pet_prefix_dropout.set_train(cell.training)
        cell.pet_prefix_active = True
        return shared

    return inject_all(targets, _ADDED_ATTRS, add, mixin_of=adapter_for)


class PrefixTuner(Tuner):
    """P-Tuning v2 and Prefix-Tuning as a :class:`~pet_hooks.tuners.base.Tuner`: one shared prefix encoder."""

    label = "prefix"
    pet_types = ("ptuning2", "prefixtuning")

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def select_targets(self, net: nn.Cell, cfg: PetConfig) -> List[Tuple[str, nn.Cell]]:
        return _select_targets(net, cfg)

    def inject(self, targets, cfg: PetConfig) -> List[Injection]:
        return _inject(targets, cfg)

    def eject(self, injection: Injection) -> None:
        restore(injection)  # the mirror of inject for one cell

    def deltas_of(self, injection: Injection) -> List[Parameter]:
        """The shared encoder parameters (the same objects for every layer)."""
        return list(injection.params)

    def set_active(self, injections, active: bool) -> None:
        """A flag on each attention cell: structure, so graph mode recompiles (switch_is_data False)."""
        for injection in injections:
            injection.cell.pet_prefix_active = bool(active)
