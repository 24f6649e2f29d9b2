"""``enable(cfg)``: PET for models and optimizers a block of code builds, without touching that code.

    with pet_hooks.enable("pet.yaml") as session:
        net = MyGPT(...)                                   # an ordinary model
        opt = nn.Adam(net.get_parameters(), 1e-3)          # gets PET; opt holds only the deltas
        ... the script's own loop ...
    session.models                                         # the models that were adapted

Four patches, all undone on exit (also when the body raises), each attribute set
back to the identical original object:

- ``nn.Cell.__init__`` notes every cell built inside the block, so that the models built
  before or after it are never touched;
- ``nn.Optimizer.__init__`` (reached through ``super().__init__`` from every optimizer
  class) finds the model built inside the block that owns the parameters it is given,
  adapts that model once, and hands the optimizer the model's PET parameters instead,
  keeping parameter groups and their settings; ``mindspore.experimental.optim.Optimizer.__init__``
  (torch-style optimizers such as its ``AdamW``, another base class) the same;
- ``mindspore.experimental.optim.AdamW.__new__`` (and MindFormers' ``AdamW``'s, by the MindFormers door):
  with ``fused_optimizer: true`` in the config the call builds ``pet_hooks.optim.AdamW`` instead
  (``pet_hooks.training.fused_adamw``).

Without a config (``enable()``), the config is the ``pet_config`` of the run YAML MindFormers builds a
model from inside the block (``hooks.mindformers``: MindFormers' own PET construction is pet_hooks'
while the block is active); a config given here must equal that block, or the build is an error
naming both. Models built inside the block but given no optimizer there are adapted when the block ends
normally. When it ends normally, adapted cells of a model given an optimizer whose deltas did not
change since then are reported in a warning (``pet_hooks.training.grad_guard``: no gradient reached them).
Loss cells, optimizers and train-step wrappers are not models: the adapted cell
is the model inside them (``flow.unwrap_model``). ``enable`` does not nest: entering it while
it is active raises RuntimeError.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Iterator, List, Optional

from mindspore import Parameter, nn
from mindspore.experimental.optim import AdamW as ExperimentalAdamW, Optimizer as ExperimentalOptimizer

from . import flow
from .callback import AdaLoraSchedule
from .train_calls import add_handler, callbacks_of
from ..training import adalora
from ..training.fused_adamw import build_fused_instead
from ..training.grad_guard import GradGuard
from ..config.pet_config import PetConfig, check_adapter_name, config_differences, load_config
from ..config.default_targets import config_for_method
from ..errors import NoMatchError, PetConfigError
from . import mindformers as mindformers_door
from ..utils.patching import PatchSet
from ..surgery.core import has_pet

__all__ = ["enable", "PetSession", "active_session"]

logger = logging.getLogger("pet_hooks")
_ACTIVE: Optional["PetSession"] = None
_OPTIMIZER_INIT = inspect.signature(nn.Optimizer.__init__)
_EXPERIMENTAL_INIT = inspect.signature(ExperimentalOptimizer.__init__)


class PetSession:
    """What one ``enable()`` block saw: the cells built in it and the models it adapted."""

    def __init__(self, config: Optional[PetConfig], adapter_name: Optional[str] = None):
        self.config = config            # None until a run YAML's pet_config is built (enable() without one)
        self.is_open = False            # True inside its enable() block
        # Trainer(pet_method=...) with no config anywhere: each model gets that method's defaults (default_targets)
        self.method: Optional[str] = None
        self.adapter_name = adapter_name
        self.models: List[nn.Cell] = []
        self._built: "weakref.WeakSet[nn.Cell]" = weakref.WeakSet()
        self._guards: List[GradGuard] = []

    # -- the two interceptions ------------------------------------------------------------
    def note_cell(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        if instance is not None:
            self._built.add(instance)
        return result

    def redirect_optimizer(self, wrapped, instance, args, kwargs):
        bound = _OPTIMIZER_INIT.bind(instance, *args, **kwargs)
        bound.arguments["parameters"] = self._parameters_for(
            bound.arguments.get("parameters"), type(instance).__name__, bound.arguments.get("learning_rate"),
            bound.arguments.get("weight_decay", 0.0))
        result = wrapped(*bound.args[1:], **bound.kwargs)
        self._prepare_adalora(instance)
        return result

    def _prepare_adalora(self, optimizer) -> None:
        """AdaLoRA: the optimizer over a model's deltas keeps their gradients (``training.adalora``)."""
        held = {id(p) for p in getattr(optimizer, "parameters", None) or []}
        for model in self.models:
            if adalora.is_adalora(model) and any(id(p) in held for p in model.trainable_params()):
                adalora.prepare_optimizer(optimizer, model)

    def add_schedule(self, model, bound, proceed):
        """A ``Model.train`` handler (``train_calls``): AdaLoRA's budget schedule from the training step."""
        nets = [m for m in self.models if adalora.is_adalora(m)]
        if nets:
            bound.arguments["callbacks"] = callbacks_of(bound) + [AdaLoraSchedule(net) for net in nets]
        return proceed()

    def redirect_experimental_optimizer(self, wrapped, instance, args, kwargs):
        """The same for ``mindspore.experimental.optim`` (torch-style optimizers, another base class)."""
        bound = _EXPERIMENTAL_INIT.bind(instance, *args, **kwargs)
        defaults = bound.arguments.get("defaults") or {}
        bound.arguments["params"] = self._parameters_for(
            bound.arguments.get("params"), type(instance).__name__, defaults.get("lr"), defaults.get("weight_decay", 0.0))
        result = wrapped(*bound.args[1:], **bound.kwargs)
        self._prepare_adalora(instance)
        return result

    def _parameters_for(self, params, optimizer_name: str, learning_rate, weight_decay):
        """What an optimizer built in the block gets instead of ``params``: the PET parameters of the models
        (built in the block) owning them, adapted now; ``params`` itself when it holds none of theirs."""
        if params is not None and not isinstance(params, (list, tuple)):
            params = list(params)  # a generator such as net.get_parameters(): read it once
        models = self.models_owning(params or [])
        if not models:
            return params
        for model in models:
            self._adapt(model)
            if all(guard.model is not model for guard in self._guards):
                self._guards.append(GradGuard(model))  # the deltas as the optimizer gets them
        if len(models) == 1:
            return flow.optimizer_params(params, models[0], optimizer_name, learning_rate, weight_decay)
        return [p for m in models for p in m.trainable_params()]

    def wants_fused_optimizer(self) -> bool:
        """Config ``fused_optimizer: true``: torch's AdamW classes built in the block are pet_hooks' fused one."""
        return self.is_open and self.config is not None and self.config.fused_optimizer

    # -- helpers ----------------------------------------------------------------------------
    def roots(self) -> List[nn.Cell]:
        """Cells built in the block that no other such cell contains, optimizers left out."""
        built = [c for c in list(self._built) if not isinstance(c, nn.Optimizer)]
        inner = set()
        for cell in built:
            inner.update(id(sub) for name, sub in cell.cells_and_names() if name)
        return [c for c in built if id(c) not in inner]

    def models_owning(self, params) -> List[nn.Cell]:
        """The models (built in the block) that own any of ``params`` (a list, or parameter groups)."""
        wanted = {id(p) for g in params for p in (g.get("params", []) if isinstance(g, dict) else [g])
                  if isinstance(p, Parameter)}
        models = []
        for root in self.roots():
            if any(id(p) in wanted for p in root.get_parameters()):
                model = flow.unwrap_model(root)
                if all(model is not m for m in models):
                    models.append(model)
        return models

    def _adapt(self, model: nn.Cell) -> None:
        if self.config is None and self.method is not None and not has_pet(model):
            self.config = config_for_method(model, self.method)
        if self.config is not None and (not has_pet(model) or self.adapter_name is not None):
            flow.adapt(model, self.config, self.adapter_name)
        if has_pet(model) and all(model is not m for m in self.models):
            self.models.append(model)

    def adapt_built(self, model: nn.Cell, config: PetConfig) -> None:
        """Adapt a model MindFormers built (or was handed) with ``config`` (``hooks.mindformers``)."""
        flow.adapt(model, config, self.adapter_name)
        if all(model is not m for m in self.models):
            self.models.append(model)

    def take_yaml_config(self, config: PetConfig, model: nn.Cell) -> PetConfig:
        """The config for a model MindFormers builds from a run YAML whose pet_config is ``config``: that
        one, which becomes the block's when it has none yet; one that differs is an error naming both."""
        if self.config is None:
            self.config = config
        elif self.config != config:
            raise PetConfigError(
                f"the PET config given to pet_hooks differs from the pet_config of the run YAML MindFormers is "
                f"building {type(model).__name__} from ({config_differences(self.config, config)}, pet_hooks' "
                f"first); give one of them: pet_hooks.enable() with no argument, or pet-hooks run without --config, "
                f"takes the YAML's")
        return config

    def check_gradients(self) -> None:
        """Warn about adapted cells whose deltas did not move since their optimizer was built."""
        for guard in self._guards:
            guard.check("by the end of the enable() block")

    def adapt_remaining(self) -> None:
        """Adapt models built in the block that no optimizer claimed (those the config matches)."""
        if self.config is None:
            return
        for root in self.roots():
            model = flow.unwrap_model(root)
            if has_pet(model) or next(iter(model.get_parameters()), None) is None:
                continue
            try:
                self._adapt(model)
            except NoMatchError as err:  # its target_modules select nothing here: not a model for this config
                logger.debug("pet_hooks: %s is not a model for this config: %s", type(model).__name__, err)


