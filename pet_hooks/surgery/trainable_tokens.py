"""Config ``trainable_token_indices`` (PEFT's, LoRA's): train only the listed rows of an embedding table.

    apply(llama, {"pet_type": "lora", "target_modules": ".*wq", "trainable_token_indices": [3, 7]})
    apply(llama, {..., "trainable_token_indices": {"tok_embeddings": [3, 7]}})

As PEFT 0.21's ``TrainableTokensLayer`` (``peft/tuners/trainable_tokens/layer.py``): the embedding gets one
Parameter ``<path>.token_adapter.trainable_tokens_delta`` ``[len(indices), dim]``, initialised to the listed
rows of the table (PEFT's ``init_weights=True``), which holds the *new values* of those rows (not a
difference, despite its name); the embedding computes with the table whose listed rows are replaced
(PEFT's ``index_copy``). The table itself never changes. A list of indices means the net's first embedding
cell (MindFormers Llama: ``tok_embeddings``; PEFT: the input embeddings); a dict names the cells as PEFT
matches them (a cell whose path ends with the key).

An output head tied to the table (``tie_word_embeddings``: the same Parameter held by a Dense / MindFormers
Linear head) computes with the same effective table, as PEFT's tied ``TrainableTokensLayer`` does: its
columns of the listed rows become ``x @ delta^T``. Both are exact replacements, not ``+ (delta - W)``: the
lookup takes the delta's rows where the id is listed (``where``), the head's logits keep the other
columns (``* keep``, 1 or 0) and get the listed ones from ``x @ delta^T`` placed by a one-hot matrix.

Both cells move onto generated subclasses (graph mode compiles the source of ``construct``) that call the
original computation and then replace the rows / columns. Switching off (``disable_adapters``) is a
Python flag read at compile time, as for ``modules_to_save``: a graph-mode net recompiles once each way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..errors import NoMatchError, PetConfigError, UnsupportedCellError
from ..matching.cells import nearest_names
from ..tuners.common import loaded_class, mindformers_linear, patched_class, strip_attrs

__all__ = ["TokenRows", "select", "install", "uninstall", "set_active", "delta_parameters", "unloaded_values",
           "DELTA_LEAF"]

DELTA_LEAF = "token_adapter.trainable_tokens_delta"        # PEFT's name, after the cell path
_ATTRS = ("pet_tt_delta", "pet_tt_on", "pet_tt_slot", "pet_tt_keep", "pet_tt_onehot")
#: (module, class, the table's attribute) of the embedding cells adapted
_EMBEDDINGS = (("mindspore.nn", "Embedding", "embedding_table"),
               ("mindformers.models.llama.llama_layer", "LlamaEmbedding", "embedding_weight"))


class TrainableTokensEmbedding:
    """The lookup, with the listed ids' rows taken from ``pet_tt_delta`` (slot 0: not listed)."""

    def construct(self, ids):
        out = self.pet_base_construct(ids)
        if self.pet_tt_on:
            slot = ops.gather(self.pet_tt_slot, ids.reshape(-1), 0).reshape(out.shape[:-1])
            rows = ops.concat((ops.zeros_like(self.pet_tt_delta[:1]), self.pet_tt_delta), 0)
            out = ops.where(ops.expand_dims(slot > 0, -1), ops.gather(rows, slot, 0).astype(out.dtype), out)
        return out


class TrainableTokensHead:
    """The tied head's logits, the listed rows' columns computed with ``pet_tt_delta`` instead."""

    def construct(self, x):
        out = self.pet_base_construct(x)
        if self.pet_tt_on:
            listed = ops.matmul(x.astype(out.dtype), ops.transpose(self.pet_tt_delta.astype(out.dtype), (1, 0)))
            out = out * self.pet_tt_keep.astype(out.dtype) + ops.matmul(listed, self.pet_tt_onehot.astype(out.dtype))
        return out


