"""Compile each repeated block once in graph mode: MindSpore's lazy inline on identically adapted blocks.

A decoder of N blocks compiles N copies of the block's graph on the CPU, and each copy's kernels
keep their own memory for the life of the process (docs/memory_and_speed.md). MindSpore can
parse one block and reuse its graph for the others (``mindspore.lazy_inline``): cells whose
``cell_init_args`` string is the same share one parsed graph, and ``no_inline = False``
(``lazy_inline(policy="front")``, the only policy that compiles on the CPU here) makes the reuse
happen in the front end. MindFormers turns its own lazy inline off in a single process, and its
``__init__`` arguments differ by ``layer_id``, so nothing is reused in a stand-alone run.

Reuse is only correct between blocks the compiled graph cannot tell apart: same classes in the
same places, same parameter shapes, dtypes and ``requires_grad``, and the same constants, because
graph mode bakes every non-parameter attribute a ``construct`` (or a method of the block's
classes) reads into the graph. :func:`mark_repeated_blocks` groups the sibling blocks of every
``CellList`` / ``SequentialCell`` by such a fingerprint and marks each group of two or more with
one marker; anything it cannot prove equal (an attribute of an unknown type, source it cannot
read) keeps the block out. The marks are pet_hooks' own change to the net, so ``remove`` takes
them away (:func:`unmark`), and every structural change of pet_hooks marks again.

Nets that already use MindSpore's lazy inline (a ``cell_init_args`` set by someone else) are
left alone.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import logging
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.ops.primitive import Primitive

__all__ = ["ReuseMark", "MARK_PREFIX", "mark_repeated_blocks", "unmark", "block_fingerprint"]

logger = logging.getLogger("pet_hooks")

#: start of the ``cell_init_args`` pet_hooks writes (``lazy_inline_<Class>_pet_hooks_<fingerprint>``)
MARK_PREFIX = "lazy_inline_"
_OURS = "pet_hooks"
_MISSING = object()


@dataclass
class ReuseMark:
    """One block pet_hooks marked, with what it held before (for :func:`unmark`)."""

    cell: nn.Cell
    init_args_before: Any     # _MISSING when the cell had no cell_init_args
    no_inline_before: Any     # _MISSING when the cell had no no_inline attribute


# ----------------------------------------------------------------------------- what a block's graph reads
@functools.lru_cache(maxsize=None)
def _attributes_read_by(cls: type) -> Optional[Tuple[str, ...]]:
    """Names ``X`` of every ``self.X`` in the methods (not ``__init__``) of ``cls`` and its bases up to
    ``nn.Cell``; None when some source cannot be read (then nothing about it can be proved)."""
    names: Set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Cell, object) or klass.__module__.startswith("mindspore.nn.cell"):
            continue
        for attr, member in vars(klass).items():
            if attr == "__init__" or not inspect.isfunction(member):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(member)))
            except (OSError, TypeError, SyntaxError):
                return None
            names.update(node.attr for node in ast.walk(tree)
                         if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                         and node.value.id == "self")
    return tuple(sorted(names))


def _constant_key(value: Any) -> Optional[Any]:
    """What identifies ``value`` for the compiled graph; None for a cell or parameter (the structure
    covers those). Objects of unknown kind are identified by identity: shared is fine, copies are not."""
    if isinstance(value, (nn.Cell, Parameter)):
        return None
    if isinstance(value, Primitive):
        attrs = {k: v for k, v in value.attrs.items() if k != "instance_name"}
        return ("primitive", type(value).__name__, repr(sorted(attrs.items(), key=lambda kv: kv[0])))
    if isinstance(value, Tensor):
        data = value.asnumpy()
        return ("tensor", data.shape, str(data.dtype), hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest())
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return ("value", type(value).__name__, repr(value))
    if isinstance(value, (tuple, list)):
        keys = [_constant_key(item) for item in value]
        return (type(value).__name__, tuple(keys))
    if inspect.ismethod(value):
        return ("method", value.__func__.__qualname__)
    return ("object", id(value))


def block_fingerprint(block: nn.Cell) -> Optional[str]:
    """A hash of everything the compiled graph of ``block`` depends on besides parameter values;
    None when some part of it cannot be read."""
    parts: List[Any] = []
    for path, cell in block.cells_and_names():
        read = _attributes_read_by(type(cell))
        if read is None:
            return None
        parts.append(("cell", path, type(cell).__module__, type(cell).__qualname__))
        for param in cell.get_parameters(expand=False):
            leaf = param.name.rsplit(".", 1)[-1]    # full names differ by the block's index
            parts.append(("param", path, leaf, tuple(param.shape), str(param.dtype), param.requires_grad))
        for attr in read:
            value = getattr(cell, attr, _MISSING)
            if value is _MISSING:
                continue
            key = _constant_key(value)
            if key is not None:
                parts.append(("const", path, attr, key))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- marking
def _foreign_lazy_inline(net: nn.Cell) -> Optional[str]:
    """The path of a cell that uses MindSpore's own lazy inline, if any."""
    for path, cell in net.cells_and_names():
        args = cell.__dict__.get("_cell_init_args")
        # cell_attr_register (nn.Dense, nn.LayerNorm, ...) writes cell_init_args too, without this prefix
        if isinstance(args, str) and args.startswith(MARK_PREFIX) and f"_{_OURS}_" not in args:
            return path or type(cell).__name__
    return None


