"""LoRA: the tuner, one kind per kind of base cell, the dispatcher that picks it, and the DoRA variant.

``tuner`` (LoraTuner: select, inject, eject, merge; the same flow for every cell), ``kind`` (the
``LoraKind`` contract: what differs per kind of cell; the ``LoraLayer`` branch mixin; the
``LoraVariant`` base), ``dispatch`` (the list of kinds, asked in turn: the one place a cell's type is
asked; ``register_lora_kind``), the kinds: ``linear`` (``nn.Dense``, MindFormers' ``Linear``), ``mha``
(``MultiheadAttention``), ``mcore`` (MindFormers' Column / Row / SequenceParallel / NoTP projections),
``experts`` (grouped MoE experts), ``embedding`` (PEFT's embedding LoRA); ``dora`` (DoRA, a variant),
``inits`` (init_lora_weights: gaussian, PiSSA, OLoRA), ``scale`` (the on/off switch ``pet_lora_scale``),
``layout`` (the branches' tensor-parallel strategies). A kind of your own::

    from pet_hooks.tuners.lora import LoraKind, LoraLayer
    pet_hooks.register_lora_kind(MyProjKind())          # docs/methods.md

May import: ``pet_hooks.tuners`` (base, common), ``pet_hooks.matching``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
from .dispatch import register_lora_kind, unregister_lora_kind
from .kind import Drawn, LoraKind, LoraLayer, LoraVariant

__all__ = ["LoraKind", "LoraLayer", "LoraVariant", "Drawn", "register_lora_kind", "unregister_lora_kind"]
