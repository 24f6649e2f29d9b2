"""Which cells a config selects: ``target_modules`` / ``exclude_layers`` over a net, and name maps.

Owns ``cells`` (pattern matching over ``cells_and_names()`` with errors that list the nearest real names;
re-exported here), ``layers`` (PEFT's ``layers_to_transform`` / ``layers_pattern``: a cell's layer index),
``all_linear`` (PEFT's ``"all-linear"``: the output head it leaves out) and ``name_maps`` (MindFormers' cell
names <-> Hugging Face's, per model family).
May import: ``pet_hooks.errors``, ``pet_hooks.utils``.
"""
from .cells import *  # noqa: F401,F403
from .cells import __all__  # noqa: F401
