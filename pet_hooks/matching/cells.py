"""Which cells a config selects: ``target_modules`` / ``exclude_layers`` over ``cells_and_names()``.

A string ``target_modules`` is a regular expression that must ``re.fullmatch`` the full
dotted cell path (so MindFormers patterns such as ``.*wq|.*wk|.*wv`` mean the same here);
a list selects a path equal to an entry or ending in ``.entry``. ``exclude_layers`` holds
regexes; a cell is skipped when its path, or the path of one of its ancestors, fullmatches
one of them (so ``model\\.layers\\.0`` skips the whole first layer)::

    targets = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=is_linear)

Errors name the pattern (and a few cells it could have matched) or the matched cell and its type.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mindspore import nn

from ..errors import NoMatchError, PetConfigError, UnsupportedCellError
from .name_maps import NAME_MAPS, resolve_name_map

__all__ = ["select_cells", "named_cells", "nearest_names", "is_excluded", "list_entry_matches",
           "split_alternatives", "under_name_maps"]

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


def select_cells(net: nn.Cell, targets: Patterns, excludes: Patterns = None, *,
                 can_adapt: Callable[[nn.Cell], Optional[str]],
                 skip: Callable[[str, nn.Cell], bool] = lambda path, cell: False,
                 what: str = "target_modules") -> List[Tuple[str, nn.Cell]]:
    """Return ``[(path, cell)]`` selected by ``targets`` minus ``excludes``, in net order.

    Args:
        net: the root cell; paths are relative to it.
        targets: a regex string (fullmatch on the path) or a list of names.
        excludes: regexes of paths (or ancestors' paths) to skip.
        can_adapt: returns None when the method can adapt a cell, else the reason it cannot.
        skip: cells to pass over silently (for example pet_hooks' own sub-cells).
        what: the config field name used in error messages.

    Raises:
        NoMatchError: a pattern (or list entry) that selects nothing, naming it and listing
            a few adaptable names. PetConfigError: exclude_layers excludes everything selected.
        UnsupportedCellError: a selected cell the method cannot adapt, naming its path and type.
        (Both are PetConfigError, a ValueError.)
    """
    cells = [(p, c) for p, c in named_cells(net) if not skip(p, c)]
    adaptable = [p for p, c in cells if can_adapt(c) is None and not is_excluded(p, excludes)]

    if isinstance(targets, str):
        chosen = [(p, c) for p, c in cells if re.fullmatch(targets, p)]
        unmatched: Iterable[str] = [] if chosen else [targets]
    else:
        entries = list(targets or [])
        chosen = [(p, c) for p, c in cells if any(list_entry_matches(e, p) for e in entries)]
        unmatched = [e for e in entries if not any(list_entry_matches(e, p) for p, _ in cells)]
    for pattern in unmatched:
        raise NoMatchError(f"{what} pattern {pattern!r} matches no cell of {type(net).__name__}; "
                         f"{_hint(pattern, adaptable, isinstance(targets, str))}")

    selected = [(p, c) for p, c in chosen if not is_excluded(p, excludes)]
    if not selected:
        raise PetConfigError(f"{what} {targets!r} matched {len(chosen)} cell(s) but exclude_layers "
                         f"{list(excludes or [])!r} excludes all of them")
    for path, cell in selected:
        reason = can_adapt(cell)
        if reason is not None:
            raise UnsupportedCellError(f"{what} {targets!r} matches cell '{path}' of type {type(cell).__name__}, "
                             f"which this method cannot adapt: {reason}")
    return selected
