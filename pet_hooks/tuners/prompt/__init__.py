"""Prompt tuning: the tuner and how each model takes the virtual tokens.

``tuner`` (the prompt, its init, inject / eject, PEFT's PROMPT_TUNING layout) and ``models`` (the known models'
prompt adapters, ``register_prompt_model`` for one of your own).
May import: ``pet_hooks.tuners`` (base, common, file_layouts), ``pet_hooks.matching``, ``pet_hooks.config``.
"""
