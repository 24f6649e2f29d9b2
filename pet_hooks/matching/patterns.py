"""``rank_pattern`` / ``alpha_pattern`` keys against the cells a LoRA config selected.

PEFT 0.21.2 only warns about a key that selects no targeted module (and then uses the default
rank or alpha there, the silent no-match of PEFT issues #3582 and #3610). pet_hooks refuses it,
naming the key and the targeted paths nearest to it, before the net is changed::

    check_pattern_keys(cfg, [path for path, _ in targets])     # NoMatchError, or nothing
"""
from __future__ import annotations

import re
from typing import Sequence

from ..config.lora_patterns import PATTERN_FIELDS, key_regex
from ..errors import NoMatchError
from .cells import nearest_names

__all__ = ["check_pattern_keys"]


def check_pattern_keys(cfg, paths: Sequence[str]) -> None:
    """NoMatchError naming the first ``rank_pattern`` / ``alpha_pattern`` key of ``cfg`` that selects none of
    ``paths`` (the cells the config adapts), with the nearest of them."""
    for name in PATTERN_FIELDS:
        for key in getattr(cfg, name, None) or {}:
            if not any(re.match(key_regex(key), path) for path in paths):
                near = nearest_names(key, list(paths))
                raise NoMatchError(f"{name} key {key!r} selects none of the {len(paths)} cells LoRA adapts "
                                   f"(matched as PEFT does: the end of the dotted path, after a dot); "
                                   f"nearest adapted cells: {near}")
