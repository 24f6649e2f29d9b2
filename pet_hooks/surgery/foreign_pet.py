"""Models another PET library already adapted: MindFormers' own ``mindformers.pet`` (and mindpet).

pet_hooks does not adapt such a model a second time: stacking two adapters silently trains the
wrong thing (MindFormers' deltas frozen by pet_hooks, or pet_hooks' branch on top of
MindFormers' LoRA cell), and refusing with "overrides Dense.construct" explains nothing. So
``apply`` calls :func:`refuse_foreign_pet` first, and the error says what was found and the two
ways on::

    refuse_foreign_pet(net)   # PetConfigError naming the cell or parameter, and the hand-over

The usual way in is a MindFormers run YAML whose ``model.model_config.pet_config`` MindFormers'
own ``build_network`` turned into its PET outside pet_hooks' doors (inside them, ``hooks.mindformers``
makes that same block pet_hooks' PET), with ``PetCallback`` or ``apply`` given the model afterwards.
"""
from __future__ import annotations

from typing import Optional

from mindspore import nn

from ..config.pet_config import PetConfigError

__all__ = ["foreign_pet", "refuse_foreign_pet"]

# Class modules of the PET cells of MindFormers (PetModel, LoraModel, PTuning2Model, ...) and mindpet
# (LoRADense); parameter names MindFormers' and mindpet's deltas carry.
_FOREIGN_MODULES = ("mindformers.pet.", "mindpet.")
_FOREIGN_PARAM_MARK = "mindpet_delta_"


def foreign_pet(net: nn.Cell) -> Optional[str]:
    """What shows that another library adapted ``net`` (a cell or a parameter), else None."""
    # An adapted layer (mindpet's LoRADense) says more than the wrapper around the model (PetModel).
    for prefixes in (_FOREIGN_MODULES[1:], _FOREIGN_MODULES):
        for path, cell in net.cells_and_names():
            module = type(cell).__module__ or ""
            if module.startswith(prefixes):
                where = f"cell '{path}'" if path else "the net itself"
                return f"{where} is a {module}.{type(cell).__qualname__}"
    for param in net.get_parameters():
        if _FOREIGN_PARAM_MARK in param.name:
            return f"parameter '{param.name}' is a MindFormers/mindpet PET delta"
    return None


def refuse_foreign_pet(net: nn.Cell) -> None:
    """Raise PetConfigError when MindFormers' own PET (or mindpet) already adapted ``net``."""
    found = foreign_pet(net)
    if found is None:
        return
    raise PetConfigError(
        f"{type(net).__name__} already carries MindFormers' own PET ({found}); pet_hooks does not adapt a "
        f"model twice. Either let pet_hooks build the PET (when MindFormers builds the model from a run YAML "
        f"with pet_config, build it inside `with pet_hooks.enable():` or under `pet-hooks run`, where that same "
        f"pet_config gets pet_hooks' PET instead of MindFormers'), or keep MindFormers' PET; to carry its trained "
        f"LoRA over, save it with mindspore.save_checkpoint and load it into the plain model with "
        f"pet_hooks.load_adapter(net, ckpt, cfg)")
