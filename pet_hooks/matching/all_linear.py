"""PEFT's ``target_modules: "all-linear"``: every linear cell of the net except its output head.

PEFT (``tuners_utils._maybe_include_all_linear_layers``) takes every ``nn.Linear`` / ``Conv1D`` and, for a
``PreTrainedModel``, leaves out the module ``get_output_embeddings()`` returns (the LM head). Which cells are
"linear" is the method's to say (LoRA: the kinds ``is_linear`` marks, ``nn.Dense``, MindFormers' ``Linear`` and
the mcore Column / Row parallel layers; not embeddings, attention cells or grouped experts), so the tuner
passes ``is_linear``. MindSpore nets have no ``get_output_embeddings`` as a rule, so the head is found as:

1. the cell a ``get_output_embeddings()`` of the net (or of a cell holding the net's model) returns, when it has one;
2. a linear cell named like a head (``lm_head``: MindFormers' Llama and Hugging Face's names; ``output_layer``:
   MindFormers' mcore GPT; ``head``: the sample GPT) that is in no numbered layer;
3. a linear cell whose weight is another cell's parameter too (a head tied to the embedding,
   ``tie_word_embeddings``), whatever its name.

    heads = output_heads(net, cells, is_linear)     # path -> why it counts as the output head
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

from mindspore import nn

from .layers import layer_index

__all__ = ["ALL_LINEAR", "HEAD_NAMES", "is_all_linear", "output_heads"]

#: PEFT's shorthand (``INCLUDE_LINEAR_LAYERS_SHORTHAND``), matched case-insensitively as PEFT does
ALL_LINEAR = "all-linear"
#: last names of output heads: MindFormers' Llama / Hugging Face (lm_head), mcore GPT (output_layer), sample GPT
HEAD_NAMES = ("lm_head", "output_layer", "head")


def is_all_linear(targets: Any) -> bool:
    """True for PEFT's shorthand ``"all-linear"`` (any case), a string ``target_modules``."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def _output_embeddings(net: nn.Cell, cells: List[Tuple[str, nn.Cell]]) -> Dict[str, str]:
    """path -> reason, for what a ``get_output_embeddings()`` of the net (or of one of its cells) returns."""
    found = {}
    by_id = {id(cell): path for path, cell in cells}
    for owner_path, owner in [("", net)] + list(cells):
        getter = getattr(owner, "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except Exception:       # a model whose getter needs state it lacks here is not telling us its head
            continue
        if isinstance(head, nn.Cell) and id(head) in by_id:
            found[by_id[id(head)]] = f"returned by {type(owner).__name__}.get_output_embeddings()"
    return found


def output_heads(net: nn.Cell, cells: List[Tuple[str, nn.Cell]],
                 is_linear: Callable[[nn.Cell], bool]) -> Dict[str, str]:
    """The linear cells ``"all-linear"`` leaves out as the output head: path -> why (the module docstring)."""
    heads = {path: why for path, why in _output_embeddings(net, cells).items()}
    owners: Dict[int, List[str]] = {}
    for path, cell in cells:
        for param in cell.get_parameters(expand=False):
            owners.setdefault(id(param), []).append(path)
    for path, cell in cells:
        if path in heads or not is_linear(cell):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES and layer_index(path) is None:
            heads[path] = f"named {leaf!r}, outside the numbered layers"
            continue
        weight = getattr(cell, "weight", None)
        others = [other for other in owners.get(id(weight), []) if other != path] if weight is not None else []
        if others:
            heads[path] = f"its weight is tied to '{others[0]}'"
    return heads