@dataclass
class TokenRows:
    """One embedding of ``trainable_token_indices``: its cell, the heads tied to it, the delta Parameter."""

    path: str
    cell: nn.Cell
    indices: List[int]
    heads: List[Tuple[str, nn.Cell]] = field(default_factory=list)
    classes: Dict[int, type] = field(default_factory=dict)     # id(cell) -> its class before
    delta: Optional[Parameter] = None
    table: Optional[Parameter] = None                           # the embedding's table (never written)


def _table_attr(cell: nn.Cell) -> Optional[str]:
    """The attribute holding the table when ``cell`` is an embedding kind adapted here, else None."""
    for module, name, attr in _EMBEDDINGS:
        cls = loaded_class(module, name)
        if cls is not None and isinstance(cell, cls) and type(cell).construct is cls.construct:
            return attr
    return None


def table_of(cell: nn.Cell) -> Parameter:
    return getattr(cell, _table_attr(cell))


def _tied_heads(net: nn.Cell, path: str, table: Parameter) -> List[Tuple[str, nn.Cell]]:
    """The other cells holding ``table`` itself (tie_word_embeddings); each must be a bias-free projection."""
    heads = []
    for other, cell in net.cells_and_names():
        if other == path or not any(p is table for p in cell.get_parameters(expand=False)):
            continue
        linear = mindformers_linear()
        is_head = (isinstance(cell, nn.Dense) or (linear is not None and isinstance(cell, linear))) \
            and getattr(cell, "weight", None) is table and getattr(cell, "transpose_b", True) is not False
        if not is_head or getattr(cell, "has_bias", False):
            raise UnsupportedCellError(f"trainable_token_indices: the table of '{path}' is tied to '{other}' "
                                       f"({type(cell).__name__}), which pet_hooks can follow only as a bias-free "
                                       f"Dense / Linear head computing x @ table^T")
        heads.append((other, cell))
    return heads


def select(net: nn.Cell, spec, adapted: Sequence[str], copied: Sequence[str]) -> List[TokenRows]:
    """The embeddings ``spec`` names (a list: the first embedding cell; a dict: PEFT's ``endswith``), checked:
    every index below the table's rows, no cell adapted or copied besides. Changes nothing."""
    cells = [(path, cell) for path, cell in net.cells_and_names() if path]
    embeddings = [(path, cell) for path, cell in cells if _table_attr(cell) is not None]
    if isinstance(spec, dict):
        wanted = []
        for key, indices in spec.items():
            hits = [(path, cell) for path, cell in cells if path.endswith(key)]
            if not hits:
                ends = dict.fromkeys(".".join(p.split(".")[i:]) for p, _ in cells for i in range(len(p.split("."))))
                close = nearest_names(key, list(ends))
                raise NoMatchError(f"trainable_token_indices key {key!r} matches no cell of {type(net).__name__} "
                                   f"(a cell matches when its path ends with the key)"
                                   + (f"; nearest cell names: {close}" if close else ""))
            for path, cell in hits:
                if _table_attr(cell) is None:
                    raise UnsupportedCellError(f"trainable_token_indices key {key!r} matches '{path}' "
                                               f"({type(cell).__name__}), not an embedding (nn.Embedding, "
                                               f"MindFormers' LlamaEmbedding)")
                wanted.append((path, cell, list(indices)))
    else:
        if not embeddings:
            raise NoMatchError(f"trainable_token_indices: {type(net).__name__} has no embedding cell "
                               f"(nn.Embedding, MindFormers' LlamaEmbedding)")
        path, cell = embeddings[0]
        wanted = [(path, cell, list(spec))]
    chosen: List[TokenRows] = []
    for path, cell, indices in wanted:
        rows = int(table_of(cell).shape[0])
        over = [i for i in indices if i >= rows]
        if over:
            raise PetConfigError(f"trainable_token_indices: index {over[0]} is not below the {rows} rows of "
                                 f"'{path}' ({type(cell).__name__}, vocabulary size {rows})")
        heads = _tied_heads(net, path, table_of(cell))
        for other in [path] + [head for head, _ in heads]:
            for busy, what in ((adapted, "a target of the adapter"), (copied, "in modules_to_save")):
                if any(other == b or other.startswith(b + ".") or b.startswith(other + ".") for b in busy):
                    raise PetConfigError(f"trainable_token_indices cell '{other}' is also {what}: train the "
                                         f"whole cell or some of its rows, not both")
        if any(r.path == path for r in chosen):
            raise PetConfigError(f"trainable_token_indices names '{path}' twice")
        chosen.append(TokenRows(path, cell, indices, heads, table=table_of(cell)))
    return chosen


