"""The prefix methods (P-Tuning v2, Prefix-Tuning): the tuner and how each attention cell takes prefixes.

``tuner`` (the shared prefix encoder, inject / eject) and ``attention`` (the known attention cells,
``register_attention`` for one of your own).
May import: ``pet_hooks.tuners`` (base, common), ``pet_hooks.matching``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