def active_session() -> Optional[PetSession]:
    """The session of the ``enable()`` block running now, if any."""
    return _ACTIVE


@contextlib.contextmanager
def enable(cfg=None, adapter_name: Optional[str] = None) -> Iterator[PetSession]:
    """Give PET to every model built in the block; see the module docstring. Without ``cfg`` the config is
    the ``pet_config`` of the run YAML MindFormers builds a model from. With ``adapter_name`` the
    adapter of that name (added with ``cfg`` to a model that has other adapters) is the one trained."""
    global _ACTIVE  # pylint: disable=global-statement
    config = None if cfg is None else load_config(cfg)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    if _ACTIVE is not None:
        raise RuntimeError("pet_hooks.enable() is already active; it does not nest (exit the outer block first)")
    session = PetSession(config, adapter_name)
    patches = PatchSet()
    remove_schedule = add_handler(session.add_schedule)      # AdaLoRA's schedule in the block's Model.train calls
    try:
        patches.wrap(nn.Cell, "__init__", session.note_cell)
        patches.wrap(nn.Optimizer, "__init__", session.redirect_optimizer)
        patches.wrap(ExperimentalOptimizer, "__init__", session.redirect_experimental_optimizer)
        build_fused_instead(patches, ExperimentalAdamW, session.wants_fused_optimizer)
        _ACTIVE, session.is_open = session, True
        mindformers_door.install(session, patches)      # MindFormers' own PET construction, now or on import
        yield session
        session.adapt_remaining()
        session.check_gradients()
    finally:
        _ACTIVE, session.is_open = None, False
        patches.undo()
        remove_schedule()
