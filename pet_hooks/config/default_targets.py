"""Default targets per model family, as PEFT keeps them per architecture, for a method named without them.

``Trainer(model=llama, pet_method="lora")`` names a method and no target: PEFT answers such a
call from its tables (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``q_proj``/``v_proj``
for Llama), and so does pet_hooks, in MindFormers' cell names::

    family_of(net)                         # 'llama', 'gpt2', 'mcore' or None
    config_for_method(net, "lora")         # LoraConfig(target_modules='.*wq|.*wk|.*wv|.*wo', ...)

MindFormers' own models keep their family in ``config.model_type``; the mcore training models
(Qwen3, Qwen3-MoE, DeepSeek-V3, ...) share one layer set (``linear_qkv``, ``linear_proj``) whatever
their type. A method that needs targets, on a model of no known family, is one error naming the
model class and asking for ``target_modules``.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from mindspore import nn

from .pet_config import PetConfig, config_from_dict, config_types, model_hints
from ..errors import PetConfigError, PetConfigTypeError

__all__ = ["DEFAULT_TARGETS", "family_of", "config_for_method"]

#: family -> pet_type -> the fields that complete a config of that type (MindFormers' cell names)
DEFAULT_TARGETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # LlamaForCausalLM (legacy): attention wq/wk/wv/wo; feed-forward w1 (gate), w3 (up), w2 (down)
    "llama": {
        "lora": {"target_modules": ".*wq|.*wk|.*wv|.*wo"},
        # PEFT's IA3 for Llama: k_proj, v_proj, down_proj (its input scaled)
        "ia3": {"target_modules": ".*wk|.*wv|.*w2", "feedforward_modules": ".*w2"},
    },
    # MindFormers' GPT-2 (and the sample GPT, which names its layers alike): attention dense1/2/3
    "gpt2": {
        "lora": {"target_modules": ".*dense1|.*dense2|.*dense3"},
    },
    # the mcore training models: the fused query/key/value projection and the attention output
    "mcore": {
        "lora": {"target_modules": ".*linear_qkv|.*linear_proj"},
    },
}
# Class-name stems for models that carry no MindFormers config (the sample GPT).
_CLASS_STEMS = (("llama", "llama"), ("gpt", "gpt2"))


def _is_mcore(net: nn.Cell) -> bool:
    # Only look if MindFormers is imported: a net cannot be one of its models otherwise.
    module = sys.modules.get("mindformers.parallel_core.utils.model_mixin")
    mixin = getattr(module, "TrainModelMixin", None)
    return mixin is not None and isinstance(net, mixin)


def family_of(net: nn.Cell) -> Optional[str]:
    """The model family whose default targets apply to ``net``, or None."""
    if _is_mcore(net):
        return "mcore"
    model_type = getattr(getattr(net, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type.lower() in DEFAULT_TARGETS:
        return model_type.lower()
    name = type(net).__name__.lower()
    return next((family for stem, family in _CLASS_STEMS if stem in name), None)


def config_for_method(net: nn.Cell, pet_type: str) -> PetConfig:
    """A config of ``pet_type`` for ``net``: that method's defaults, with the family's targets where the
    method needs targets. Raises PetConfigError naming the model class when it needs targets and the
    family has none."""
    block: Dict[str, Any] = {"pet_type": pet_type}
    hints = model_hints(getattr(net, "config", None))
    family = family_of(net)
    defaults = DEFAULT_TARGETS.get(family or "", {}).get(pet_type.lower()) if isinstance(pet_type, str) else None
    if defaults is not None:
        return config_from_dict({**block, **defaults}, hints)
    try:
        return config_from_dict(block, hints)
    except PetConfigTypeError:
        raise
    except PetConfigError as err:
        if not isinstance(pet_type, str) or pet_type.lower() not in config_types():
            raise
        known = "; ".join(f"{fam}: {', '.join(sorted(types))}" for fam, types in sorted(DEFAULT_TARGETS.items()))
        raise PetConfigError(
            f"pet_method {pet_type!r} on {type(net).__name__} (model family {family!r}) needs settings pet_hooks has "
            f"no defaults for ({err}); default targets exist for {known}. Give a pet_config with target_modules "
            f"(in the model's config, or to pet_hooks.enable())") from None
