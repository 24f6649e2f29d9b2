"""LoRA on embedding lookups, as PEFT's ``lora.Embedding``: ``mindspore.nn.Embedding``, MindFormers'
legacy ``LlamaEmbedding`` and mcore ``VocabParallelEmbedding``.

For token ids ``ids`` and the base table ``W`` ``[num_embeddings, dim]``::

    out = W[ids] + scaling * A^T[ids] @ B^T      A = <cell path>.lora_embedding_A  [r, num_embeddings]
                                                 B = <cell path>.lora_embedding_B  [dim, r]

which is PEFT 0.21's ``Embedding`` (``peft/tuners/lora/layer.py``) to the letter:

* names and shapes are PEFT's (its files keep them bare, ``<module>.lora_embedding_A``, no ``.weight``);
* init: A zeros and B standard normal (``init_lora_weights`` true, and ``gaussian``, which PEFT treats
  alike for embeddings), so the output is the base output until A moves; ``false``: both standard
  normal. ``lora_a_init`` (MindFormers' field, the initialiser of a linear layer's random A) does
  not apply: here the random factor is B, drawn as PEFT and loralib draw it (N(0, 1));
* B starts random and A at zero, so A is the delta whose change shows a gradient arrived (the
  gradient sentinel; on a linear layer it is B);
* no ``lora_dropout``: PEFT builds the dropout cell for an embedding and never calls it;
* ``padding_idx`` (``nn.Embedding``'s): PEFT looks A up with ``F.embedding(..., padding_idx=...)``,
  so A's padding column gets no gradient; here the looked-up rows of padding ids are
  ``stop_gradient``-ed, the same values and gradients;
* merge: ``W += scaling * (B @ A)^T``; ``scaling`` is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

The cell keeps the attribute names every LoRA cell has (``lora_A``, ``lora_B``, ``pet_lora_scale``), so
the switch, merging, several adapters (``lora_slots``: A's rows and B's columns are the rank, as on a
linear layer) and mixed batches (``lora_rows``: the ids' leading axis is the batch) work unchanged;
only the Parameters' names carry PEFT's leaves. The base computation is not copied: the generated
class calls the original ``construct`` (``pet_base_construct``) and adds the branch to its output,
reshaped like it. The branch's two primitives are the cell's own: its token rows split as the base
lookup's ids are (mcore: ``data_parallel * context_parallel`` from the cell's config), A and B
replicated (they are small); tensor parallelism cannot run on the CPU, so this layout is not run here.

Refused (the reason is ``apply``'s error): a subclass with its own ``construct``, a
``VocabParallelEmbedding`` with ``sequence_parallel`` (its output is scattered along the sequence),
an embedding whose weight an mcore multi-token-prediction block reads without calling it, DoRA
and the PiSSA / OLoRA inits (``lora_dora.reason`` / ``lora_init.reason``).

An embedding tied to the output head (``tie_word_embeddings``) keeps its delta on the lookup, as in
PEFT; merging it would change the head too, so ``merge`` and ``save_merged_checkpoint`` refuse it
(:func:`weight_readers` names the mcore head that reads the shared weight at call time).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

__all__ = ["LoraEmbedding", "is_embedding", "mixin_for", "base_weight", "io_channels", "initial_arrays",
           "add_branch", "weight_deltas", "weight_readers", "unreached_reason", "ADDED_ATTRS", "PEFT_LEAVES",
           "SUPPORTED"]

_LLAMA = "mindformers.models.llama.llama_layer"
_MCORE = "mindformers.parallel_core.training_graph.tensor_parallel.layers"
#: what an adapted embedding gains beyond every LoRA cell's attributes (removed by eject)
ADDED_ATTRS = ("pet_lora_gather", "pet_lora_padding_idx", "pet_lora_out_dtype")
#: the Parameters' leaves, PEFT's names: A, B
PEFT_LEAVES = ("lora_embedding_A", "lora_embedding_B")
SUPPORTED = ("mindspore.nn.Embedding, MindFormers' LlamaEmbedding (legacy models) and VocabParallelEmbedding "
             "(mcore models)")


class LoraEmbedding:
    """The base lookup (its own ``construct``) plus ``scaling * A^T[ids] @ B^T``."""

    pet_hooks_lora = True

    def construct(self, ids):
        out = self.pet_base_construct(ids)
        return out + self._embedding_branch(ids, out)

    def _embedding_branch(self, ids, like):
        flat = ops.reshape(ids, (-1,))
        dtype = self.lora_compute_dtype
        # A's columns of the ids, [R, N]: the rows of A^T PEFT's F.embedding looks up, without transposing A
        h = self.pet_lora_gather(ops.cast(self.lora_A, dtype), flat, 1)
        if self.pet_lora_padding_idx is not None:        # as F.embedding(padding_idx=...): no gradient there
            h = ops.where(flat == self.pet_lora_padding_idx, ops.stop_gradient(h), h)
        h = self._embedding_scale(h)
        out = self.pet_lora_matmul_b(h, ops.cast(self.lora_B, dtype))     # h^T @ B^T: [N, dim]
        # The table's dtype, not ops.dtype(like): VocabParallelEmbedding's Morph declares the ids' dtype as its
        # output's (mindformers 1.9, embedding_infer_dtype), which graph mode then reports for ``like``.
        return ops.cast(ops.reshape(out, ops.shape(like)), self.pet_lora_out_dtype)

    def _embedding_scale(self, h):
        """Each rank row times its scale (``pet_lora_scale`` [R, 1]); ``lora_rows`` masks per batch row instead.
        Scaling the N gathered columns, not A: the same product, without a pass over the whole vocabulary."""
        return h * ops.cast(self.pet_lora_scale, ops.dtype(h))


def _known() -> Dict[type, str]:
    """{class: its weight attribute} for the embeddings pet_hooks knows; MindFormers' only when it is
    imported (a net cannot hold one otherwise, and importing it costs seconds)."""
    known = {nn.Embedding: "embedding_table"}
    llama = sys.modules.get(_LLAMA)
    if getattr(llama, "LlamaEmbedding", None) is not None:
        known[llama.LlamaEmbedding] = "embedding_weight"
    mcore = sys.modules.get(_MCORE)
    if getattr(mcore, "VocabParallelEmbedding", None) is not None:
        known[mcore.VocabParallelEmbedding] = "weight"
    return known


def _base_class(cell: nn.Cell) -> Optional[type]:
    known = _known()
    return next((klass for klass in type(cell).__mro__ if klass in known), None)


def is_embedding(cell: nn.Cell) -> bool:
    """True for a cell of one of the supported embedding classes (subclasses and adapted cells included)."""
    return _base_class(cell) is not None


def _is_mcore(cell: nn.Cell) -> bool:
    mcore = sys.modules.get(_MCORE)
    return mcore is not None and isinstance(cell, mcore.VocabParallelEmbedding)


def mixin_for(cell: nn.Cell) -> Tuple[Optional[type], Optional[str]]:
    """(``LoraEmbedding``, None) when LoRA can adapt the embedding ``cell``, else (None, reason)."""
    base = _base_class(cell)
    if type(cell).construct is not base.construct:
        return None, (f"{type(cell).__name__} overrides {base.__name__}.construct, whose computation pet_hooks "
                      f"cannot reproduce")
    if _is_mcore(cell) and getattr(cell, "sequence_parallel", False):
        return None, f"{type(cell).__name__} with sequence_parallel scatters its output along the sequence; not supported"
    return LoraEmbedding, None


def base_weight(cell: nn.Cell) -> Parameter:
    """The embedding table, ``[num_embeddings, dim]``."""
    return getattr(cell, _known()[_base_class(cell)])


def io_channels(cell: nn.Cell) -> Tuple[int, int]:
    """(num_embeddings, dim): A's columns and B's rows."""
    vocab, dim = base_weight(cell).shape
    return int(vocab), int(dim)


def initial_arrays(cfg, rng: np.random.Generator, vocab: int, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """(A [r, vocab], B [dim, r]) as PEFT initialises an embedding's (see the module docstring)."""
    r = cfg.lora_rank
    a = (rng.standard_normal((r, vocab)) if cfg.init_lora_weights is False else np.zeros((r, vocab))).astype(np.float32)
    return a, rng.standard_normal((dim, r)).astype(np.float32)


