"""Which cells a config selects: ``target_modules`` / ``exclude_layers`` over ``cells_and_names()``.

A string ``target_modules`` is a regular expression that must ``re.fullmatch`` the full
dotted cell path (so MindFormers patterns such as ``.*wq|.*wk|.*wv`` mean the same here);
a list selects a path equal to an entry or ending in ``.entry``. ``exclude_layers`` holds
regexes; a cell is skipped when its path, or the path of one of its ancestors, fullmatches
one of them (so ``model\\.layers\\.0`` skips the whole first layer)::

    targets = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=is_linear)

PEFT's selection options (LoRA, IA3) join in as keywords: ``target_modules: "all-linear"`` (every
cell ``is_linear`` accepts but the output head, ``matching/all_linear.py``); ``exclude_modules``, PEFT's
rule exactly (a string is a regex fullmatched on the cell's own path; a list names a path or its last
parts), which adds to ``exclude_layers`` (a cell either excludes is skipped); and
``layers_to_transform`` / ``layers_pattern`` (only the cells in those numbered layers,
``matching/layers.py``), applied to a regex ``target_modules`` too (PEFT allows them with a list only).

Errors name the pattern (and a few cells it could have matched) or the matched cell and its type.
"""
from __future__ import annotations

import difflib
import logging
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mindspore import nn

from ..errors import NoMatchError, PetConfigError, UnsupportedCellError
from .all_linear import is_all_linear, output_heads
from .layers import layer_filter
from .name_maps import NAME_MAPS, resolve_name_map

__all__ = ["select_cells", "named_cells", "nearest_names", "is_excluded", "list_entry_matches",
           "split_alternatives", "under_name_maps", "module_excluded"]

logger = logging.getLogger("pet_hooks")

Patterns = Union[str, Sequence[str], None]


def named_cells(net: nn.Cell) -> List[Tuple[str, nn.Cell]]:
    """Every sub-cell with its dotted path (the root, whose path is '', left out)."""
    return [(name, cell) for name, cell in net.cells_and_names() if name]


def list_entry_matches(entry: str, path: str) -> bool:
    """A list entry of target_modules names a cell by its path or by its path's last parts."""
    return path == entry or path.endswith("." + entry)


def is_excluded(path: str, excludes: Optional[Sequence[str]]) -> bool:
    if not excludes:
        return False
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(pattern, prefix) for pattern in excludes for prefix in prefixes)


