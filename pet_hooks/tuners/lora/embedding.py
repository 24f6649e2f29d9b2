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
and the PiSSA / OLoRA inits (the kind lists no variant and no residual init).

An embedding tied to the output head (``tie_word_embeddings``) keeps its delta on the lookup, as in
PEFT; merging it would change the head too, so ``merge`` and ``save_merged_checkpoint`` refuse it
(``weight_readers`` names the mcore head that reads the shared weight at call time).

Each embedding class is one :class:`EmbeddingKind`, which knows the attribute its table is kept in
(``embedding_table``, ``embedding_weight``, ``weight``); the table is stored [num_embeddings, dim],
i.e. [in, out] of the delta ``B @ A``, so merging transposes it as for a weight stored [in, out].
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, nn, ops

from ..common import loaded_class
from .kind import LoraKind

__all__ = ["LoraEmbedding", "EmbeddingKind", "KINDS", "PEFT_LEAVES", "SUPPORTED"]

logger = logging.getLogger("pet_hooks")
_LLAMA = "mindformers.models.llama.llama_layer"
_MCORE = "mindformers.parallel_core.training_graph.tensor_parallel.layers"
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


def _mcore_models_of(net: nn.Cell, cell: nn.Cell):
    """(path, model) of each cell of ``net`` whose ``embedding.word_embeddings`` is ``cell`` (mcore GPTModel)."""
    for path, model in net.cells_and_names():
        embedding = getattr(model, "embedding", None)
        if isinstance(embedding, nn.Cell) and getattr(embedding, "word_embeddings", None) is cell:
            yield path, model


class EmbeddingKind(LoraKind):
    """One embedding class (``module.class_name``, its table in ``table_attr``): PEFT's embedding LoRA."""

    mixin = LoraEmbedding
    leaves = PEFT_LEAVES
    #: the branch's lookup and matmul, and what it reads at call time
    extra_attrs = ("pet_lora_gather", "pet_lora_matmul_b", "pet_lora_padding_idx", "pet_lora_out_dtype")
    takes_dropout = False

    def __init__(self, module: str, class_name: str, table_attr: str, mcore: bool = False) -> None:
        self.module, self.class_name, self.table_attr, self.mcore = module, class_name, table_attr, mcore
        self.name = f"{module}.{class_name}"

    def base_class(self) -> Optional[type]:
        """The class; MindFormers' only when it is imported (a net cannot hold one otherwise, and importing it
        costs seconds)."""
        return loaded_class(self.module, self.class_name)

    def recognises(self, cell: nn.Cell) -> bool:
        base = self.base_class()
        return base is not None and isinstance(cell, base)

    def refuse(self, cell: nn.Cell) -> Optional[str]:
        base = self.base_class()
        if type(cell).construct is not base.construct:
            return (f"{type(cell).__name__} overrides {base.__name__}.construct, whose computation pet_hooks "
                    f"cannot reproduce")
        if self.mcore and getattr(cell, "sequence_parallel", False):
            return (f"{type(cell).__name__} with sequence_parallel scatters its output along the sequence; "
                    f"not supported")
        return None

    def unreached_reason(self, net: nn.Cell, cell: nn.Cell) -> Optional[str]:
        """An mcore model with a multi-token-prediction block hands that block the embedding's weight, which
        embeds without the delta."""
        for path, model in _mcore_models_of(net, cell):
            if getattr(model, "mtp_process", False):
                return (f"its weight is also read by the multi-token-prediction block of "
                        f"'{path or type(model).__name__}' (word_embeddings_weight), which would embed without the "
                        f"LoRA delta")
        return None

    def warn_no_dropout(self, paths: Sequence[str], rate: float) -> None:
        logger.warning("pet_hooks: lora_dropout %s is not applied on the embedding(s) %s (as in PEFT)",
                       rate, ", ".join(paths))

    def base_weight(self, cell: nn.Cell) -> Parameter:
        """The embedding table, ``[num_embeddings, dim]``."""
        return getattr(cell, self.table_attr)

    def weight_is_out_in(self, cell: nn.Cell) -> bool:
        return False                    # [num_embeddings, dim] = [in, out] of B @ A

    def io_channels(self, cell: nn.Cell) -> Tuple[int, int]:
        """(num_embeddings, dim): A's columns and B's rows."""
        vocab, dim = self.base_weight(cell).shape
        return int(vocab), int(dim)

    def group_anchor(self, cell: nn.Cell) -> Optional[Parameter]:
        return self.base_weight(cell)

    def initial_arrays(self, cell: nn.Cell, cfg, rng: np.random.Generator):
        """(A [r, vocab], B [dim, r], no residual) as PEFT initialises an embedding's (see the module docstring)."""
        vocab, dim = self.io_channels(cell)
        r = cfg.lora_rank
        a = (rng.standard_normal((r, vocab)) if cfg.init_lora_weights is False
             else np.zeros((r, vocab))).astype(np.float32)
        return a, rng.standard_normal((dim, r)).astype(np.float32), None

    def initial_values(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        a, b, _ = self.initial_arrays(cell, cfg, rng)
        return {"lora_A": a, "lora_B": b}

    def _row_split(self, cell: nn.Cell) -> Optional[int]:
        """How many ways the base splits the ids (the token rows): mcore from its config, the others from
        their lookup's strategy when one is set (None: no layout)."""
        if self.mcore:
            config = cell.config

            def size(attr):
                value = getattr(config, attr, None)
                return int(value) if value else 1
            return size("data_parallel_size") * size("context_parallel_size")
        strategy = getattr(getattr(cell, "gather", None), "in_strategy", None)
        return int(math.prod(strategy[1])) if strategy else None

    def add_extras(self, cell: nn.Cell) -> None:
        """The branch's lookup and matmul, laid out as the module docstring says, and what it reads."""
        cell.pet_lora_out_dtype = self.base_weight(cell).dtype       # what the lookup returns
        padding = getattr(cell, "padding_idx", None)
        cell.pet_lora_padding_idx = int(padding) if padding is not None else None
        cell.pet_lora_gather = ops.Gather()
        cell.pet_lora_matmul_b = ops.MatMul(transpose_a=True, transpose_b=True)
        rows = self._row_split(cell)
        if rows is not None:
            cell.pet_lora_gather.shard(((1, 1), (rows,)))
            cell.pet_lora_matmul_b.shard(((1, rows), (1, 1)))

    def grad_sentinels(self, cell: nn.Cell) -> List[Parameter]:
        """``lora_A``: PEFT's embedding init is the other way round (A zero, B random)."""
        return [cell.lora_A]

    def weight_readers(self, net: nn.Cell, cell: nn.Cell) -> List[str]:
        """An mcore model's ``output_layer`` when it shares the embedding (``share_embeddings_and_output_weights``;
        its weight is passed at call time, so the weight's owners do not show it)."""
        return [f"{path}.output_layer" if path else "output_layer" for path, model in _mcore_models_of(net, cell)
                if getattr(model, "share_embeddings_and_output_weights", False)]


KINDS = (
    EmbeddingKind("mindspore.nn", "Embedding", "embedding_table"),
    EmbeddingKind(_LLAMA, "LlamaEmbedding", "embedding_weight"),
    EmbeddingKind(_MCORE, "VocabParallelEmbedding", "weight", mcore=True),
)