def _row_split(cell: nn.Cell) -> Optional[int]:
    """How many ways the base splits the ids (the token rows): mcore from its config, the others from
    their lookup's strategy when one is set (None: no layout)."""
    if _is_mcore(cell):
        config = cell.config

        def size(attr):
            value = getattr(config, attr, None)
            return int(value) if value else 1
        return size("data_parallel_size") * size("context_parallel_size")
    strategy = getattr(getattr(cell, "gather", None), "in_strategy", None)
    return int(math.prod(strategy[1])) if strategy else None


def _add_primitives(cell: nn.Cell) -> None:
    """The branch's lookup and matmul, laid out as the module docstring says."""
    cell.pet_lora_gather = ops.Gather()
    cell.pet_lora_matmul_b = ops.MatMul(transpose_a=True, transpose_b=True)
    rows = _row_split(cell)
    if rows is not None:
        cell.pet_lora_gather.shard(((1, 1), (rows,)))
        cell.pet_lora_matmul_b.shard(((1, rows), (1, 1)))


def add_branch(path: str, cell: nn.Cell, cfg, rng: np.random.Generator, as_data) -> List[Parameter]:
    """Give the embedding its A and B (PEFT's names and init) and primitives; ``as_data(values, dtype)`` makes
    Parameter data. The caller adds the switch, the compute dtype and ``lora_dropout = None``."""
    vocab, dim = io_channels(cell)
    dtype = getattr(mstype, cfg.param_init_type)
    a, b = initial_arrays(cfg, rng, vocab, dim)
    # Explicit names (parameters added after construction get no path prefix), PEFT's leaves.
    cell.lora_A = Parameter(as_data(a, dtype), name=f"{path}.{PEFT_LEAVES[0]}", requires_grad=True)
    cell.lora_B = Parameter(as_data(b, dtype), name=f"{path}.{PEFT_LEAVES[1]}", requires_grad=True)
    cell.pet_lora_out_dtype = base_weight(cell).dtype       # what the lookup returns
    padding = getattr(cell, "padding_idx", None)
    cell.pet_lora_padding_idx = int(padding) if padding is not None else None
    _add_primitives(cell)
    return [cell.lora_A, cell.lora_B]


