"""Adapters on disk: the native format, Hugging Face PEFT's, MindFormers' checkpoints, and loading them.

Owns ``adapter_io`` (save_adapter / load_adapter), ``loading`` (tensors into a net's adapter parameters,
checked first), ``peft_format`` and ``fused`` (PEFT's layout and names; fused mcore cells as several PEFT
modules), ``mindformers_io`` (MindFormers' LoRA checkpoints in, merged checkpoints out) and
``lora_conversion`` (save_as_lora).
May import: ``pet_hooks.multi``, ``pet_hooks.surgery``, ``pet_hooks.tuners``, ``pet_hooks.matching``,
``pet_hooks.config``, ``pet_hooks.utils``.
"""
