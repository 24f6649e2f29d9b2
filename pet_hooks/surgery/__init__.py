"""The net changes: apply / remove / merge / unmerge / disable and the undo record, freezing, graph reuse.

Owns ``core`` (the PetState record and every operation on it; re-exported here), ``freeze`` (freezing and
the flags to restore), ``graph_reuse`` (repeated blocks marked to share one compiled graph) and
``foreign_pet`` (models MindFormers' own PET already adapted).
May import: ``pet_hooks.tuners``, ``pet_hooks.matching``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
