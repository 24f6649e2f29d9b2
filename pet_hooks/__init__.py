"""pet_hooks: parameter-efficient tuning (LoRA, P-Tuning v2, Prefix-Tuning) for unmodified MindSpore nets.

    import pet_hooks
    cfg = pet_hooks.load_config("pet.yaml")
    pet_hooks.apply(net, cfg)
    print(pet_hooks.trainable_summary(net))
    ... train ...
    pet_hooks.save_adapter(net, "adapter/")
"""
from ._version import __version__
from .adapter_io import load_adapter, save_adapter
from .config import LoraConfig, PetConfig, PetConfigError, PrefixTuningConfig, PTuning2Config, load_config
from .surgery import (apply, delta_parameters, disable_adapters, merge, remove, trainable_summary,
                      unmerge)
from .flow import install_optimizer_recorder as _install_optimizer_recorder
from ._ms_compat import UncheckedVersionWarning
from .mindformers_io import save_merged_checkpoint
from .hooks.callback import PetCallback
from .hooks.context import enable
from .tuners.attention import PrefixAttention, register_attention, unregister_attention

# Optimizers do not keep their constructor arguments; record them from now on so that the
# front doors can rebuild "the same optimizer over the deltas" (see flow.py).
_install_optimizer_recorder()

__all__ = [
    "__version__",
    "PetConfig", "LoraConfig", "PTuning2Config", "PrefixTuningConfig", "PetConfigError", "load_config",
    "apply", "remove", "merge", "unmerge", "disable_adapters", "delta_parameters", "trainable_summary",
    "save_adapter", "load_adapter", "PetCallback", "enable",
    "register_attention", "unregister_attention", "PrefixAttention", "save_merged_checkpoint",
    "UncheckedVersionWarning",
]
