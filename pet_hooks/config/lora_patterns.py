"""LoRA's per-module rank and alpha (PEFT's ``rank_pattern`` / ``alpha_pattern``): checking and matching.

    rank_pattern:  {".*wq": 4, "model.layers.0.attention.wv": 16}     # regex -> rank
    alpha_pattern: {".*wq": 8}                                        # regex -> lora_alpha

A key is matched as PEFT 0.21.2 matches it (``peft.utils.other.get_pattern_key``): the key selects
the cell at ``path`` when ``re.match(rf"(.*\\.)?({key})$", path)`` succeeds, so a bare name
(``"wq"``) selects every cell whose path ends in ``.wq`` and a full path selects that cell. When
several keys select a cell the first one, in the mapping's order, wins. A key that selects no
adapted cell is an error (``pet_hooks.matching.patterns``), where PEFT only warns.

This module sits in the config layer (it imports nothing above it): ``LoraConfig.for_module``
and every reader of a per-cell rank or scaling use :func:`pattern_key`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

from ..errors import PetConfigError, PetConfigTypeError

__all__ = ["PATTERN_FIELDS", "pattern_key", "key_regex", "check_pattern"]

#: the two fields, with the config field each one overrides per cell
PATTERN_FIELDS = {"rank_pattern": "lora_rank", "alpha_pattern": "lora_alpha"}


def key_regex(key: str) -> str:
    """PEFT's regex for a pattern key: the key at the end of the path, after a dot or from its start."""
    return rf"(.*\.)?({key})$"


def pattern_key(keys: Iterable[str], path: str) -> Optional[str]:
    """The first of ``keys`` that selects ``path`` (PEFT's ``get_pattern_key``), or None."""
    for key in keys:
        if re.match(key_regex(key), path):
            return key
    return None


def check_pattern(name: str, value: Any) -> dict:
    """``rank_pattern`` / ``alpha_pattern`` checked: None -> {}; a mapping of regex keys to a rank (an int
    >= 1) or an alpha (a finite number > 0). A copy, in the given order (which decides ties)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PetConfigTypeError(f"{name} must be a mapping of regex -> "
                                 f"{'rank' if name == 'rank_pattern' else 'alpha'}, got {value!r}")
    out = {}
    for key, number in value.items():
        if not isinstance(key, str):
            raise PetConfigTypeError(f"{name} keys must be regex strings, got {key!r} ({type(key).__name__})")
        if not key.strip():
            raise PetConfigError(f"{name} contains an empty key")
        try:
            re.compile(key_regex(key))
        except re.error as err:
            raise PetConfigError(f"{name}: invalid regular expression {key!r}: {err}") from None
        if name == "rank_pattern":
            if isinstance(number, bool) or not isinstance(number, int):
                raise PetConfigTypeError(f"{name}[{key!r}] must be an integer rank, got {number!r} "
                                         f"({type(number).__name__})")
            if number < 1:
                raise PetConfigError(f"{name}[{key!r}] must be >= 1, got {number!r}")
        else:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise PetConfigTypeError(f"{name}[{key!r}] must be a number, got {number!r} "
                                         f"({type(number).__name__})")
            if not math.isfinite(number) or number <= 0:
                raise PetConfigError(f"{name}[{key!r}] must be a finite number > 0, got {number!r}")
        out[key] = number
    return out
