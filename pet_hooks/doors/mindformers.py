"""MindFormers' own flow inside the doors: a run YAML's ``pet_config`` built by MindFormers gets pet_hooks' PET.

MindFormers documents PET as a ``pet_config`` block in ``model.model_config`` of a run YAML, trained
with its ``Trainer`` (or ``run_mindformer.py``). Both build the model with ``build_network``, which
hands the model and that block to ``mindformers.pet.get_pet_model``. While ``enable()`` or
``pet-hooks run`` is active, that function is pet_hooks'::

    with pet_hooks.enable():                          # no config: the YAML's pet_config is the config
        Trainer(args="run_llama_lora_cpu.yaml", task="text_generation", train_dataset=ds).train()
    # the model kept its base parameter names, trained only pet_hooks' deltas, and the adapter
    # was saved into the Trainer's output_dir

Patches on MindFormers, installed when a door opens (or the moment MindFormers is imported
inside it) and undone with the door's other patches, so outside the doors MindFormers is itself:

- ``mindformers.pet.get_pet_model``: the model gets pet_hooks' adapter from that same block (any
  ``pet_type`` pet_hooks knows); the base model itself is returned, not a wrapper, so base
  checkpoints (``load_checkpoint``, ``finetune_checkpoint``) load by their own names;
- ``Trainer.__init__``: ``pet_method`` is applied to a model instance (``default_targets``), which
  MindFormers 1.9 only does for the model names of its own list;
- ``Trainer.train`` / ``Trainer.finetune``: the trained adapter is saved into the output directory
  (and a warning when MindFormers' context was never built, which makes the Trainer switch to PyNative);
- ``replace_tk_to_mindpet`` where MindFormers reads checkpoints: the delta names of MindFormers' own PET
  become pet_hooks' (``load_checkpoint`` / ``resume_training`` from a run trained without pet_hooks);
- MindFormers' registry gets pet_hooks' CPU train step (``pet_hooks.training.mindformers_trainer``).

The config logic (which config, conflicts) is the session's (``hooks.context``); the PET itself is
``pet_hooks.doors.flow``.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
from typing import Any, Optional

import mindspore as ms
import wrapt
from mindspore import nn

from . import flow
from ..config.pet_config import config_from_dict, config_types, model_hints
from ..config.default_targets import config_for_method
from ..errors import PetConfigError
from ..surgery.foreign_pet import refuse_foreign_pet
from ..io.mindformers_io import from_mindformers_name
from ..utils.patching import PatchSet
from ..surgery.core import has_pet
from ..training.fused_adamw import build_fused_instead

__all__ = ["install", "yaml_config"]

logger = logging.getLogger("pet_hooks")


# MindFormers' LoraConfig leaves these None for "as the adapted layer": pet_hooks' defaults mean the same
# (param_init_type float32, compute_dtype the layer's own).
_NONE_MEANS_DEFAULT = ("param_init_type", "compute_dtype")


def yaml_config(pet_config: Any, model: nn.Cell, where: Optional[str] = None):
    """pet_hooks' config for a ``pet_config`` block as MindFormers hands it over (a MindFormerConfig, a
    MindFormers PetConfig or a dict); the built model's config gives the prefix methods their hints.
    A bad block is a PetConfigError that says where the block came from (``where``)."""
    block = pet_config
    if hasattr(pet_config, "keys"):
        block = {key: value for key, value in dict(pet_config).items()
                 if not (key in _NONE_MEANS_DEFAULT and value is None)}
    try:
        return config_from_dict(block, model_hints(getattr(model, "config", None)))
    except PetConfigError as err:
        where = where or f"model.model_config.pet_config of the run YAML MindFormers is building {type(model).__name__} from"
        raise type(err)(f"{where}: {err}") from None


class _Door:
    """The MindFormers patches of one session; each wrapper runs only while that session is the active one."""

    def __init__(self, session, patches: PatchSet):
        self.session = session
        self.patches = patches
        self.installed = False

    # -- the interceptions (each a wrapt wrapper) ---------------------------------------------
    def get_pet_model(self, wrapped, instance, args, kwargs):
        base_model, pet_config = _bind(wrapped, args, kwargs, "base_model", "config")
        if not self._live():
            return wrapped(*args, **kwargs)
        cfg = self.session.take_yaml_config(yaml_config(pet_config, base_model), base_model)
        self.session.adapt_built(base_model, cfg)
        logger.info("pet_hooks: %s built by MindFormers gets pet_hooks' %s (MindFormers' own PET is not applied)",
                    type(base_model).__name__, cfg.pet_type)
        return base_model

    def trainer_init(self, wrapped, instance, args, kwargs):
        bound = inspect.signature(wrapped).bind(*args, **kwargs)
        method = bound.arguments.get("pet_method")
        model = bound.arguments.get("model")
        if not self._live() or not method:
            return wrapped(*args, **kwargs)
        if not isinstance(method, str) or method.lower() not in config_types():
            raise PetConfigError(f"unknown pet_type {method!r} given as pet_method; expected one of "
                                 f"{list(config_types())}")
        bound.arguments["pet_method"] = ""      # MindFormers would only warn that it ignores it
        if isinstance(model, nn.Cell):
            refuse_foreign_pet(model)           # MindFormers' own PET already there: say so before reading configs
            self.session.adapt_built(model, self._method_config(model, method))
            return wrapped(*bound.args, **bound.kwargs)
        result = wrapped(*bound.args, **bound.kwargs)
        # The model is built later from the run YAML: with a pet_config there (build_network -> get_pet_model),
        # that block, of this type; else the session's config or, failing both, the method's defaults for the
        # model the optimizer is built for (PetSession.method).
        model_config = instance.config.model.model_config if instance.config.model else None
        block = getattr(model_config, "pet_config", None)
        if block:
            _check_method(method, _pet_type(block), "model.model_config.pet_config of the run YAML")
        elif self.session.config is not None:
            _check_method(method, self.session.config.pet_type, "the PET config given to pet_hooks")
        else:
            self.session.method = method.lower()
        return result

    def trainer_run(self, wrapped, instance, args, kwargs):
        if self._live():
            _warn_without_context()
        result = wrapped(*args, **kwargs)
        if self._live():
            self._save_to_output_dir(instance)
        return result

    def checkpoint_names(self, wrapped, instance, args, kwargs):
        """MindFormers' own rename of a checkpoint's keys (``tk_delta`` -> ``mindpet_delta``), then its own PET's
        delta names to pet_hooks' (``<cell>.mindpet_delta_lora_a`` -> ``<cell>.lora_A``, optimizer moments too):
        inside a door the model carries pet_hooks' deltas, so a checkpoint of MindFormers' LoRA loads into them
        instead of being skipped as unknown names."""
        renamed = wrapped(*args, **kwargs)
        if not self._live():
            return renamed
        return {from_mindformers_name(name): value for name, value in renamed.items()}

    # -- helpers ------------------------------------------------------------------------------
    def _live(self) -> bool:
        return self.session.is_open

    def _method_config(self, model: nn.Cell, method: str):
        """The config ``pet_method`` means for ``model``: the model config's pet_config when of that type,
        else the session's explicit config when of that type, else the family's defaults."""
        block = getattr(getattr(model, "config", None), "pet_config", None)
        if block:
            where = f"{type(model).__name__}.config.pet_config"
            _check_method(method, _pet_type(block), where)
            return yaml_config(block, model, where)
        if self.session.config is not None:
            _check_method(method, self.session.config.pet_type, "the PET config given to pet_hooks")
            return self.session.config
        return config_for_method(model, method)

    def _save_to_output_dir(self, trainer) -> None:
        """The adapter of the model this Trainer trained, into its output directory (rank 0)."""
        from mindformers.tools.utils import get_output_root_path   # the Trainer's output_dir, as MindFormers resolves it
        inner = getattr(trainer, "trainer", None)
        for candidate in (getattr(inner, "real_model", None), getattr(inner, "network", None), trainer.model):
            if isinstance(candidate, nn.Cell) and has_pet(flow.unwrap_model(candidate)):
                path = flow.save_for_rank(flow.unwrap_model(candidate), get_output_root_path(),
                                          self.session.adapter_name)
                if path:
                    print(f"pet-hooks: adapter saved to {path}", file=sys.stderr)
                return

    def install_now(self) -> None:
        """Patch MindFormers (imported by now) and register the CPU train step; once."""
        if self.installed:
            return
        self.installed = True
        import mindformers.pet
        from mindformers.trainer.trainer import Trainer
        from ..training import mindformers_trainer

        self.patches.wrap(mindformers.pet, "get_pet_model", self.get_pet_model)   # build_network imports it late
        self.patches.wrap(Trainer, "__init__", self.trainer_init)
        from mindformers.core.optim.adamw import AdamW
        build_fused_instead(self.patches, AdamW, self.session.wants_fused_optimizer)
        self.patches.wrap(Trainer, "train", self.trainer_run)
        self.patches.wrap(Trainer, "finetune", self.trainer_run)
        for module in _CHECKPOINT_READERS:          # each imported the function by name
            self.patches.wrap(importlib.import_module(module), "replace_tk_to_mindpet", self.checkpoint_names)
        mindformers_trainer.register()

    def on_import(self, _module) -> None:
        if self._live():
            self.install_now()


def _bind(function, args, kwargs, *names):
    bound = inspect.signature(function).bind(*args, **kwargs)
    return tuple(bound.arguments.get(name) for name in names)


# The modules that read checkpoints into a model (the Trainer's load_checkpoint / resume, a model's own
# checkpoint_name_or_path) and pass the names through replace_tk_to_mindpet first.
_CHECKPOINT_READERS = ("mindformers.trainer.utils", "mindformers.models.modeling_utils", "mindformers.models.base_model")


def _warn_without_context() -> None:
    """Say so when MindFormers' context was never built: the Trainer then builds it with its defaults in the
    middle of train(), which switches MindSpore to PyNative mode (a graph-mode run silently runs eagerly)."""
    from mindformers.core.context.build_context import MFContextOperator
    if MFContextOperator.get_mf_ctx_instance() is None:
        logger.warning("pet_hooks: MindFormers' context is not built: its Trainer will build one with its defaults "
                       "during train(), which sets MindSpore to PyNative mode (mode %s now). Call "
                       "mindformers.build_context(MindFormerConfig(run_yaml)) first, as run_mindformer.py does",
                       ms.get_context("mode"))


def _pet_type(block: Any) -> Any:
    """The pet_type of a pet_config block (a mapping, or a MindFormers PetConfig object)."""
    return block.get("pet_type") if hasattr(block, "get") else getattr(block, "pet_type", None)


def _check_method(method: str, pet_type: Any, where: str) -> None:
    if not isinstance(pet_type, str) or pet_type.lower() != method.lower():
        raise PetConfigError(f"pet_method {method!r} conflicts with {where}, whose pet_type is {pet_type!r}: "
                             f"give one of them, or make them the same method")


def install(session, patches: PatchSet) -> None:
    """Take over MindFormers' PET for ``session``: now when MindFormers is imported, else the moment it is."""
    door = _Door(session, patches)
    if "mindformers" in sys.modules and hasattr(sys.modules["mindformers"], "Trainer"):
        door.install_now()
    else:
        # Fires once, when MindFormers' __init__ has run (mindformers.pet and the Trainer are loaded by
        # then); a no-op if this session has ended. wrapt cannot unregister it, hence the check.
        wrapt.register_post_import_hook(door.on_import, "mindformers")
