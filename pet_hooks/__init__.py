"""pet_hooks: parameter-efficient tuning (LoRA, P-Tuning v2, Prefix-Tuning) for unmodified MindSpore nets.

    import pet_hooks
    cfg = pet_hooks.load_config("pet.yaml")
    pet_hooks.apply(net, cfg)
    print(pet_hooks.trainable_summary(net))
    ... train ...
    pet_hooks.save_adapter(net, "adapter/")

Importing the package is cheap and changes nothing: the public names below are loaded from
their modules on first use (``pet-hooks check-config`` and ``pet-hooks version`` never import
MindSpore), and nothing is patched until a door needs it (``enable()``, the launcher and
``PetCallback`` patch what they use; see ``pet_hooks.training.recorder``).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import (AdapterFileError, AdapterNotFoundError, NoMatchError, OptimizerRebuildError, PetConfigError,
                     PetConfigTypeError, PetError, PetStateError, UnsupportedCellError)

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "PetConfig": "config.pet_config", "LoraConfig": "config.pet_config", "PTuning2Config": "config.pet_config",
    "PrefixTuningConfig": "config.pet_config", "IA3Config": "config.pet_config", "BitFitConfig": "config.pet_config",
    "AdapterConfig": "config.pet_config", "LowRankAdapterConfig": "config.pet_config",
    "LoHaConfig": "config.pet_config", "LoKrConfig": "config.pet_config",      # issue 30 item 3
    "OFTConfig": "config.pet_config",                                          # issue 30 item 5
    "VeraConfig": "config.pet_config",                                         # issue 30 item 4
    "AdaLoraConfig": "config.pet_config", "update_and_allocate": "training.adalora",   # issue 30 item 1
    "adalora_optimizer": "training.adalora",
    "PromptTuningConfig": "config.pet_config", "PromptModel": "tuners.prompt.models",       # issue 30 item 2
    "register_prompt_model": "tuners.prompt.models", "unregister_prompt_model": "tuners.prompt.models",
    "load_config": "config.pet_config",
    "register_method": "config.methods", "unregister_method": "config.methods",
    "apply": "surgery.core", "remove": "surgery.core", "merge": "surgery.core", "unmerge": "surgery.core",
    "disable_adapters": "surgery.core", "delta_parameters": "surgery.core", "trainable_summary": "surgery.core",
    "save_adapter": "io.adapter_io", "load_adapter": "io.adapter_io",
    "save_checkpoint": "training.run_checkpoint", "load_checkpoint": "training.run_checkpoint",
    "PetCallback": "doors.callback", "enable": "doors.context",
    "register_attention": "tuners.prefix.attention", "unregister_attention": "tuners.prefix.attention",
    "PrefixAttention": "tuners.prefix.attention",
    "register_lora_kind": "tuners.lora.dispatch", "unregister_lora_kind": "tuners.lora.dispatch",
    "save_merged_checkpoint": "io.mindformers_io",
    "loraplus_param_groups": "training.loraplus",
    "add_adapter": "multi.adapters", "set_adapter": "multi.adapters", "active_adapters": "multi.adapters",
    "delete_adapter": "multi.adapters", "list_adapters": "multi.adapters", "adapter_per_row": "multi.adapters",
    "add_weighted_adapter": "multi.adapters",
    "save_as_lora": "io.lora_conversion",
    "UncheckedVersionWarning": "utils.ms_compat",
    "PetTrainOneStepCell": "training.mindformers_trainer",
    "register_mindformers_train_step": "training.mindformers_trainer",
}

__all__ = [
    "__version__",
    "PetConfig", "LoraConfig", "PTuning2Config", "PrefixTuningConfig", "PetConfigError", "load_config",
    "IA3Config", "BitFitConfig", "AdapterConfig", "LowRankAdapterConfig", "LoHaConfig", "LoKrConfig",
    "OFTConfig", "VeraConfig",                                                     # issue 30 items 4, 5
    "AdaLoraConfig", "update_and_allocate", "adalora_optimizer",                   # issue 30 item 1
    "PromptTuningConfig", "PromptModel", "register_prompt_model", "unregister_prompt_model",   # issue 30 item 2
    "apply", "remove", "merge", "unmerge", "disable_adapters", "delta_parameters", "trainable_summary",
    "save_adapter", "load_adapter", "save_checkpoint", "load_checkpoint", "PetCallback", "enable",
    "register_attention", "unregister_attention", "PrefixAttention", "save_merged_checkpoint", "loraplus_param_groups",
    "register_lora_kind", "unregister_lora_kind", "register_method", "unregister_method",
    "add_adapter", "set_adapter", "active_adapters", "delete_adapter", "list_adapters", "adapter_per_row",
    "add_weighted_adapter",
    "save_as_lora", "UncheckedVersionWarning", "PetTrainOneStepCell", "register_mindformers_train_step",
    "PetError", "PetConfigTypeError", "NoMatchError", "UnsupportedCellError", "PetStateError",
    "AdapterFileError", "AdapterNotFoundError", "OptimizerRebuildError",
]


def __getattr__(name: str) -> Any:
    """A public name (or a submodule, ``pet_hooks.surgery``) loaded on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))

