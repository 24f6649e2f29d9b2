"""The core flow the front doors share: find the model, adapt it once, point the optimizer at the deltas.

    config -> match -> inject -> freeze        (surgery.apply, idempotent)
           -> optimizer                        (params_for_optimizer / rebuild_optimizer / attach_to_train_step)
           -> adapter on disk                  (save_for_rank)

``PetCallback``, ``enable()`` and ``pet-hooks run`` only decide *when* these run. MindSpore
optimizers do not keep all their constructor arguments as attributes, so rebuilding "the same
optimizer over the deltas" replays the arguments MindSpore's own decorator kept, or those the
recorder saw (``pet_hooks.training.recorder``), with the parameters swapped.
"""
from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Dict, Iterable, List, Optional

from mindspore import Parameter, nn

from ..io.adapter_io import save_adapter
from ..errors import OptimizerRebuildError
from ..training.adalora import prepare_optimizer
from ..training.fused_adamw import fused_in_place_of
from ..training.loraplus import rebuilt_groups
from ..training.recorder import constructor_arguments, init_signature
from ..multi.adapters import add_adapter, set_adapter
from ..errors import PetStateError
from ..surgery.core import apply, get_state  # apply is idempotent: a model is adapted once
from ..utils.distributed import is_rank_zero

__all__ = ["unwrap_model", "apply", "adapt", "params_for_optimizer", "optimizer_params", "rebuild_optimizer",
           "attach_to_train_step", "init_signature", "save_for_rank", "is_rank_zero"]

logger = logging.getLogger("pet_hooks")


# ----------------------------------------------------------------------------- which cell is the model
def _own_params(cell: nn.Cell) -> bool:
    return bool(cell._params) or bool(cell._params_list)  # pylint: disable=protected-access


def _is_mindformers_model(cell: nn.Cell) -> bool:
    # Only look if MindFormers is already imported: a net cannot hold one of its models otherwise.
    module = sys.modules.get("mindformers.models.modeling_utils")
    base = getattr(module, "PreTrainedModel", None)
    return base is not None and isinstance(cell, base)


def unwrap_model(cell: nn.Cell) -> nn.Cell:
    """The model inside wrappers (train step, loss cell, a user's ``NetWithLoss``).

    Descends while the cell holds no parameters of its own and exactly one child holds any:
    ``TrainOneStepCell(WithLossCell(net, loss), opt)`` has two (network and optimizer), so the
    train step is unwrapped by attribute first. A MindFormers model (``PreTrainedModel``) is the
    model even when one child holds everything (the mcore ``TrainingQwen3ForCausalLM`` and its
    ``GPTModel``): every front door then adapts the cell ``apply(model)`` adapts, and the deltas
    get the same names through each of them.
    """
    while True:
        if _is_mindformers_model(cell):
            return cell
        for attr in ("network", "_backbone"):  # TrainOneStep*Cell, WithLossCell / WithEvalCell
            inner = cell.__dict__.get("_cells", {}).get(attr)
            if isinstance(inner, nn.Cell) and (attr == "_backbone" or hasattr(cell, "optimizer")):
                cell = inner
                break
        else:
            if _own_params(cell):
                return cell
            holders = [c for c in cell._cells.values()  # pylint: disable=protected-access
                       if isinstance(c, nn.Cell) and not isinstance(c, nn.Optimizer)
                       and next(iter(c.get_parameters()), None) is not None]
            if len(holders) != 1:
                return cell
            cell = holders[0]


# ----------------------------------------------------------------------------- adapt it
def adapt(model: nn.Cell, cfg, adapter_name: Optional[str] = None) -> nn.Cell:
    """What a front door does to the model: ``apply(cfg)`` (idempotent), or with ``adapter_name`` make the
    adapter of that name active, applied or added with ``cfg`` when the model does not have it yet."""
    if adapter_name is None:
        return apply(model, cfg)
    state = get_state(model)
    if state is None:
        return apply(model, cfg, adapter_name=adapter_name)
    if adapter_name in state.adapters:
        if state.adapters[adapter_name].config != cfg:
            raise PetStateError(f"{type(model).__name__} already has an adapter {adapter_name!r} with another config "
                                f"({state.adapters[adapter_name].config.to_dict()}); pick another adapter_name")
        if state.active == [adapter_name]:
            return model
    else:
        add_adapter(model, adapter_name, cfg)
    return set_adapter(model, adapter_name)


# ----------------------------------------------------------------------------- the optimizer follows
def _home_of(model: nn.Cell) -> Dict[int, Parameter]:
    """delta id -> the base parameter whose optimizer group it joins (its layer's weight)."""
    state = get_state(model)
    homes: Dict[int, Parameter] = {}
    for injection in state.injections:
        home = state.tuner.group_anchor(injection)
        for delta in state.tuner.deltas_of(injection):
            if home is not None:
                homes[id(delta)] = home
    for kept in state.kept:
        homes[id(kept)] = kept
    return homes


def params_for_optimizer(params: Any, model: nn.Cell) -> Any:
    """What an optimizer should get instead of ``params``: the model's trainable PET parameters.

    A flat list (or generator) becomes the trainable parameters; grouped parameters keep their
    groups and settings, each delta joining the group that held its layer's weight (or the
    first group), groups left empty dropped, and ``order_params`` left out.
    """
    trainable = model.trainable_params()
    items = list(params)
    if not items or not all(isinstance(g, dict) for g in items):
        return trainable
    homes = _home_of(model)
    groups = [dict(g) for g in items if "params" in g]
    owners = [{id(p) for p in g["params"]} for g in groups]
    placed: List[List[Parameter]] = [[] for _ in groups]
    for param in trainable:
        home = homes.get(id(param), param)
        index = next((i for i, ids in enumerate(owners) if id(home) in ids), 0)
        placed[index].append(param)
    result = []
    for group, members in zip(groups, placed):
        if members:
            group["params"] = members
            result.append(group)
    return result


