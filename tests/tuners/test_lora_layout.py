"""The tensor-parallel layout of LoRA, checked structurally: mcore projections and the legacy ``Linear``.

Tensor parallelism cannot run on the CPU (``semi_auto_parallel`` refuses the CPU backend), so
this test sets a parallel config (tensor-parallel 2, data-parallel 2) on a tiny Qwen3, lets each
base projection lay itself out with MindFormers' own ``shard()`` (the layouts its ``Morph`` gets
under semi-auto parallel), applies LoRA and checks every LoRA primitive's strategy against what the
base layout implies:

* ``x @ A^T``: the token rows split as the base input's rows, ``x``'s features and A's input
  columns split as the base weight's input dimension (a split contracted dimension: the reduce
  the row-parallel base does too), A's rank rows never split;
* ``h @ B^T``: B's output rows split as the base weight's output dimension, its rank columns never.

So for a column-parallel base A is replicated and B split along the output like the weight; for
a row-parallel base A is split along the input like the weight and B replicated.

On MindFormers' legacy ``LlamaForCausalLM`` the reference is MindFormers' own legacy LoRA, which
reads the same from each ``Linear``'s matmul strategy when it runs under (semi-)auto parallel.
"""
from __future__ import annotations

import math

import pytest
import mindspore as ms

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS
from tests.nets import tiny_llama
from tests.mcore_cpu import mcore_context, restore_legacy_context, tiny_qwen3

pytestmark = NEEDS_MINDFORMERS
DP, TP = 2, 2
TARGETS = ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"


@pytest.fixture
def parallel_tiny_qwen3():
    """A tiny Qwen3 whose TransformerConfig says dp=2, tp=2, and MindFormers' layout manager set for it.

    The layout manager is a process-wide singleton that caches the first config it saw; its state is
    put back afterwards so that later models are laid out for one device again.
    """
    from mindformers.parallel_core.training_graph.device_matrix import layout
    mcore_context()
    net = tiny_qwen3()
    names = ("_layout", "_layout_type", "_config")
    saved = {name: layout.__dict__[name] for name in names if name in layout.__dict__}
    config = net.model.config
    config.data_parallel_size, config.tensor_model_parallel_size = DP, TP
    for name in names:
        setattr(layout, name, None)
    try:
        layout.init_layout(config)
        yield net
    finally:
        for name in names:
            if name in saved:
                setattr(layout, name, saved[name])
            else:
                delattr(layout, name)
        restore_legacy_context()


def _splits(layout_dict) -> tuple:
    """A Layout's per-dimension split counts (tensor_map entries index the device matrix from the right)."""
    matrix = layout_dict["device_matrix"]

    def split(entry):
        entries = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(1 if e == -1 else matrix[len(matrix) - 1 - e] for e in entries)

    return tuple(split(entry) for entry in layout_dict["tensor_map"])


def _implied(base) -> tuple:
    """The LoRA strategies the base projection's own layout implies: ((x, A), (h, B))."""
    base.shard()                                             # MindFormers' layout for this projection
    x_layout, w_layout = base.morphed_forward.in_layout[:2]
    x_splits, w_splits = _splits(x_layout), _splits(w_layout)
    rows = math.prod(x_splits[:-1])                          # [S, B, h] -> rows S * B
    w_out, w_in = w_splits if base.transpose_b else w_splits[::-1]
    assert x_splits[-1] == w_in                              # the base contracts like-split dimensions
    return ((rows, w_in), (1, w_in)), ((rows, 1), (w_out, 1))


def test_lora_primitives_are_laid_out_as_the_base_projection(parallel_tiny_qwen3):
    net = parallel_tiny_qwen3
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "lora_dropout": 0.1, "target_modules": TARGETS})
    adapted = [(path, cell) for path, cell in net.cells_and_names() if hasattr(cell, "pet_lora_matmul_a")]
    assert len(adapted) == 8
    seen = set()
    for path, cell in adapted:
        strategy_a, strategy_b = _implied(cell)
        assert cell.pet_lora_matmul_a.in_strategy == strategy_a, path
        assert cell.pet_lora_matmul_b.in_strategy == strategy_b, path
        assert cell.lora_dropout.dropout.in_strategy == (strategy_a[0],), path
        seen.add((type(cell).__name__.split("_of_")[1], strategy_a, strategy_b))
    # what that means, spelled out: column-parallel B split like the weight, row-parallel A split like it
    assert seen == {("ColumnParallelLinear", ((DP, 1), (1, 1)), ((DP, 1), (TP, 1))),
                    ("RowParallelLinear", ((DP, TP), (1, TP)), ((DP, 1), (1, 1)))}


