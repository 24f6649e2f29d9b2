"""(IA)^3 on ``nn.Dense`` and MindFormers' ``Linear``: a learned vector scales each matched layer.

As PEFT's ``IA3Layer`` / ``Linear``: for a layer that ``feedforward_modules`` does not match,
the output is scaled, bias included (``y = base(x) * l``, ``ia3_l`` of shape ``[out, 1]``); for
a feed-forward layer the input is (``y = base(x * l)``, ``ia3_l`` of shape ``[1, in]``). The
shapes are PEFT's, so PEFT's tensors load as they are. The vectors start at 1 (the output is
unchanged) unless ``init_ia3_weights`` is false (standard normal, as PEFT).

Each matched cell moves onto a generated subclass whose ``construct`` calls the layer's own
computation (``pet_base_construct``) with the scaled input or scales its result: nothing of
MindSpore or MindFormers is copied. A layer whose output goes through its own activation is
refused as a non-feed-forward target: scaling after the activation cannot be folded into the
weight, and merging would change the output.

On/off is a data switch: the cells compute with ``l * s + (1 - s)``, ``s`` one shared float32
Parameter (``pet_ia3_on``) holding 1 or 0; with ``s = 0`` the factor is exactly 1 and the layer
computes exactly its base output, with no recompile in graph mode. Merging multiplies the
weight (and, for output scaling, the bias) by ``l``; unmerging divides by ``l + 1e-8``, as PEFT.
"""
from __future__ import annotations

import re
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ..utils.ms_compat import write_values
from ..config.pet_config import IA3Config
from ..errors import AdapterFileError, NoMatchError, UnsupportedCellError
from ..matching.cells import list_entry_matches, select_cells
from .base import Injection
from .file_layouts import PeftLayout
from .common import SwitchedTuner, init_rng, inject_all, projection_reason, shared_switch, weight_is_out_in

__all__ = ["IA3Tuner", "IA3Layer", "is_ia3_cell", "SWITCH_NAME"]

_ADDED_ATTRS = ("ia3_l", "ia3_feedforward", "pet_ia3_on")
SWITCH_NAME = "pet_ia3_on"   # the switch: a parameter, not a weight (not counted, never saved)
_UNMERGE_EPS = 1e-8          # PEFT's: unmerge divides by l + 1e-8


def _factor(cell):
    """``l`` while the switch holds 1, exactly 1 while it holds 0 (``l * 0 + 1``)."""
    on = ops.cast(cell.pet_ia3_on, ops.dtype(cell.ia3_l))
    return cell.ia3_l * on + (1.0 - on)


class IA3Layer:
    """Mixin for the generated classes: scale the input (feed-forward) or the output of the base layer."""

    pet_hooks_ia3 = True  # marker: "this instance was patched by pet_hooks' IA3"

    def construct(self, x):
        if self.ia3_feedforward:      # a Python bool: graph mode compiles one branch
            return self.pet_base_construct(x * ops.cast(_factor(self), ops.dtype(x)))
        out = self.pet_base_construct(x)
        return out * ops.cast(ops.reshape(_factor(self), (-1,)), ops.dtype(out))


