"""Configuration: the config dataclasses, their validation, ``load_config``, and the run-YAML rules.

Owns ``pet_config`` (every method's dataclass, ``load_config``, ``config_from_dict``; re-exported here),
``methods`` (the one method registry: ``register_method`` ties a ``pet_type`` to its config class and its
tuner, named by import path so that this layer imports none),
``strategy_ckpt`` (the strategy-checkpoint rule a run YAML is checked against and ``apply`` enforces) and
``default_targets`` (default target_modules per model family, for ``pet_method``). Importing the package
does not import MindSpore (``pet-hooks check-config`` stays cheap).
May import: ``pet_hooks.errors``, ``pet_hooks.utils``.
"""
from .pet_config import *  # noqa: F401,F403  (the package's face: load_config, LoraConfig, ...)
from .pet_config import __all__  # noqa: F401
