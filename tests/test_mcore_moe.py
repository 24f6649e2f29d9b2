"""LoRA on a tiny mcore Qwen3-MoE (``TrainingQwen3MoeForCausalLM``), structurally.

The routed experts are one ``FFNGroupedGEMM`` cell (all experts in two parameters, run by
``GroupedMatmul`` inside a ``Morph``): pet_hooks has no per-expert LoRA for it, and a pattern that
selects it is an error naming the cell and why. The attention projections of the MoE model are the
same ``ColumnParallelLinear`` / ``RowParallelLinear`` as Qwen3's and are adapted. The model's forward
is not run here: with this config it stops in the router (``moe_router_topk_scaling_factor`` is None,
``Mul(None, probs)``), and past it the experts need ``GroupedMatmul`` / ``Swiglu``, which were not
tried on the CPU. So this is checked on the structure: classes, deltas, and ``remove``.
"""
from __future__ import annotations

import pytest
import mindspore as ms

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.mcore_cpu import TINY, cpu_stand_ins, mcore_context, restore_legacy_context

pytestmark = NEEDS_MINDFORMERS


@pytest.fixture(autouse=True, scope="module")
def graph_mode_mcore_context():
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    mcore_context()
    yield
    restore_legacy_context()
    ms.set_context(mode=before)


def tiny_qwen3_moe():
    from mindformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from mindformers.models.qwen3_moe.modeling_qwen3_moe_train import TrainingQwen3MoeForCausalLM
    ms.set_seed(0)
    config = Qwen3MoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                               "moe_grouped_gemm": True})
    return cpu_stand_ins(TrainingQwen3MoeForCausalLM(config))


def test_grouped_experts_are_refused_naming_the_cell_and_attention_is_adapted():
    net = tiny_qwen3_moe()
    before = snapshot(net)
    classes = {path: type(cell) for path, cell in net.cells_and_names()}
    with pytest.raises(pet_hooks.UnsupportedCellError,
                       match=r"model\.decoder\.layers\.0\.mlp\.experts.*FFNGroupedGEMM.*GroupedMatmul.*per-expert LoRA"):
        pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*experts|.*linear_qkv"})
    assert {path: type(cell) for path, cell in net.cells_and_names()} == classes      # nothing changed

    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*linear_qkv|.*linear_proj"})
    adapted = sorted(p for p, c in net.cells_and_names() if getattr(type(c), "pet_hooks_lora", False))
    assert adapted == [f"model.decoder.layers.{i}.self_attention.{n}" for i in range(2)
                       for n in ("linear_proj", "linear_qkv")]
    assert len(pet_hooks.delta_parameters(net)) == 8
    pet_hooks.remove(net)
    assert {path: type(cell) for path, cell in net.cells_and_names()} == classes
    assert_params_equal(before, net)