def optimizer_params(params: Any, model: nn.Cell, optimizer_name: str, learning_rate: Any = None,
                     weight_decay: Any = None) -> Any:
    """:func:`params_for_optimizer`, or with ``loraplus_lr_ratio`` in the config, LoRA+ groups over the deltas
    with the optimizer's own learning rate and weight decay (``pet_hooks.training.loraplus``)."""
    ratio = getattr(get_state(model).config, "loraplus_lr_ratio", None)
    if ratio is None:
        return params_for_optimizer(params, model)
    if any(isinstance(group, dict) for group in params):
        raise OptimizerRebuildError(f"cannot give optimizer {optimizer_name} LoRA+ groups (loraplus_lr_ratio): it "
                                    f"was built over parameter groups; build it over "
                                    f"pet_hooks.loraplus_param_groups(net, lr, ratio, weight_decay) instead")
    return rebuilt_groups(model, optimizer_name, learning_rate, weight_decay, ratio)


def _argument(bound: inspect.BoundArguments, *names: str) -> Any:
    """The value of the first of ``names`` the signature has: as passed, or its default (None if none)."""
    for key in names:
        if key in bound.arguments:
            return bound.arguments[key]
        if key in bound.signature.parameters:
            return bound.signature.parameters[key].default
    return None


def rebuild_optimizer(optimizer: nn.Optimizer, model: nn.Cell) -> nn.Optimizer:
    """An optimizer of the same class and settings as ``optimizer``, over the PET parameters.

    Raises:
        OptimizerRebuildError (a ValueError): the constructor arguments are not known (a class without
            MindSpore's record, built before a door installed the recorder) or replaying them failed;
            names the class.
    """
    cls = type(optimizer)
    record = constructor_arguments(optimizer)
    if record is None:
        raise OptimizerRebuildError(f"cannot rebuild optimizer {cls.__name__} over the PET parameters: its constructor "
                         f"arguments are not known ({cls.__name__} does not keep them as MindSpore's optimizers do, "
                         f"and it was built before the recorder was installed): build PetCallback before the "
                         f"optimizer, or build the optimizer inside pet_hooks.enable(), or over "
                         f"net.trainable_params() after pet_hooks.apply")
    args, kwargs = record
    try:
        bound = init_signature(cls).bind(optimizer, *args, **kwargs)
    except TypeError as err:
        raise OptimizerRebuildError(f"cannot rebuild optimizer {cls.__name__}: recorded arguments do not fit ({err})") from None
    first = next(iter(list(bound.signature.parameters.values())[1:]), None)
    first = first.name if first is not None and first.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY) else None
    if first is None or first not in bound.arguments:
        raise OptimizerRebuildError(f"cannot rebuild optimizer {cls.__name__}: cannot tell which argument holds the parameters")
    bound.arguments[first] = optimizer_params(bound.arguments[first], model, cls.__name__,
                                              _argument(bound, "learning_rate", "lr"), _argument(bound, "weight_decay"))
    try:
        fused = fused_in_place_of(cls, bound.args[1:], bound.kwargs) if get_state(model).config.fused_optimizer \
            else None
        return fused if fused is not None else cls(*bound.args[1:], **bound.kwargs)
    except Exception as err:
        raise OptimizerRebuildError(f"cannot rebuild optimizer {cls.__name__} over the PET parameters: {err}") from err


def _holds_exactly(optimizer: nn.Optimizer, params: Iterable[Parameter]) -> bool:
    return {id(p) for p in optimizer.parameters} == {id(p) for p in params}


def attach_to_train_step(train_cell: nn.Cell, model: nn.Cell) -> Optional[nn.Optimizer]:
    """Point a ``TrainOneStep*Cell`` at an optimizer over the PET parameters; returns the new one.

    Returns None when its optimizer already holds exactly those parameters.
    """
    optimizer = getattr(train_cell, "optimizer", None)
    if not isinstance(optimizer, nn.Optimizer) or not hasattr(train_cell, "weights"):
        raise OptimizerRebuildError(f"{type(train_cell).__name__} is not a train-step cell with an optimizer "
                         f"(expected TrainOneStepCell, TrainOneStepWithLossScaleCell or a subclass)")
    if _holds_exactly(optimizer, model.trainable_params()):
        prepare_optimizer(optimizer, model)   # AdaLoRA: its step keeps the gradients (nothing for other methods)
        return None
    new = prepare_optimizer(rebuild_optimizer(optimizer, model), model)
    train_cell.optimizer = new
    train_cell.weights = new.parameters
    if getattr(train_cell, "return_grad", False):  # the names it pairs with the gradients it returns
        train_cell.weights_name = [param.name for param in new.parameters]
    if getattr(train_cell, "reducer_flag", False):  # data parallel: the reducer is sized by the weights
        from mindspore.nn.wrap.grad_reducer import DistributedGradReducer
        train_cell.grad_reducer = DistributedGradReducer(new.parameters, train_cell.mean, train_cell.degree)
    return new


# ----------------------------------------------------------------------------- the adapter on disk
def save_for_rank(model: nn.Cell, directory: str, adapter_name: Optional[str] = None) -> Optional[str]:
    """Save the adapter (the named one, else the active one) from rank 0 only; other ranks do nothing."""
    if not is_rank_zero():
        return None
    path = save_adapter(model, directory, adapter_name=adapter_name)
    logger.info("pet_hooks: adapter saved to %s", path)
    return path