def _groups(net: nn.Cell) -> List[Tuple[str, List[nn.Cell]]]:
    """(marker, blocks) for the sibling blocks of one class and one fingerprint, two or more, in every
    CellList / SequentialCell."""
    groups: List[Tuple[str, List[nn.Cell]]] = []
    for _, container in net.cells_and_names():
        if not isinstance(container, (nn.CellList, nn.SequentialCell)):
            continue
        by_key: Dict[Tuple[type, str], List[nn.Cell]] = {}
        for child in container:
            fingerprint = block_fingerprint(child)
            if fingerprint is not None:
                by_key.setdefault((type(child), fingerprint), []).append(child)
        groups.extend((f"{MARK_PREFIX}{cls.__name__}_{_OURS}_{fingerprint}", members)
                      for (cls, fingerprint), members in by_key.items() if len(members) > 1)
    return groups


def mark_repeated_blocks(net: nn.Cell) -> List[ReuseMark]:
    """Mark every group of identical sibling blocks of ``net`` for one shared compiled graph.

    Returns the marks (pass them to :func:`unmark`); none when ``net`` already uses MindSpore's
    own lazy inline.
    """
    foreign = _foreign_lazy_inline(net)
    if foreign is not None:
        logger.info("pet_hooks: %s already uses MindSpore's lazy inline; blocks are not marked for reuse", foreign)
        return []
    marks: List[ReuseMark] = []
    for marker, members in _groups(net):
        for block in members:
            marks.append(ReuseMark(block, block.__dict__.get("_cell_init_args", _MISSING),
                                   block.__dict__.get("no_inline", _MISSING)))
            block.cell_init_args = marker
            block.no_inline = False        # lazy_inline(policy="front"): reuse in the front end, then inline
    if marks:
        logger.info("pet_hooks: %d blocks in %d group(s) share one compiled graph per group",
                    len(marks), len({m.cell.cell_init_args for m in marks}))
    return marks


def _restore(cell: nn.Cell, name: str, before: Any) -> None:
    if before is _MISSING:
        cell.__dict__.pop(name, None)
    else:
        object.__setattr__(cell, name, before)


def unmark(marks: List[ReuseMark]) -> None:
    """Put back what each marked block held before (no marker at all, as a rule)."""
    for mark in reversed(marks):
        _restore(mark.cell, "_cell_init_args", mark.init_args_before)
        _restore(mark.cell, "no_inline", mark.no_inline_before)