def is_ia3_cell(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_hooks_ia3", False) is True


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    return projection_reason(cell, "IA3")


def _is_feedforward(path: str, patterns: Union[str, list, None]) -> bool:
    """PEFT's rule: a string is fullmatched against the path, a list entry names the path or its end."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(list_entry_matches(entry, path) for entry in patterns)


def _select_targets(net: nn.Cell, cfg: IA3Config) -> List[Tuple[str, nn.Cell]]:
    """The cells ``cfg`` selects; raises before anything is changed."""
    # "all-linear" / exclude_modules: PEFT's IA3Config has them as LoRA's (no layers_to_transform there)
    targets = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=_can_adapt,
                           skip=lambda path, cell: is_ia3_cell(cell), exclude_modules=cfg.exclude_modules,
                           is_linear=lambda cell: _can_adapt(cell) is None)
    paths = [path for path, _ in targets]
    ff = cfg.feedforward_modules
    for pattern in ([ff] if isinstance(ff, str) else list(ff or [])):
        if not any(_is_feedforward(path, pattern if isinstance(ff, str) else [pattern]) for path in paths):
            raise NoMatchError(
                f"feedforward_modules pattern {pattern!r} matches none of the cells target_modules selects "
                f"({', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}); it must name a subset of them")
    for path, cell in targets:
        if not _is_feedforward(path, ff) and getattr(cell, "activation_flag", False):
            raise UnsupportedCellError(
                f"target_modules {cfg.target_modules!r} matches cell '{path}' of type {type(cell).__name__} with "
                f"activation {type(cell.activation).__name__}: IA3 would scale its output after the activation, "
                f"which cannot be merged into the weight; list it in feedforward_modules (its input is scaled) "
                f"or target another layer")
    return targets


def _add_vector(path: str, cell: nn.Cell, cfg: IA3Config, rng: np.random.Generator, switch: Parameter) -> List[Parameter]:
    feedforward = _is_feedforward(path, cfg.feedforward_modules)
    shape = (1, int(cell.in_channels)) if feedforward else (int(cell.out_channels), 1)
    values = (np.ones(shape, np.float32) if cfg.init_ia3_weights
              else rng.standard_normal(shape).astype(np.float32))
    # Explicit name: parameters added after construction get no path prefix.
    cell.ia3_l = Parameter(values, name=f"{path}.ia3_l", requires_grad=True)
    cell.ia3_feedforward = feedforward
    cell.pet_ia3_on = switch
    return [cell.ia3_l]


def _inject(targets, cfg: IA3Config) -> List[Injection]:
    rng = init_rng(cfg)
    switch = shared_switch(SWITCH_NAME)   # one for the whole adapter: switching is one write
    return inject_all(targets, _ADDED_ATTRS, lambda index, path, cell: _add_vector(path, cell, cfg, rng, switch),
                      mixin_of=lambda cell: IA3Layer)


def _vector_in_weight_layout(cell: nn.Cell) -> np.ndarray:
    """``ia3_l`` (float32) shaped to multiply the weight as stored ([out, in] or [in, out])."""
    vector = cell.ia3_l.astype(mstype.float32).asnumpy()     # [out, 1] or [1, in]: the [out, in] layout
    return vector if weight_is_out_in(cell) else vector.T


def _scaled(cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
    """``[(parameter, float32 factor)]`` merging multiplies: the weight along the scaled axis and, when
    the output is scaled, the bias (PEFT's ``merge``)."""
    vector = cell.ia3_l.astype(mstype.float32).asnumpy()
    pairs = [(cell.weight, _vector_in_weight_layout(cell))]
    if not cell.ia3_feedforward and cell.has_bias:
        pairs.append((cell.bias, vector.reshape(-1)))
    return pairs


class IA3PeftLayout(PeftLayout):
    """PEFT's ``IA3``: one bare vector per module (``<module>.ia3_l``), and which modules are feed-forward."""

    peft_type = "IA3"
    weights = {"ia3_l": "ia3_l"}
    key_tail = ""              # PEFT's IA3 keys end in ".ia3_l", not ".ia3_l.weight"

    def fields(self, cfg: IA3Config) -> dict:
        return {"fan_in_fan_out": False, "init_ia3_weights": cfg.init_ia3_weights, "modules_to_save": None}

    def module_fields(self, injections: Sequence[Injection], mapped: Mapping[str, str], target_modules,
                      cfg=None) -> dict:
        """``feedforward_modules`` in PEFT's names: last names when they pick exactly the feed-forward
        targets out of a list ``target_modules`` (PEFT wants a subset of it), else a regex of full names."""
        ff = sorted(mapped[r.path] for r in injections if r.cell.ia3_feedforward)
        if not ff:
            return {"feedforward_modules": []}
        if isinstance(target_modules, list):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in ff})
            picked = {mapped[r.path] for r in injections if mapped[r.path].rsplit(".", 1)[-1] in leaves}
            if picked == set(ff):
                return {"feedforward_modules": leaves}
        return {"feedforward_modules": "|".join(re.escape(name) for name in ff)}

    def check_fields(self, doc, config_path: str) -> None:
        ff = doc.get("feedforward_modules")
        if ff is not None and not isinstance(ff, (str, list)):
            raise AdapterFileError(f"{config_path}: field 'feedforward_modules' must be a string or a list, "
                                   f"got {ff!r}")
        if doc.get("fan_in_fan_out"):
            raise AdapterFileError(f"{config_path}: fan_in_fan_out=true (GPT-2's Conv1D) is not supported")

    def config_from(self, doc, target_modules: List[str]) -> IA3Config:
        return IA3Config(pet_type="ia3", target_modules=target_modules,
                         init_ia3_weights=bool(doc.get("init_ia3_weights", True)))

    def config_from_modules(self, doc, module_map: Mapping[str, str]) -> IA3Config:
        """Which of our cells are feed-forward follows PEFT's rule applied to their module names."""
        theirs = doc.get("feedforward_modules")
        ff = sorted(ours for their, ours in module_map.items() if _peft_is_feedforward(their, theirs))
        return IA3Config(pet_type="ia3", target_modules=sorted(set(module_map.values())),
                         feedforward_modules=ff or None,
                         init_ia3_weights=bool(doc.get("init_ia3_weights", True)))

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type == IA3Config.PET_TYPE:
            return None      # which layers are feed-forward shows in the shapes, checked per tensor
        return f"{config_path}: an IA3 adapter cannot load into {net_name}, which has {applied.pet_type}"


class IA3Tuner(SwitchedTuner):
    """(IA)^3 as a :class:`~pet_hooks.tuners.base.Tuner`: scaling vectors on Dense / Linear."""

    label = "IA3"
    pet_types = ("ia3",)
    switch_attr = "pet_ia3_on"
    can_merge = True
    peft = IA3PeftLayout()

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def is_linear(self, cell: nn.Cell) -> bool:
        """What ``target_modules: "all-linear"`` selects: the cells IA3 adapts (Dense, MindFormers' Linear)."""
        return _can_adapt(cell) is None

    def select_targets(self, net: nn.Cell, cfg: IA3Config):
        return _select_targets(net, cfg)

    def inject(self, targets, cfg: IA3Config) -> List[Injection]:
        return _inject(targets, cfg)

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        """What merging adds, ``p * (l - 1)`` for the weight (and the bias when the output is scaled):
        the merged checkpoint (``save_merged_checkpoint``) and the tied-weight check read this."""
        return [(param, param.astype(mstype.float32).asnumpy() * (factor - 1.0))
                for param, factor in _scaled(injection.cell)]

    def merge(self, injection: Injection, sign: int) -> None:
        """PEFT's merge: ``W *= l`` along the scaled axis, and ``b *= l`` when the output is scaled;
        unmerge divides by ``l + 1e-8`` (not the additive mirror of merge, hence this override)."""
        for param, factor in _scaled(injection.cell):
            value = param.astype(mstype.float32).asnumpy()
            value = value * factor if sign > 0 else value / (factor + _UNMERGE_EPS)
            write_values(param, Tensor(value.astype(np.float32), mstype.float32))


def _peft_is_feedforward(module: str, patterns) -> bool:
    """PEFT's ``_check_target_module_feedforward``: fullmatch for a string, ``endswith`` for a list."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module.endswith(entry) for entry in (patterns or []))

