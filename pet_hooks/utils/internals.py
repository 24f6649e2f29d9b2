"""Registry of every MindSpore / MindFormers internal pet_hooks relies on, and of the code it copies.

pet_hooks reproduces a few ``construct`` bodies (LoRA must add its branch *inside* the base
layer's computation, because graph mode compiles the source of ``type(cell).construct``),
touches private attributes (``Cell._params``, the hook version) and depends on the shape of
undocumented behaviour (the optimizer signature decorator, ``TrainOneStepCell.weights``). A new
MindSpore or MindFormers may change any of these silently. Each dependency is one
:class:`Internal` below, saying what is relied on, where pet_hooks uses it, the versions it
was checked against, the SHA-256 of the relied-on source where the code is copied or its
exact behaviour matters, and the test that guards it::

    Internal(key="dense_construct", package="mindspore", checked=("2.9.0", "2.10.0"),
             target="mindspore.nn.Dense.construct", source_sha256="...",
             relied_on="LoraDense.construct is this body with the LoRA branch added",
             sites=("pet_hooks/tuners/lora/linear.py",), names=(),
             guard="tests/project/test_ms_compat.py::test_relied_on_source_is_the_checked_one")

Several versions: MindSpore-only users may have 2.9.0 or 2.10.0 (setup.py allows both; MindFormers
1.9 pins 2.9), and ``.ci/run`` runs the tests on each. An entry's ``checked`` lists every version it
was checked against; its ``source_sha256`` is one hash when the normalised source is the same in
all of them, else a mapping version -> hash. On a checked version the drift guard wants exactly
that version's hash; on any other it reports the sources that match no checked version's.

``tests/project/test_ms_compat.py`` checks every entry (hashes equal, private attributes present and
behaving as relied on) and scans the package: a private access (``x._name``, a ``"_name"``
string, an import of a private name) at a site no entry lists fails it. To add an entry: copy
one, run ``python -m pet_hooks.utils.internals`` for the current hashes, and name its guard.
To add a version: install it beside pet_hooks, run ``python -m pet_hooks.utils.internals``; for
each entry it reports CHANGED, read the change against the entry's sites (a copied computation
that changed must follow the installed version), record that version's hash, add the version to
``_MS`` / ``_MF`` and run the tests on it.

``surgery.apply`` calls :func:`pet_hooks.utils.ms_compat.warn_unchecked_versions`, which warns
once per process when the installed MindSpore or MindFormers is none of the checked versions.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["Internal", "REGISTRY", "OWN_PRIVATE_NAMES", "by_key", "checked_versions", "installed_version",
           "resolve", "normalised_source", "source_hash", "source_drift", "expected_hashes", "version_key"]


@dataclass(frozen=True)
class Internal:
    """One thing pet_hooks relies on in another package (or, package "pet_hooks", in its own privates).

    Attributes:
        key: short unique id.
        package: "mindspore", "mindformers" or "pet_hooks".
        checked: the versions of ``package`` this entry was checked against (empty for pet_hooks).
        target: dotted path of the relied-on object (module.Class.method), importable.
        relied_on: what pet_hooks assumes about it, in a sentence.
        sites: the pet_hooks files that rely on it (paths from the repository root).
        names: the private names those files use for it (what the source scan finds there).
        guard: the test that fails when the assumption breaks ("tests/file.py::test_name").
        source_sha256: for copied code or code whose exact behaviour is relied on, the hash of
            :func:`normalised_source` of ``target``: one hash when it is the same at every checked
            version, else a mapping with one hash per checked version; None for attribute checks.
    """

    key: str
    package: str
    checked: Tuple[str, ...]
    target: str
    relied_on: str
    sites: Tuple[str, ...]
    names: Tuple[str, ...]
    guard: str
    source_sha256: Union[None, str, Mapping[str, str]] = None

    # By key: the per-version hashes may be a mapping, which the generated hash would refuse.
    def __hash__(self) -> int:
        return hash(self.key)

    def hash_at(self, version: str) -> Optional[str]:
        """The source hash recorded for ``version``; None when the entry pins no source or was not
        checked against ``version``."""
        if self.source_sha256 is None or version not in self.checked:
            return None
        if isinstance(self.source_sha256, str):
            return self.source_sha256
        return self.source_sha256.get(version)

    def recorded_hashes(self) -> Dict[str, str]:
        """checked version -> recorded source hash (empty for attribute checks)."""
        return {version: h for version in self.checked if (h := self.hash_at(version)) is not None}


# The versions every entry of each package was checked against (setup.py's range, .ci/run's two
# lanes): MindFormers 1.9.0 pins MindSpore 2.9; a MindSpore-only install may have 2.9.0 or 2.10.0.
_MS, _MF = ("2.9.0", "2.10.0"), ("1.9.0",)
_COMPAT_TEST = "tests/project/test_ms_compat.py::"
_SOURCE_TEST = _COMPAT_TEST + "test_relied_on_source_is_the_checked_one"

REGISTRY: Tuple[Internal, ...] = (
    # ---------------------------------------------------------------- the graph cache: a compiled graph is kept per cell and key (docs/guarantees.md)
    Internal(key="hook_version_bump", package="mindspore", checked=_MS,
             target="mindspore.common.hook_handle._update_hook_version",
             relied_on="bumping the global hook version makes every graph-mode cell recompile on its next call "
                       "(the version is part of the compiled-graph cache key)",
             sites=("pet_hooks/utils/ms_compat.py",), names=("_update_hook_version",),
             guard=_COMPAT_TEST + "test_graph_mode_keeps_a_stale_graph_until_the_hook_version_moves",
             source_sha256="16c9df353b8e0086357c6c95aa7e3bd967f464735ba561136ab373f593850827"),
    Internal(key="graph_key_of_a_cell", package="mindspore", checked=_MS,
             target="mindspore.graph.api._CellGraphExecutor.compile",
             relied_on="a cell's compiled-graph key holds the hook version: always in 2.9.0, and in 2.10.0 only when "
                       "os.environ['MS_DEV_JIT_AST_ENABLE_GUARD'] == '1', read on every compile (force_recompile "
                       "sets it); nothing else reads that variable",
             sites=("pet_hooks/utils/ms_compat.py",), names=(),
             guard=_COMPAT_TEST + "test_graph_mode_keeps_a_stale_graph_until_the_hook_version_moves",
             source_sha256={"2.9.0": "5591f5f265e370fad349c4b08f016b4bceae5f93614730aab0809e9f2d3c7089",
                            "2.10.0": "1faea5fc728ddea72e5055a30fdf41436cf0472ddb939bea7b5f4f4046a3fdff"}),
    Internal(key="graph_key_of_a_function", package="mindspore", checked=_MS,
             target="mindspore.graph.api._JitExecutor.compile",
             relied_on="the same for a function compiled by mindspore.jit (a user's train step calling the net)",
             sites=("pet_hooks/utils/ms_compat.py",), names=(),
             guard=_COMPAT_TEST + "test_graph_mode_keeps_a_stale_graph_until_the_hook_version_moves",
             source_sha256={"2.9.0": "0319f1414e306552f126e73aad347e6e09cbf194a42e55c4247abeec5c553a69",
                            "2.10.0": "6e754672e668342e7122603cb6eebab51927de8876ff0fb473dc8a717c1d5127"}),
    Internal(key="compiled_graph_release", package="mindspore", checked=_MS,
             target="mindspore.graph.api._CellGraphExecutor.del_net_res",
             relied_on="a cell's compile_cache holds the phases compiled for it; _cell_graph_executor."
                       "del_net_res(cell, phases) frees them (as Cell.__del__ does) and the next call compiles "
                       "again; other cells' graphs stay",
             sites=("pet_hooks/utils/ms_compat.py",), names=("_cell_graph_executor",),
             guard=_COMPAT_TEST + "test_releasing_a_cells_graphs_recompiles_it_and_leaves_other_cells_alone"),
    Internal(key="model_train_start_step", package="mindspore", checked=_MS,
             target="mindspore.train.Model._train",
             relied_on="Model.train calls self._train(epoch, dataset, callbacks=, dataset_sink_mode=, sink_size=, "
                       "initial_epoch=), whose initial_step= starts cb_params.cur_step_num (an instance attribute "
                       "_train given that keyword is what a resumed call runs); a Model holds _train_network, _network "
                       "and _optimizer (the callbacks of a call that is not run get them)",
             sites=("pet_hooks/doors/resume.py",), names=("_train", "_train_network", "_network", "_optimizer"),
             guard="tests/doors/test_resume.py::test_stopped_after_step_5_and_resumed_ends_as_the_uninterrupted_run",
             source_sha256="e91541bcf43eed9f88e006c29cf101f69f29df0c1bbd6e4366105a66e4569a2b"),
    Internal(key="compile_cache_entry_script", package="mindspore", checked=_MS,
             target="mindspore.graph.api._get_compile_cache_dep_files",
             relied_on="the compile cache hashes the module global entry_script_path (sys.argv[0] at import) and "
                       "the files it imports that are not under a path of the module global sys_path; setting both "
                       "makes the user's script the entry (set_compile_cache_entry, pet-hooks run --compile-cache)",
             sites=("pet_hooks/utils/ms_compat.py",), names=(),
             guard="tests/doors/test_compile_cache.py::test_the_second_run_loads_the_graphs_and_a_corrupt_cache_is_compiled_again",
             source_sha256="8551cdde6cd590eec163a637b5e8f9f696acad765c1a2779a2f1128d5e0f88bd"),
    Internal(key="hook_version_read", package="mindspore", checked=_MS,
             target="mindspore.common.hook_handle._hook_version",
             relied_on="returns the global hook version, which _update_hook_version increments by one",
             sites=("pet_hooks/utils/ms_compat.py",), names=("_hook_version",),
             guard=_COMPAT_TEST + "test_graph_mode_keeps_a_stale_graph_until_the_hook_version_moves",
             # 2.10.0 drops a needless `global _HOOK_VERSION` (the function only reads it)
             source_sha256={"2.9.0": "625cfa8c9eed1ac8812103fd236c30f21e6576cfc5f8bf312a69804d6525351a",
                            "2.10.0": "cf7cffe6dc4dab9fbc822eb4aa0303b3abd0805ddce1204b03f4df8c055d730e"}),
    # ---------------------------------------------------------------- copied computations (LoRA)
    Internal(key="dense_construct", package="mindspore", checked=_MS, target="mindspore.nn.Dense.construct",
             relied_on="LoraDense.construct is this computation with the LoRA output added before the activation "
                       "(plain LoRA: the bias, then the branch; DoRA's layer recombines the same pieces, which "
                       "LoraDense defines, and copies no construct of its own)",
             sites=("pet_hooks/tuners/lora/linear.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="6c4db750c999b60c1851203f79fad6d081686fe46cc8ff46a322db98a4dfb2db"),
    Internal(key="linear_construct", package="mindformers", checked=_MF,
             target="mindformers.modules.layers.Linear.construct",
             relied_on="LoraLinear.construct is this computation (no experts, no gmm) with the LoRA output added "
                       "(plain LoRA: the bias, then the branch; DoRA's layer recombines the same pieces, which "
                       "LoraLinear defines, and copies no construct of its own)",
             sites=("pet_hooks/tuners/lora/linear.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="e1846911a113fbfd6ee4500410e12b4544b782f656db3b7f6f053fd550a298fb"),
    Internal(key="linear_attributes", package="mindformers", checked=_MF, target="mindformers.modules.layers.Linear",
             relied_on="an instance has expert_flag and use_gmm (LoRA, IA3 and the adapters refuse either), "
                       "in_channels, out_channels, transpose_b, dtype (its compute dtype) and activation_flag",
             sites=("pet_hooks/tuners/lora/linear.py", "pet_hooks/tuners/common.py", "pet_hooks/tuners/ia3.py",
                    "pet_hooks/tuners/bottleneck.py"), names=(),
             guard=_COMPAT_TEST + "test_mindformers_linear_has_the_attributes_lora_reads"),
    # ---------------------------------------------------------------- mcore projections (not copied: called)
    Internal(key="mcore_column_construct", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.tensor_parallel.layers.ColumnParallelLinear.construct",
             relied_on="LoraColumnParallelLinear calls this (pet_base_construct) and adds the branch to its first "
                       "output: it returns (output, bias), output shaped input[:-1] + (output_size,), bias the "
                       "unadded bias when skip_bias_add (else None)",
             sites=("pet_hooks/tuners/lora/mcore.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="c11a990545fe253586a2f47e33fb29a6ed61ac87ee5e550dcdfeda4c1343aa66"),
    Internal(key="mcore_row_construct", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.tensor_parallel.layers.RowParallelLinear.construct",
             relied_on="LoraRowParallelLinear calls this (pet_base_construct) and adds the branch to its first "
                       "output: it returns (output, bias) as ColumnParallelLinear does (output not scattered "
                       "unless sequence_parallel, which LoRA refuses)",
             sites=("pet_hooks/tuners/lora/mcore.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="0d2a0799624daf69984a14e55a89d0e1b612ca8de20144cc6e9c316ab09acf55"),
    Internal(key="mcore_linear_attributes", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.tensor_parallel.layers.ColumnParallelLinear",
             relied_on="Column/RowParallelLinear instances have input_size, output_size, weight, transpose_b, "
                       "compute_dtype, skip_weight_param_allocation (column), sequence_parallel (row) and config "
                       "(data_parallel_size, context_parallel_size, tensor_model_parallel_size)",
             sites=("pet_hooks/tuners/lora/mcore.py",), names=(),
             guard="tests/models/test_mcore_lora.py::test_mcore_projections_have_what_lora_reads"),
    Internal(key="mcore_qkv_rows", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.transformer.attention.SelfAttention."
                    "get_query_key_value_tensors",
             relied_on="linear_qkv's output rows are grouped by key/value head (per group: its query heads, its key "
                       "head, its value head); pet_hooks.io.fused splits a fused LoRA B into q/k/v by that layout "
                       "(checked against transformers in tests/models/test_mcore_peft.py)",
             sites=("pet_hooks/io/fused.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="8db99f3305b7bb555838dea48eb7a3df5d53cbfd227a2ebbaf81618ef16f4edc"),
    Internal(key="mcore_gate_up_rows", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.transformer.mlp.MLPInterleaved.construct",
             relied_on="linear_fc1's output rows interleave gate (even rows) and up (odd rows); pet_hooks.io.fused "
                       "splits a fused LoRA B into gate/up by that layout",
             sites=("pet_hooks/io/fused.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="48963bf6c21a229c23a4827ec98215010c33eb10715bde43f18857f8fd28014e"),
    Internal(key="mcore_attention_calls_core", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.transformer.attention.Attention.construct",
             relied_on="with cp == 1 and no TND layout, it calls core_attention(query, key, value, attention_mask, "
                       "actual_seq_qlen=..., actual_seq_kvlen=...) with keys/values [S, B, kv_heads, head_dim] "
                       "(rotary applied) and a mask [B, 1, S, S] (1 = masked); McoreCoreAttentionPrefix puts the "
                       "prefix in front there (its own _cat_prefix concatenates on axis 2 and fails)",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="d23df8d9591cb966634fb1c49f4cfa740764f5424b77c5bd5f7b385087697e47"),
    Internal(key="mcore_flash_attention_construct", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.transformer.flash_attention.FlashAttention.construct",
             relied_on="McoreCoreAttentionPrefix.construct has this signature and calls it (pet_base_construct) with "
                       "longer keys/values and a mask widened to match; its config holds num_query_groups, "
                       "kv_channels, hidden_size, context_parallel_size and input_layout",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="b6dd7640121fa95aefdb7e24f58fa4c8387b162dc02a5c89b4acdb2fc6e3b60f"),
    Internal(key="mcore_grouped_experts_construct", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.transformer.moe.ffn.FFNGroupedGEMM.construct",
             relied_on="LoraGroupedExperts.construct is this computation with each expert's LoRA delta added to "
                       "weight1 / weight2 before they go to the Morph (reshaped there to [E, hidden, 2 * ffn] / "
                       "[E, ffn, hidden]); an instance has hidden_size, weight1, weight2 and compute_dtype",
             sites=("pet_hooks/tuners/lora/experts.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="f5ca7402360f41bab2be8801b7252869caa6c7ad3d7c1022abeffc538afe55fc"),
    # ---------------------------------------------------------------- embeddings (not copied: called)
    Internal(key="embedding_construct", package="mindspore", checked=_MS, target="mindspore.nn.Embedding.construct",
             relied_on="LoraEmbedding calls this (pet_base_construct) and adds the branch to its output: the rows of "
                       "embedding_table for the ids (a Gather, or a one-hot MatMul), shaped ids.shape + "
                       "(embedding_size,), in the table's dtype; padding_idx only zeroes that row at init",
             sites=("pet_hooks/tuners/lora/embedding.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="1dc4b78af0fa2d132815d3aaa5661e90a1f2b7501169f5d0ee952350a28b2caa"),
    Internal(key="llama_embedding_construct", package="mindformers", checked=_MF,
             target="mindformers.models.llama.llama_layer.LlamaEmbedding.construct",
             relied_on="LoraEmbedding calls this (pet_base_construct) and adds the branch to its output: "
                       "gather(embedding_weight, ids, 0), ids flattened first with rmsnorm_compute_2d",
             sites=("pet_hooks/tuners/lora/embedding.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="04c2968502236bd39e00924c42cb80fd594bdddb3b629cd942b46f855d123b9a"),
    Internal(key="mcore_embedding_func", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.tensor_parallel.layers.VocabParallelEmbedding."
                    "embedding_func",
             relied_on="VocabParallelEmbedding.construct (called as pet_base_construct) runs this in its Morph: the "
                       "rows of weight for ids [B, S], output [B, S, H] in the weight's dtype (its Morph declares the "
                       "ids' dtype, so the branch casts to the table's), scattered along S only with sequence_parallel "
                       "(refused)",
             sites=("pet_hooks/tuners/lora/embedding.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="c4be02bf79a028f3c280dd836c7516a081473b1c74e5dd8a19416685b6873053"),
    Internal(key="mcore_gpt_embedding_readers", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.base_models.gpt.gpt_model.GPTModel.construct",
             relied_on="with share_embeddings_and_output_weights, output_layer computes with "
                       "embedding.word_embeddings.weight passed at call time (merging a LoRA of the embedding would "
                       "change the head: refused); with mtp_process, the MTP block embeds with that weight without "
                       "calling the embedding (LoRA on it refused)",
             sites=("pet_hooks/tuners/lora/embedding.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="029540d98c10c85ad43c9d0a84ee0d79e9c18359cde9409a18913ec7cdb45082"),
    Internal(key="embedding_attributes", package="mindformers", checked=_MF,
             target="mindformers.parallel_core.training_graph.tensor_parallel.layers.VocabParallelEmbedding",
             relied_on="nn.Embedding has embedding_table [vocab, dim], padding_idx and gather (its lookup primitive); "
                       "LlamaEmbedding has embedding_weight and gather; VocabParallelEmbedding has weight, config "
                       "(data_parallel_size, context_parallel_size) and sequence_parallel; an mcore GPTModel has "
                       "embedding.word_embeddings, share_embeddings_and_output_weights and mtp_process",
             sites=("pet_hooks/tuners/lora/embedding.py",), names=(),
             guard="tests/tuners/test_lora_embedding.py::test_the_embedding_classes_have_what_lora_reads"),
    Internal(key="mha_construct", package="mindspore", checked=_MS,
             target="mindspore.nn.MultiheadAttention.construct",
             relied_on="LoraMultiheadAttention.construct is this computation with in_proj_weight and out_proj.weight "
                       "replaced by their effective weights W + scaling * B @ A (it reads out_proj.weight and "
                       "out_proj.bias and never calls out_proj)",
             sites=("pet_hooks/tuners/lora/mha.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="84ddac63dd8c15042a16007a6ffb2ebb8c184a48d5b97249fde4aeffdc7b6600"),
    Internal(key="mha_attributes", package="mindspore", checked=_MS, target="mindspore.nn.MultiheadAttention",
             relied_on="an instance has _qkv_same_embed_dim (True exactly when in_proj_weight is the packed "
                       "[3 * embed_dim, embed_dim] input projection), embed_dim and out_proj (a Dense)",
             sites=("pet_hooks/tuners/lora/mha.py",), names=("_qkv_same_embed_dim",),
             guard="tests/tuners/test_unreached_cells.py::test_multihead_attention_has_what_lora_reads"),
    # ---------------------------------------------------------------- MindFormers' attention (prefix methods)
    Internal(key="llama_attention_construct", package="mindformers", checked=_MF,
             target="mindformers.models.llama.llama_transformer.LLamaAttention.construct",
             relied_on="LlamaAttentionPrefix.construct passes this signature's arguments positionally, in this "
                       "order; without flash attention or use_past the keys and values go through _cat_prefix",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="f08b02270d831b62527498ad45e41d9dd444c2d4f2252cf8cda5ef5ef2291e1e"),
    Internal(key="llama_attention_cat_prefix", package="mindformers", checked=_MF,
             target="mindformers.models.llama.llama_transformer.LLamaAttention._cat_prefix",
             relied_on="prefix_keys_values (2, batch, prefix_len, kv_dim) is put in front of the keys and values",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="840c848562a375e2490bce8ae4980f090809ebe9dec06594373c4cad3f932bc3"),
    Internal(key="llama_attention_attn", package="mindformers", checked=_MF,
             target="mindformers.models.llama.llama_transformer.LLamaAttention._attn",
             relied_on="the mask is added to the scores over the keys' axis, so prefix columns given 0 are visible",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(), guard=_SOURCE_TEST,
             source_sha256="1cc3b5cd6dc95016bab4c385b0448c099c01eee5cc9ced953e422f8e476eacfa"),
    Internal(key="llama_attention_attributes", package="mindformers", checked=_MF,
             target="mindformers.models.llama.llama_transformer.LLamaAttention",
             relied_on="an instance has use_past, n_kv_head, head_dim and hidden_size (the adapter's geometry)",
             sites=("pet_hooks/tuners/prefix/attention.py",), names=(),
             guard=_COMPAT_TEST + "test_llama_attention_has_what_the_adapter_reads"),
    # ---------------------------------------------------------------- Cell bookkeeping
    Internal(key="cell_params_and_cells", package="mindspore", checked=_MS, target="mindspore.nn.Cell",
             relied_on="a Parameter attribute lives in cell._params and a sub-cell in cell._cells (not in __dict__), "
                       "cell._params_list exists, and delattr removes either",
             sites=("pet_hooks/tuners/common.py", "pet_hooks/doors/flow.py"), names=("_params", "_cells", "_params_list"),
             guard=_COMPAT_TEST + "test_cell_keeps_parameters_and_children_where_pet_hooks_looks"),
    Internal(key="wrapper_children", package="mindspore", checked=_MS, target="mindspore.nn.WithLossCell",
             relied_on="WithLossCell holds the model as the child '_backbone'; TrainOneStepCell "
                       "holds the loss cell as the child 'network' and has an 'optimizer'",
             sites=("pet_hooks/doors/flow.py",), names=("_backbone", "_cells"),
             guard=_COMPAT_TEST + "test_wrappers_hold_the_model_where_unwrap_model_looks"),
    # ---------------------------------------------------------------- the optimizer follows: a built optimizer holds its own parameter list
    Internal(key="opt_init_args_register", package="mindspore", checked=_MS,
             target="mindspore.nn.optim.optimizer.opt_init_args_register",
             relied_on="the decorator hides __init__'s signature behind (self, *args, **kwargs) without "
                       "functools.wraps and keeps the original __init__ in its closure (training.recorder.init_signature)",
             sites=("pet_hooks/doors/flow.py",), names=(),
             guard=_COMPAT_TEST + "test_optimizer_signatures_are_found_through_the_decorator",
             source_sha256="5b39fcbcfb7e8f19b09ef2eb08aeb4f6b303588494a76753f94f47a36928952d"),
    Internal(key="optimizer_new", package="mindspore", checked=_MS, target="mindspore.nn.Cell.__new__",
             relied_on="nn.Optimizer defines no __new__ of its own and nn.Cell.__new__(cls, *args, **kwargs) "
                       "accepts the constructor's arguments, so the recorder installed as nn.Optimizer.__new__ "
                       "sees them",
             sites=("pet_hooks/training/recorder.py",), names=(),
             guard=_COMPAT_TEST + "test_optimizer_recorder_sees_the_constructor_arguments"),
    Internal(key="train_step_construct", package="mindspore", checked=_MS,
             target="mindspore.nn.TrainOneStepCell.construct",
             relied_on="with sens, the train step reads self.weights and self.optimizer on every call (so replacing "
                       "both before the first compile trains only the new optimizer's parameters)",
             sites=("pet_hooks/doors/flow.py", "pet_hooks/doors/callback.py"), names=(),
             guard=_COMPAT_TEST + "test_train_step_reads_the_attributes_the_callback_replaces",
             source_sha256="b08a065d5ff4aec936772f1e41a42e57097984ed08e8d5616e2b93b8e25d29b3"),
    Internal(key="train_step_no_sens", package="mindspore", checked=_MS,
             target="mindspore.nn.TrainOneStepCell._no_sens_impl",
             relied_on="without sens (the default), the same: self.weights and self.optimizer read on every call",
             sites=("pet_hooks/doors/flow.py", "pet_hooks/doors/callback.py"), names=(),
             guard=_COMPAT_TEST + "test_train_step_reads_the_attributes_the_callback_replaces",
             source_sha256="ed11afdbf57f0a69e805e5ef577483e12db16b5ebd36b07d688d8357a73058d3"),
    # ---------------------------------------------------------------- one compiled graph per repeated block
    Internal(key="lazy_inline_marker", package="mindspore", checked=_MS,
             target="mindspore.graph.lazy_inline.lazy_inline",
             relied_on="what @lazy_inline(policy='front') leaves on an instance, and all the front end reads: "
                       "cell_init_args (stored as _cell_init_args) starting 'lazy_inline_' and no_inline = False",
             sites=("pet_hooks/surgery/graph_reuse.py",), names=("_cell_init_args",), guard=_SOURCE_TEST,
             # 2.10.0 turns three placeholder-less f-strings of error messages into plain strings
             source_sha256={"2.9.0": "6b9d0ef775502c471746020a8062fde1f56ee7d8621a0448a0869cfdfe929abb",
                            "2.10.0": "5fcea045bfb07e9fd2bd3f85df65999c26cd7890b4f3fb34a80752f9a3fbaf65"}),
    Internal(key="lazy_inline_reuse_key", package="mindspore", checked=_MS,
             target="mindspore.graph._parse.parser.get_object_key",
             relied_on="cells of one class with the same cell_init_args get one key, so the parser builds their "
                       "graph once and reuses it",
             sites=("pet_hooks/surgery/graph_reuse.py",), names=(),
             guard="tests/surgery/test_graph_reuse.py::test_graph_mode_parses_the_block_once_and_reuses_it_for_the_others",
             source_sha256="16007f4b49e1ca74fc9d79c2d2fdd4fceae567b70be3e6f53b7ef6bd4e4fe542"),
    Internal(key="train_step_attributes", package="mindspore", checked=_MS, target="mindspore.nn.TrainOneStepCell",
             relied_on="an instance has optimizer, weights (is optimizer.parameters) and reducer_flag; in data "
                       "parallel also mean and degree, which rebuild its DistributedGradReducer over new weights; "
                       "with return_grad, weights_name names the gradients it returns, in weights' order",
             sites=("pet_hooks/doors/flow.py",), names=(),
             guard=_COMPAT_TEST + "test_train_step_reads_the_attributes_the_callback_replaces"),
)

# pet_hooks' own private names that appear as strings (marks it sets on foreign objects, a
# folder name): not internals of another package, listed so the source scan accepts them.
OWN_PRIVATE_NAMES: Dict[str, str] = {
    "_pet_hooks_state": "surgery: the PetState record kept on an adapted net",
    "_pet_hooks_patched": "patching: the mark on what pet_hooks installed",
    "_ms_compat": "__init__: the module the lazily loaded UncheckedVersionWarning comes from",
    "_bootstrap": "launcher: the folder of the child-process sitecustomize",
}


def by_key(key: str) -> Internal:
    for entry in REGISTRY:
        if entry.key == key:
            return entry
    raise KeyError(key)


def checked_versions() -> Dict[str, List[Internal]]:
    """package -> its entries (each carries the version it was checked against)."""
    result: Dict[str, List[Internal]] = {}
    for entry in REGISTRY:
        if entry.package != "pet_hooks":
            result.setdefault(entry.package, []).append(entry)
    return result


def installed_version(package: str) -> Optional[str]:
    """The version of ``package`` if it is imported in this process, else None (nothing is imported here)."""
    module = sys.modules.get(package)
    if module is None:
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(package)
        except Exception:  # pylint: disable=broad-except
            return None
    return str(version)


def resolve(target: str):
    """The object at dotted path ``target`` (the longest importable module, then attributes)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {target}")