def install(chosen: List[TokenRows]) -> List[TokenRows]:
    """Give every embedding its delta and move it (and its tied heads) onto the generated classes."""
    done: List[TokenRows] = []
    try:
        for rows in chosen:
            table = rows.table
            vocab = int(table.shape[0])
            index = np.asarray(rows.indices, np.int64)
            slot = np.zeros(vocab, np.int32)
            slot[index] = np.arange(1, len(index) + 1, dtype=np.int32)
            rows.delta = Parameter(ops.gather(table.value(), Tensor(index.astype(np.int32)), 0), requires_grad=True)
            keep = np.ones(vocab, np.float32)
            keep[index] = 0.0
            onehot = np.zeros((len(index), vocab), np.float32)
            onehot[np.arange(len(index)), index] = 1.0
            done.append(rows)
            for cell, mixin, extra in [(rows.cell, TrainableTokensEmbedding, {"pet_tt_slot": Tensor(slot)})] + [
                    (head, TrainableTokensHead, {"pet_tt_keep": Tensor(keep), "pet_tt_onehot": Tensor(onehot)})
                    for _, head in rows.heads]:
                clash = [name for name in _ATTRS if hasattr(cell, name)]
                if clash:
                    raise UnsupportedCellError(f"cell {type(cell).__name__} already has attribute(s) {clash}")
                setattr(cell, "pet_tt_delta", rows.delta)
                setattr(cell, "pet_tt_on", True)
                for name, value in extra.items():
                    setattr(cell, name, value)
                rows.classes[id(cell)] = type(cell)
                cell.__class__ = patched_class(mixin, type(cell))
            rows.delta.name = f"{rows.path}.{DELTA_LEAF}"       # after attaching: MindSpore names it when set
    except BaseException:
        uninstall(done)
        raise
    return done


def uninstall(chosen: List[TokenRows]) -> None:
    """The cells back: their classes, no delta, no constants (the table was never written)."""
    for rows in reversed(chosen):
        for cell in [rows.cell] + [head for _, head in rows.heads]:
            if id(cell) in rows.classes:
                cell.__class__ = rows.classes.pop(id(cell))
            strip_attrs(cell, _ATTRS)


def set_active(chosen: List[TokenRows], active: bool) -> bool:
    """The replaced rows on or off; True when something changed (graph mode recompiles)."""
    changed = False
    for rows in chosen:
        for cell in [rows.cell] + [head for _, head in rows.heads]:
            if getattr(cell, "pet_tt_on") != active:
                setattr(cell, "pet_tt_on", active)
                changed = True
    return changed


def delta_parameters(chosen: List[TokenRows]) -> List[Parameter]:
    return [rows.delta for rows in chosen]


def unloaded_values(chosen: List[TokenRows]) -> Dict[int, Tensor]:
    """id(table) -> the table with the listed rows replaced: what PEFT's ``merge_and_unload`` leaves."""
    out = {}
    for rows in chosen:
        table = rows.table
        value = table.asnumpy().copy() if table.dtype != ms.bfloat16 else None
        if value is None:
            raise PetConfigError(f"a merged checkpoint of the bfloat16 table of '{rows.path}' is not supported")
        value[np.asarray(rows.indices)] = rows.delta.asnumpy().astype(value.dtype)
        out[id(table)] = Tensor(value)
    return out
