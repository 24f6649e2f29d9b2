"""The errors pet_hooks raises, as types: catch these, never match on message text.

    try:
        pet_hooks.apply(net, cfg)
    except pet_hooks.NoMatchError:          # a target_modules pattern selects no cell of this net
        ...

Every class keeps the built-in base that pet_hooks raised before it had types (``ValueError``,
``TypeError``, ``FileNotFoundError``), so ``except ValueError`` goes on working::

    PetError
    +-- PetConfigError (ValueError)          a config value, key or file pet_hooks cannot use
    |   +-- PetConfigTypeError (TypeError)   ... a value of the wrong type
    |   +-- NoMatchError                     a target_modules pattern matches no cell
    |   +-- UnsupportedCellError             a selected cell the method cannot adapt
    +-- PetStateError (ValueError)           the net has no PET, or other PET, for this operation
    +-- AdapterFileError (ValueError)        an adapter or checkpoint that cannot be read or does not fit
    +-- AdapterNotFoundError (FileNotFoundError)
    +-- OptimizerRebuildError (ValueError)   the optimizer cannot be rebuilt over the deltas

This module imports nothing: every other module (and the command line) may use it.
"""
from __future__ import annotations

__all__ = ["PetError", "PetConfigError", "PetConfigTypeError", "NoMatchError", "UnsupportedCellError",
           "PetStateError", "AdapterFileError", "AdapterNotFoundError", "OptimizerRebuildError"]


class PetError(Exception):
    """Base of every error pet_hooks raises on purpose."""


class PetConfigError(PetError, ValueError):
    """A configuration value, key or file that pet_hooks cannot use."""


class PetConfigTypeError(PetConfigError, TypeError):
    """A configuration value of the wrong type (catchable as TypeError or ValueError)."""


class NoMatchError(PetConfigError):
    """A ``target_modules`` pattern (or list entry) that matches no cell of the net."""


class UnsupportedCellError(PetConfigError):
    """A cell selected by the config whose type the method cannot adapt."""


class PetStateError(PetError, ValueError):
    """The net carries no PET (or a different PET) for the operation asked for."""


class AdapterFileError(PetError, ValueError):
    """An adapter or checkpoint file that cannot be read, or whose tensors do not fit the net."""


class AdapterNotFoundError(PetError, FileNotFoundError):
    """An adapter directory or file that does not exist."""


class OptimizerRebuildError(PetError, ValueError):
    """An optimizer that cannot be rebuilt over the PET parameters."""