def test_the_strategy_checkpoint_keeps_the_base_weights(parallel_tiny_qwen3, tmp_path):
    """The seed's rule on the mcore model: apply turns only_trainable_params off, remove puts it back."""
    files = {"save_file": str(tmp_path / "strategy.ckpt")}
    ms.set_auto_parallel_context(strategy_ckpt_config={**files, "only_trainable_params": True})
    try:
        pet_hooks.apply(parallel_tiny_qwen3, {"pet_type": "lora", "lora_rank": 4, "target_modules": TARGETS})
        assert ms.get_auto_parallel_context("strategy_ckpt_config")["only_trainable_params"] is False
        pet_hooks.remove(parallel_tiny_qwen3)
        assert ms.get_auto_parallel_context("strategy_ckpt_config")["only_trainable_params"] is True
    finally:
        ms.reset_auto_parallel_context()


def _sharded_llama():
    """A tiny legacy Llama whose Linears carry the strategies Llama gives them under semi-auto parallel."""
    net = tiny_llama()
    for layer in net.model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        for cell in (attention.wq, attention.wk, attention.wv, ffn.w1, ffn.w3):     # column-parallel
            cell.shard(((DP, 1), (TP, 1)))
        for cell in (attention.wo, ffn.w2):                                         # row-parallel
            cell.shard(((DP, TP), (1, TP)))
    return net


def test_legacy_linear_lora_is_laid_out_as_mindformers_legacy_lora(monkeypatch, tmp_path):
    import mindformers.pet.tuners.lora_adapter as adapter
    from mindformers.pet import get_pet_model
    cfg = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1,
           "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}
    ours = pet_hooks.apply(_sharded_llama(), cfg)
    monkeypatch.chdir(tmp_path)                                   # PetModel writes output/adapter_config.json
    # MindFormers' legacy LoRA copies the strategies only when it sees (semi-)auto parallel, which the
    # CPU cannot run: let it believe it does.
    monkeypatch.setattr(adapter, "_is_in_auto_parallel_mode", lambda: True)
    theirs = get_pet_model(_sharded_llama(), dict(cfg))
    their_cells = {path.split("model.layers.", 1)[1]: cell for path, cell in theirs.cells_and_names()
                   if hasattr(cell, "lora_a_matmul")}
    our_cells = {path.split("model.layers.", 1)[1]: cell for path, cell in ours.cells_and_names()
                 if hasattr(cell, "pet_lora_matmul_a")}
    assert len(our_cells) == 2 * 7 and set(our_cells) == set(their_cells)
    for path, cell in our_cells.items():
        theirs_cell = their_cells[path]
        assert cell.pet_lora_matmul_a.in_strategy == theirs_cell.lora_a_matmul.in_strategy, path
        assert cell.pet_lora_matmul_b.in_strategy == theirs_cell.lora_b_matmul.in_strategy, path
        assert cell.lora_dropout.dropout.in_strategy == theirs_cell.lora_dropout.dropout.in_strategy, path
    wo = our_cells["0.attention.wo"]
    assert (wo.pet_lora_matmul_a.in_strategy, wo.pet_lora_matmul_b.in_strategy) == (
        ((DP, TP), (1, TP)), ((DP, 1), (1, 1)))


