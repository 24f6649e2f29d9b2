"""LoRA: the tuner and everything it adapts, one module per concern.

``tuner`` (LoraTuner: select, inject, eject, merge; the generated Dense / Linear classes), ``scale`` (the
on/off switch ``pet_lora_scale``), ``dora`` (DoRA), ``inits`` (init_lora_weights: gaussian, PiSSA, OLoRA),
``mha`` (MultiheadAttention), ``mcore`` (MindFormers' ColumnParallelLinear / RowParallelLinear), ``layout``
(their tensor-parallel strategies), ``experts`` (grouped MoE experts), ``embedding`` (PEFT's embedding LoRA).
May import: ``pet_hooks.tuners`` (base, common), ``pet_hooks.matching``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
