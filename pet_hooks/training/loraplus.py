"""LoRA+ (Hayou et al., 2024): the B matrices learn ``loraplus_lr_ratio`` times faster than the A matrices.

The parameter groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``), in MindSpore's
group format (``{"params", "lr", "weight_decay"}``)::

    groups = pet_hooks.loraplus_param_groups(net, lr=1e-4, ratio=16, weight_decay=0.01)
    optimizer = nn.AdamWeightDecay(groups, learning_rate=1e-4)

- A matrices (and every other trainable parameter of two or more dimensions): ``lr``, ``weight_decay``;
- B matrices and one-dimensional trainable parameters (biases, norms kept trainable with
  ``freeze_exclude``): ``lr * ratio``, ``weight_decay`` -- except biases and the parameters of
  normalisation cells, which get no weight decay (PEFT's ``groupB_no_decay``).

With ``loraplus_lr_ratio`` in the LoRA config, the front doors that rebuild the user's optimizer
(``PetCallback``, ``enable()``, ``pet-hooks run``) build it over these groups, with the user's
learning rate and weight decay.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List

from mindspore import Parameter, nn

from ..errors import OptimizerRebuildError, PetStateError
from ..surgery.core import get_state

__all__ = ["loraplus_param_groups", "rebuilt_groups", "is_norm_cell"]


def is_norm_cell(cell: nn.Cell) -> bool:
    """A normalisation cell (LayerNorm, RMSNorm, ...): PEFT keeps its parameters out of weight decay."""
    return isinstance(cell, nn.LayerNorm) or type(cell).__name__.lower().endswith(("norm", "rmsnorm"))


def _owners(net: nn.Cell) -> Dict[int, nn.Cell]:
    """parameter id -> the cell that holds it directly."""
    owners: Dict[int, nn.Cell] = {}
    for _, cell in net.cells_and_names():
        for param in cell.get_parameters(expand=False):
            owners.setdefault(id(param), cell)
    return owners


def _check_rate(name: str, value, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"loraplus_param_groups: {name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"loraplus_param_groups: {name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def loraplus_param_groups(net: nn.Cell, lr: float, ratio: float, weight_decay: float = 0.0) -> List[dict]:
    """The net's trainable parameters in LoRA+ groups (empty groups left out), for any MindSpore optimizer.

    Raises:
        PetStateError: ``net`` has no LoRA applied.
        ValueError: ``lr``, ``ratio`` or ``weight_decay`` is not a finite non-negative number (``ratio`` > 0).
    """
    state = get_state(net)
    if state is None or state.config.pet_type != "lora":
        raise PetStateError(f"loraplus_param_groups: {type(net).__name__} has no LoRA applied "
                            f"(call pet_hooks.apply with a LoRA config first)")
    _check_rate("lr", lr, zero_ok=True)
    _check_rate("ratio", ratio, zero_ok=False)
    _check_rate("weight_decay", weight_decay, zero_ok=True)
    owners = _owners(net)
    slow: List[Parameter] = []
    fast: List[Parameter] = []
    fast_no_decay: List[Parameter] = []
    for param in net.trainable_params():
        if not param.name.endswith(".lora_B") and len(param.shape) != 1:
            slow.append(param)
        elif "bias" in param.name.rsplit(".", 1)[-1] or is_norm_cell(owners.get(id(param), net)):
            fast_no_decay.append(param)
        else:
            fast.append(param)
    groups = [{"params": slow, "lr": float(lr), "weight_decay": float(weight_decay)},
              {"params": fast, "lr": float(lr) * ratio, "weight_decay": float(weight_decay)},
              {"params": fast_no_decay, "lr": float(lr) * ratio, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def rebuilt_groups(net: nn.Cell, optimizer_name: str, lr, weight_decay, ratio: float) -> List[dict]:
    """The groups a rebuilt optimizer gets under LoRA+: the user's learning rate and weight decay."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise OptimizerRebuildError(f"cannot rebuild optimizer {optimizer_name} for LoRA+ (loraplus_lr_ratio): its "
                                    f"learning rate must be a number, got {type(lr).__name__}; build the groups "
                                    f"with pet_hooks.loraplus_param_groups and your own schedule")
    weight_decay = 0.0 if weight_decay is None else weight_decay
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
        raise OptimizerRebuildError(f"cannot rebuild optimizer {optimizer_name} for LoRA+: its weight decay must be "
                                    f"a number, got {type(weight_decay).__name__}")
    return loraplus_param_groups(net, float(lr), ratio, float(weight_decay))