def normalised_source(obj) -> str:
    """The code of ``obj`` without its formatting, comments and docstrings (``ast.unparse`` text).

    What a copy depends on is the computation, not its layout: reformatting or re-commenting
    upstream does not fail the pin; any change of a statement, name or argument does.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def source_hash(target: str) -> str:
    """SHA-256 of the normalised source of the object at ``target``."""
    return hashlib.sha256(normalised_source(resolve(target)).encode("utf-8")).hexdigest()


def version_key(version: str) -> Tuple:
    """Sort key of a version string: numeric parts as numbers ("2.9.0" before "2.10.0")."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in version.split("."))


def expected_hashes(entry: Internal, installed: Optional[str]) -> Dict[str, str]:
    """checked version -> hash that the installed source of ``entry`` may have.

    On a checked version only that version's hash; on another (or unknown) one, any checked
    version's: its source then "reads as at" that version, which is what the warning reports.
    """
    recorded = entry.recorded_hashes()
    if installed in recorded:
        return {installed: recorded[installed]}
    return recorded


def source_drift(package: Optional[str] = None) -> List[Tuple[Internal, str]]:
    """(entry, what is wrong) for every pinned source of ``package`` (all when None) that differs.

    The installed source is compared with the hash recorded for the installed version, or, when
    that version was not checked, with the hash of every checked version (see :func:`expected_hashes`).
    Only packages already imported are looked at: importing MindFormers costs seconds.
    """
    drift = []
    for entry in REGISTRY:
        if entry.source_sha256 is None or (package is not None and entry.package != package):
            continue
        if entry.package not in sys.modules:
            continue
        expected = expected_hashes(entry, installed_version(entry.package))
        try:
            now = source_hash(entry.target)
        except Exception as err:  # pylint: disable=broad-except
            drift.append((entry, f"cannot read its source ({type(err).__name__}: {err})"))
            continue
        if now not in expected.values():
            checked = ", ".join(f"{h[:12]}... at {v}" for v, h in sorted(expected.items(),
                                                                        key=lambda item: version_key(item[0])))
            drift.append((entry, f"source hash {now[:12]}... differs from the checked {checked}"))
    return drift


def _main() -> None:
    """Print every entry's current source hash against the installed version's recorded one (what to
    paste, per version, after checking a copy against a new version)."""
    for entry in REGISTRY:
        if entry.source_sha256 is None:
            continue
        try:
            importlib.import_module(entry.package)
        except ImportError:
            print(f"{entry.package} (not installed) {entry.key:28s}")
            continue
        installed = installed_version(entry.package)
        try:
            now = source_hash(entry.target)
        except Exception as err:  # pylint: disable=broad-except
            print(f"{entry.key:28s} {'UNREADABLE':10s} ({type(err).__name__}: {err})  {entry.target}")
            continue
        expected = expected_hashes(entry, installed)
        if installed in entry.checked:
            state = "ok" if now in expected.values() else "CHANGED"
        else:
            same = [v for v, h in expected.items() if h == now]
            state = f"as {same[0]}" if same else "CHANGED"
        print(f"{entry.package} {installed} {entry.key:28s} {state:10s} {now}  {entry.target}")


if __name__ == "__main__":
    _main()