def module_excluded(path: str, exclude_modules: Patterns) -> bool:
    """PEFT's ``exclude_modules`` rule (``check_target_module_exists``): a string is a regex fullmatched on the
    path; a list excludes a path equal to an entry or ending in ``.entry``. Ancestors do not count (unlike
    ``exclude_layers``)."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, path) is not None
    return any(list_entry_matches(entry, path) for entry in exclude_modules)


def nearest_names(pattern: str, candidates: List[str], limit: int = 4) -> List[str]:
    """The ``limit`` candidate paths closest to ``pattern`` (its ``.*`` and escapes ignored)."""
    text = pattern.replace(".*", "").replace("\\", "")
    return difflib.get_close_matches(text, candidates, n=limit, cutoff=0.0)


def split_alternatives(pattern: str) -> List[str]:
    """The top-level ``|`` alternatives of a regex (bars inside groups, classes or escapes stay)."""
    parts, depth, in_class, escaped, start = [], 0, False, False, 0
    for index, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:index])
            start = index + 1
    parts.append(pattern[start:])
    return parts


def under_name_maps(hit: Callable[[str], bool], adaptable: List[str]) -> Dict[str, List[str]]:
    """name map -> the cells a pattern would select if it is written in that map's names
    (``.*q_proj`` on a MindFormers Llama: the ``wq`` cells, under ``llama``)."""
    found = {}
    for name in sorted(NAME_MAPS):
        _, to_other = resolve_name_map(name)
        paths = [path for path in adaptable if isinstance(to_other(path), str) and hit(to_other(path))]
        if paths:
            found[name] = paths
    return found


def _name_map_hint(pattern: str, adaptable: List[str], regex: bool) -> str:
    """'; .*q_proj is written in the names of name map 'llama' ...' when a known map explains it."""
    notes = []
    for alternative in split_alternatives(pattern) if regex else [pattern]:
        hit = ((lambda path: re.fullmatch(alternative, path) is not None) if regex
               else (lambda path: list_entry_matches(alternative, path)))
        for name, paths in under_name_maps(hit, adaptable).items():
            ours = sorted({path.rsplit(".", 1)[-1] for path in paths})
            notes.append(f"{alternative!r} is written in the names of name map {name!r}: here it would be the "
                         f"{len(paths)} cell(s) named {', '.join(ours)} (e.g. {paths[0]})")
    return "".join(f"; {note}" for note in notes)


def _hint(pattern: str, candidates: List[str], regex: bool, limit: int = 4) -> str:
    """The adaptable cells' distinct last names, and a few full paths, the closest first; and the
    cells the pattern means when it is written in another framework's names (Hugging Face's)."""
    if not candidates:
        return "the net has no cell this method can adapt"
    leaves = sorted({path.rsplit(".", 1)[-1] for path in candidates})
    close = nearest_names(pattern, candidates, limit)
    return (f"adaptable cells end in {', '.join(leaves)}; for example {', '.join(close or candidates[:limit])}"
            f" ({len(candidates)} in all){_name_map_hint(pattern, candidates, regex)}")


def _check_exclude_modules(net: nn.Cell, exclude_modules: Patterns, paths: List[str]) -> None:
    """Each ``exclude_modules`` entry (or the regex) must name some cell of the net: a typo is an error here,
    where PEFT only warns when nothing was excluded."""
    if not exclude_modules:
        return
    entries = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
    for entry in entries:
        rule = [entry] if not isinstance(exclude_modules, str) else entry
        if not any(module_excluded(path, rule) for path in paths):
            close = nearest_names(entry, paths, 4)
            raise NoMatchError(f"exclude_modules {entry!r} matches no cell of {type(net).__name__} "
                               f"(the nearest cell paths: {', '.join(close)})"
                               f"{_name_map_hint(entry, paths, isinstance(exclude_modules, str))}")


def _all_linear(net: nn.Cell, cells: List[Tuple[str, nn.Cell]], is_linear: Optional[Callable[[nn.Cell], bool]],
                can_adapt: Callable[[nn.Cell], Optional[str]], what: str) -> List[Tuple[str, nn.Cell]]:
    """PEFT's ``"all-linear"``: the linear cells but the output head; those the method cannot adapt (``can_adapt``
    here: the cell itself, not what the config asks of it) are left out with a warning naming them (an error
    would make the shorthand unusable on a net with one such cell)."""
    if is_linear is None:
        raise PetConfigError(f"{what} 'all-linear' is not supported by this method; give a regex or a list of names")
    heads = output_heads(net, cells, is_linear)
    linear = [(p, c) for p, c in cells if is_linear(c) and p not in heads]
    refused = [(p, c, can_adapt(c)) for p, c in linear if can_adapt(c) is not None]
    chosen = [(p, c) for p, c in linear if can_adapt(c) is None]
    if refused:
        logger.warning("pet_hooks: %s 'all-linear' leaves out %d linear cell(s) the method cannot adapt: %s",
                       what, len(refused), "; ".join(f"'{p}' ({type(c).__name__}): {why}" for p, c, why in refused[:3]))
    if heads:
        logger.info("pet_hooks: %s 'all-linear' leaves out the output head: %s", what,
                    ", ".join(f"'{p}' ({why})" for p, why in heads.items()))
    if not chosen:
        raise NoMatchError(f"{what} 'all-linear' finds no linear cell this method can adapt in {type(net).__name__}"
                           + (f" (output head(s) left out: {', '.join(heads)})" if heads else ""))
    return chosen


def select_cells(net: nn.Cell, targets: Patterns, excludes: Patterns = None, *,
                 can_adapt: Callable[[nn.Cell], Optional[str]],
                 skip: Callable[[str, nn.Cell], bool] = lambda path, cell: False,
                 what: str = "target_modules", exclude_modules: Patterns = None,
                 layers_to_transform: Optional[Sequence[int]] = None, layers_pattern: Optional[Sequence[str]] = None,
                 is_linear: Optional[Callable[[nn.Cell], bool]] = None,
                 linear_refusal: Optional[Callable[[nn.Cell], Optional[str]]] = None) -> List[Tuple[str, nn.Cell]]:
    """Return ``[(path, cell)]`` selected by ``targets`` minus ``excludes``, in net order.

    Args:
        net: the root cell; paths are relative to it.
        targets: a regex string (fullmatch on the path), a list of names, or ``"all-linear"``.
        excludes: regexes of paths (or ancestors' paths) to skip (``exclude_layers``).
        can_adapt: returns None when the method can adapt a cell, else the reason it cannot.
        skip: cells to pass over silently (for example pet_hooks' own sub-cells).
        what: the config field name used in error messages.
        exclude_modules: PEFT's exclusions (:func:`module_excluded`), skipped as ``excludes`` are.
        layers_to_transform / layers_pattern: keep only the cells in these layers (``matching/layers.py``).
        is_linear: which cells ``"all-linear"`` means (None: the method has no such shorthand).
        linear_refusal: why a linear cell itself cannot be adapted (``"all-linear"`` leaves it out with a
            warning); by default ``can_adapt``. What the config asks of a cell it cannot give (DoRA on a kind
            without it) stays an error: pass the cell-only check here.

    Raises:
        NoMatchError: a pattern (or list entry, or exclude_modules entry) that selects nothing, naming it and
            listing a few adaptable names; a selection none of whose cells is in ``layers_to_transform``.
            PetConfigError: the exclusions leave nothing; a layer index or layers_pattern the net does
            not have.
        UnsupportedCellError: a selected cell the method cannot adapt, naming its path and type.
        (Both are PetConfigError, a ValueError.)
    """
    every = named_cells(net)
    cells = [(p, c) for p, c in every if not skip(p, c)]

    def out(path: str) -> bool:
        return is_excluded(path, excludes) or module_excluded(path, exclude_modules)
    adaptable = [p for p, c in cells if can_adapt(c) is None and not out(p)]
    _check_exclude_modules(net, exclude_modules, [p for p, _ in every])

    if is_all_linear(targets):
        chosen = _all_linear(net, cells, is_linear, linear_refusal or can_adapt, what)
    elif isinstance(targets, str):
        chosen = [(p, c) for p, c in cells if re.fullmatch(targets, p)]
        unmatched: Iterable[str] = [] if chosen else [targets]
    else:
        entries = list(targets or [])
        chosen = [(p, c) for p, c in cells if any(list_entry_matches(e, p) for e in entries)]
        unmatched = [e for e in entries if not any(list_entry_matches(e, p) for p, _ in cells)]
    for pattern in [] if is_all_linear(targets) else unmatched:
        raise NoMatchError(f"{what} pattern {pattern!r} matches no cell of {type(net).__name__}; "
                         f"{_hint(pattern, adaptable, isinstance(targets, str))}")

    selected = [(p, c) for p, c in chosen if not out(p)]
    if not selected:
        by = " and ".join(f"{name} {value!r}" for name, value in (("exclude_layers", list(excludes or [])),
                                                                 ("exclude_modules", exclude_modules)) if value)
        raise PetConfigError(f"{what} {targets!r} matched {len(chosen)} cell(s) but {by} excludes all of them")
    keep = layer_filter([p for p, _ in every], layers_to_transform, layers_pattern, type(net).__name__)
    if keep is not None:
        in_layers = [(p, c) for p, c in selected if keep(p)]
        if not in_layers:
            raise NoMatchError(f"{what} {targets!r} selects {len(selected)} cell(s) (e.g. '{selected[0][0]}') but "
                                 f"none of them is in layers_to_transform {list(layers_to_transform)}"
                                 + (f" (layers_pattern {list(layers_pattern)})" if layers_pattern else ""))
        selected = in_layers
    for path, cell in selected:
        reason = can_adapt(cell)
        if reason is not None:
            raise UnsupportedCellError(f"{what} {targets!r} matches cell '{path}' of type {type(cell).__name__}, "
                             f"which this method cannot adapt: {reason}")
    return selected
