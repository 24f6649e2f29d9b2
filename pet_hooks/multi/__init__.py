"""Several named adapters on one net: add / set / delete / list, weighted merges, mixed batches.

Owns ``adapters`` (PEFT's words as functions), ``slots`` (which adapter's values sit in a cell's LoRA
parameters, and switching them as data), ``rows`` (one adapter per batch row) and ``weighted`` (the
math of ``add_weighted_adapter``, checked against PEFT).
May import: ``pet_hooks.surgery``, ``pet_hooks.tuners``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