def test_legacy_linear_without_a_strategy_gets_unsharded_primitives():
    net = pet_hooks.apply(tiny_llama(), {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*wq"})
    wq = net.model.layers[0].attention.wq
    assert getattr(wq.pet_lora_matmul_a, "in_strategy", None) is None
    pet_hooks.remove(net)
    assert not hasattr(wq, "pet_lora_matmul_a")


def tiny_deepseek_v3():
    """A 2-layer DeepSeek-V3 (MLA attention, layer 1 MoE with 4 routed experts and a shared expert); built, not run."""
    from mindformers.models.deepseek3.configuration_deepseek_v3 import DeepseekV3Config
    from mindformers.models.deepseek3.modeling_deepseek_v3_train import TrainingDeepseekV3ForCausalLM
    ms.set_seed(0)
    return TrainingDeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_nextn_predict_layers=0, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
        n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
        seq_length=8, batch_size=2, compute_dtype="float32", params_dtype="float32",
        layernorm_compute_dtype="float32", softmax_compute_dtype="float32", rotary_dtype="float32",
        hidden_dropout=0.0, moe_grouped_gemm=True))


def test_deepseek_v3_projections_and_experts_are_adapted_and_laid_out_as_their_base():
    """DeepSeek-V3's MLA projections (ColumnParallelLinear, SequenceParallelLinear, RowParallelLinear), its shared
    experts and routed experts: adapted; every projection's LoRA laid out as its own shard() implies, and the
    routed experts' delta matmul split along the experts as FFNGroupedGEMM.shard splits their weights (ep=2)."""
    from mindformers.parallel_core.training_graph.device_matrix import layout, layout_moe
    mcore_context()
    net = tiny_deepseek_v3()
    names = ("_layout", "_layout_type", "_config")
    saved = {name: layout.__dict__[name] for name in names if name in layout.__dict__}
    saved_moe = {name: layout_moe.__dict__[name] for name in names if name in layout_moe.__dict__}
    config = net.model.config
    # the MoE layer's cells hold copies of the TransformerConfig: the parallel sizes go into every one
    for cfg in {id(c.config): c.config for _, c in net.cells_and_names() if hasattr(c, "config")}.values():
        if hasattr(cfg, "tensor_model_parallel_size"):
            cfg.data_parallel_size, cfg.tensor_model_parallel_size, cfg.expert_model_parallel_size = DP, TP, 2
    for name in names:
        setattr(layout, name, None)
        setattr(layout_moe, name, None)
    try:
        layout.init_layout(config)
        layout_moe.init_layout(config)
        pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4,
                              "target_modules": r".*self_attention\.linear_\w+|.*linear_fc1|.*linear_fc2|.*mlp\.experts"})
        adapted = {path: type(cell).__name__.split("_of_")[1] for path, cell in net.cells_and_names()
                   if getattr(type(cell), "pet_hooks_lora", False)}
        assert adapted["model.decoder.layers.1.self_attention.linear_qkv"] == "SequenceParallelLinear"
        assert adapted["model.decoder.layers.1.self_attention.linear_qb"] == "ColumnParallelLinear"
        assert adapted["model.decoder.layers.1.mlp.shared_experts.linear_fc2"] == "SequenceParallelLinear"
        assert adapted["model.decoder.layers.1.mlp.experts"] == "FFNGroupedGEMM"
        assert adapted["model.decoder.layers.0.mlp.linear_fc2"] == "RowParallelLinear"
        for path, cell in net.cells_and_names():
            if hasattr(cell, "pet_lora_matmul_a"):
                strategy_a, strategy_b = _implied(cell)
                assert cell.pet_lora_matmul_a.in_strategy == strategy_a, path
                assert cell.pet_lora_matmul_b.in_strategy == strategy_b, path
        experts = net.model.decoder.layers[1].mlp.experts
        experts.shard(experts.config)                       # MindFormers' layout of weight1 / weight2
        w1_split, w2_split = (_splits(experts.morphed_forward.in_layout[i])[0] for i in (3, 4))
        assert w1_split == w2_split == 2
        assert experts.pet_lora_bmm.in_strategy == ((w1_split, 1, 1), (w1_split, 1, 1))
    finally:
        for manager, kept in ((layout, saved), (layout_moe, saved_moe)):
            for name in names:
                if name in kept:
                    setattr(manager, name, kept[name])
                else:
                    delattr(manager, name)
        restore_legacy_context()