def weight_deltas(cell: nn.Cell) -> List[Tuple[Parameter, np.ndarray]]:
    """``[(W, (B @ s A)^T)]``, float32 ``[num_embeddings, dim]``, each rank row at its own scaling."""
    a = cell.lora_A.astype(mstype.float32).asnumpy()
    b = cell.lora_B.astype(mstype.float32).asnumpy()
    return [(base_weight(cell), np.ascontiguousarray((b @ (cell.pet_lora_rank_scaling[:, None] * a)).T))]


def _mcore_models_of(net: nn.Cell, cell: nn.Cell):
    """(path, model) of each cell of ``net`` whose ``embedding.word_embeddings`` is ``cell`` (mcore GPTModel)."""
    for path, model in net.cells_and_names():
        embedding = getattr(model, "embedding", None)
        if isinstance(embedding, nn.Cell) and getattr(embedding, "word_embeddings", None) is cell:
            yield path, model


def weight_readers(net: nn.Cell, cell: nn.Cell) -> List[str]:
    """Cells of ``net`` that compute with the embedding's weight without holding it: an mcore model's
    ``output_layer`` when it shares the embedding (``share_embeddings_and_output_weights``; its weight is
    passed at call time, so the weight's owners do not show it)."""
    return [f"{path}.output_layer" if path else "output_layer" for path, model in _mcore_models_of(net, cell)
            if getattr(model, "share_embeddings_and_output_weights", False)]


def unreached_reason(net: nn.Cell, cell: nn.Cell) -> Optional[str]:
    """Why LoRA on this embedding would miss some of its lookups, or None: an mcore model with a
    multi-token-prediction block hands that block the embedding's weight, which embeds without the delta."""
    for path, model in _mcore_models_of(net, cell):
        if getattr(model, "mtp_process", False):
            return (f"its weight is also read by the multi-token-prediction block of '{path or type(model).__name__}' "
                    f"(word_embeddings_weight), which would embed without the LoRA delta")
    return None
