"""Which layer a cell is in: PEFT's ``layers_to_transform`` / ``layers_pattern`` rule over dotted cell paths.

PEFT 0.21.2 (``tuners_utils.check_target_module_exists``) finds a module's layer index in its path:
with ``layers_pattern`` (a name or a list of names, each a regex piece) it is the number that follows
the first ``<pattern>.<N>.`` in the path (the patterns tried in order); without it, the first number
that follows a named container, ``<container>.<N>.``, with at least one segment before the
container (Hugging Face models always start with ``model.``). pet_hooks uses the same rule and also
lets the container be the net's own child, so the blocks of every net pet_hooks ships and supports
are found without naming them::

    model.layers.3.attention.wq                   3   MindFormers' Llama (and Hugging Face's layers)
    blocks.1.attention.dense1                      1   the sample GPT (samples/tiny_gpt.py), blocks at the root
    model.decoder.layers.0.self_attention.linear_qkv   0   MindFormers' mcore GPT / Qwen3
    transformer.h.5.attn.c_attn                    5   GPT-2's h

The first number wins, so an expert index further down (``layers.1.mlp.experts.0``) is not taken
for the layer. A cell with no index (the embedding, the head) is in no layer: with
``layers_to_transform`` it is not adapted, as in PEFT.

    keep = layer_filter(paths, [0, 2], None, "TinyGPT")    # validates; keep(path) -> bool

Unlike PEFT, which then silently adapts nothing, an index the net does not have is an error naming
it and the indices there are, and a ``layers_pattern`` that matches no path is an error naming it.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import NoMatchError, PetConfigError

__all__ = ["layer_index", "layer_filter", "layer_indices", "GENERIC_RULE"]

#: PEFT's rule without ``layers_pattern`` (``.*?\.[^.]*\.(?P<idx>\d+)\.``), the container allowed at the root
GENERIC_RULE = re.compile(r"(?:.*?\.)?(?P<container>[^.]+)\.(?P<idx>\d+)\.")


def _pattern_rule(pattern: str) -> "re.Pattern[str]":
    """PEFT's rule for one ``layers_pattern`` entry: ``(?:^|.*?\\.)<pattern>\\.(?P<idx>\\d+)\\.``."""
    return re.compile(rf"(?:^|.*?\.)(?P<container>{pattern})\.(?P<idx>\d+)\.")


def _find(path: str, patterns: Optional[Sequence[str]]) -> Optional[Tuple[str, int]]:
    """(container, index) of ``path``, or None when it is in no layer."""
    rules = [_pattern_rule(p) for p in patterns] if patterns else [GENERIC_RULE]
    for rule in rules:
        # as PEFT, the index must be followed by a dot: the block itself ("model.layers.0") is in no layer,
        # the cells below it are
        found = rule.match(path)
        if found is not None:
            return found.group("container"), int(found.group("idx"))
    return None


def layer_index(path: str, patterns: Optional[Sequence[str]] = None) -> Optional[int]:
    """The layer index of the cell at ``path`` (None when it is in no layer), PEFT's rule (module docstring)."""
    found = _find(path, patterns)
    return None if found is None else found[1]


def layer_indices(paths: Iterable[str], patterns: Optional[Sequence[str]] = None) -> Dict[str, List[int]]:
    """Container (as found in the paths) -> the sorted layer indices under it, over ``paths``."""
    out: Dict[str, set] = {}
    for path in paths:
        found = _find(path, patterns)
        if found is not None:
            out.setdefault(found[0], set()).add(found[1])
    return {name: sorted(indices) for name, indices in out.items()}


def _describe(found: Dict[str, List[int]]) -> str:
    return "; ".join(f"{', '.join(map(str, indices))} under '{name}'" for name, indices in sorted(found.items()))


def layer_filter(paths: Sequence[str], layers_to_transform: Optional[Sequence[int]],
                 layers_pattern: Optional[Sequence[str]], net_name: str) -> Optional[Callable[[str], bool]]:
    """``keep(path)``: True for a cell in one of the layers ``layers_to_transform`` names; None when that is None.

    ``paths`` are every cell path of the net (what the indices that exist are read from).

    Raises:
        PetConfigError: a ``layers_pattern`` entry that matches no path (naming it and the numbered
            containers the net has); an index the net does not have (naming it and the indices there
            are). NoMatchError (a PetConfigError): no numbered layer at all.
    """
    if layers_to_transform is None:
        return None
    patterns = list(layers_pattern) if layers_pattern else None
    for pattern in patterns or []:
        if not layer_indices(paths, [pattern]):
            there = _describe(layer_indices(paths))
            raise PetConfigError(f"layers_pattern {pattern!r} matches no cell path of {net_name} (PEFT's rule: "
                                 f"'<pattern>.<index>.' in the path); "
                                 + (f"its numbered layers are {there}" if there else "it has no numbered layers"))
    found = layer_indices(paths, patterns)
    if not found:
        # NoMatchError: the selection matches nothing in this net (enable() then takes it for another model)
        raise NoMatchError(f"layers_to_transform {list(layers_to_transform)} needs numbered layers, but no cell "
                             f"path of {net_name} holds '<container>.<index>.' (like 'model.layers.0.'); "
                             f"set layers_pattern to the name of its layer container")
    there = sorted({index for indices in found.values() for index in indices})
    missing = [index for index in layers_to_transform if index not in there]
    if missing:
        raise PetConfigError(f"layers_to_transform: layer index {missing[0]} does not exist in {net_name}; "
                             f"its layer indices are {_describe(found)}")
    wanted = set(layers_to_transform)

    def keep(path: str) -> bool:
        index = layer_index(path, patterns)
        return index is not None and index in wanted
    return keep
