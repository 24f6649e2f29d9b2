"""LoRA on a tiny mcore Qwen3-MoE (``TrainingQwen3MoeForCausalLM``, 4 experts, top-2): one A/B pair per expert.

The routed experts are one ``FFNGroupedGEMM`` cell; pet_hooks adds each expert's delta to the
weights it hands its Morph (``pet_hooks/tuners/lora/experts.py``). On the CPU the Morph and the
router's top-k are test stand-ins (``tests/mcore_cpu.py``: every expert on every token, weighted by
the router), which compute with whatever weights the experts cell passes them.

The reference is the unadapted model with each expert's ``(B_e @ A_e)^T * scaling`` added to
``weight1`` / ``weight2`` in NumPy (PEFT's per-expert LoRA, merged by hand). Graph mode only.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.mcore_cpu import TINY, adam_losses, cpu_stand_ins

E, H, FFN, V, R = 4, 32, 16, 97, 4
EXPERTS = {"pet_type": "lora", "lora_rank": R, "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": ".*experts"}


pytestmark = [NEEDS_MINDFORMERS, pytest.mark.usefixtures("mcore_graph_mode")]   # graph mode, use_legacy False


def tiny_qwen3_moe():
    from mindformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from mindformers.models.qwen3_moe.modeling_qwen3_moe_train import TrainingQwen3MoeForCausalLM
    ms.set_seed(0)
    config = Qwen3MoeConfig(**{**TINY, "num_experts": E, "num_experts_per_tok": 2, "moe_intermediate_size": FFN,
                               "moe_grouped_gemm": True, "routed_scaling_factor": 1.0})
    return cpu_stand_ins(TrainingQwen3MoeForCausalLM(config))


def logits(net, ids):
    net.set_train(False)
    return net(Tensor(ids)).asnumpy()


def random_deltas(net, seed=0):
    rng = np.random.default_rng(seed)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.2))


def test_expert_lora_equals_the_base_model_with_each_expert_merged_by_hand():
    ids = np.random.default_rng(1).integers(0, V, (2, 8)).astype(np.int32)
    net, reference = tiny_qwen3_moe(), tiny_qwen3_moe()
    base = logits(reference, ids)
    pet_hooks.apply(net, EXPERTS)
    experts = net.model.decoder.layers[0].mlp.experts
    assert type(experts).__name__ == "LoraGroupedExperts_of_FFNGroupedGEMM"
    shapes = {p.name: p.shape for p in pet_hooks.delta_parameters(net)}
    assert shapes["model.decoder.layers.0.mlp.experts.weight1.lora_A"] == (E, R, H)
    assert shapes["model.decoder.layers.0.mlp.experts.weight1.lora_B"] == (E, 2 * FFN, R)
    assert shapes["model.decoder.layers.1.mlp.experts.weight2.lora_A"] == (E, R, FFN)
    assert shapes["model.decoder.layers.1.mlp.experts.weight2.lora_B"] == (E, H, R)
    assert len(shapes) == 2 * 4
    np.testing.assert_array_equal(logits(net, ids), base)            # B starts at zero

    random_deltas(net)
    deltas = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    scaling = 6 / R
    params = {p.name: p for p in reference.get_parameters()}
    for layer in range(2):
        for weight in ("weight1", "weight2"):
            prefix = f"model.decoder.layers.{layer}.mlp.experts.{weight}"
            a, b = deltas[prefix + ".lora_A"], deltas[prefix + ".lora_B"]
            stored = params[f"decoder.layers.{layer}.mlp.experts.{weight}"]
            per_expert = stored.asnumpy().reshape(E, -1, stored.shape[1])            # [E, in, out]
            merged = per_expert + scaling * np.stack([(b[e] @ a[e]).T for e in range(E)])
            stored.set_data(Tensor(merged.reshape(stored.shape).astype(np.float32)))
    expected = logits(reference, ids)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(logits(net, ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _merged_by_hand(net) -> dict:
    """parameter name -> (the Parameter, its value with the deltas folded in NumPy, the fold) for every adapted
    weight: each expert's ``s (B_e A_e)^T`` into ``weight1`` / ``weight2`` ([E * in, out]), ``s B A`` into qkv's W."""
    deltas = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}
    scaling = EXPERTS["lora_alpha"] / R
    out = {}
    for layer in range(2):
        experts = net.model.decoder.layers[layer].mlp.experts
        for weight in ("weight1", "weight2"):
            prefix = f"model.decoder.layers.{layer}.mlp.experts.{weight}"
            a, b = deltas[prefix + ".lora_A"], deltas[prefix + ".lora_B"]
            param = getattr(experts, weight)
            value = param.asnumpy().copy()
            delta = scaling * np.stack([(b[e] @ a[e]).T for e in range(E)]).reshape(value.shape)
            out[param.name] = (param, value + delta, delta)
        qkv = net.model.decoder.layers[layer].self_attention.linear_qkv
        assert qkv.transpose_b                                        # W as [out, in]
        delta = scaling * deltas[f"model.decoder.layers.{layer}.self_attention.linear_qkv.lora_B"] @ \
            deltas[f"model.decoder.layers.{layer}.self_attention.linear_qkv.lora_A"]
        out[qkv.weight.name] = (qkv.weight, qkv.weight.asnumpy().copy() + delta, delta)
    return out


def test_expert_lora_trains_merges_saves_and_removes(tmp_path):
    ids = np.random.default_rng(2).integers(0, V, (2, 8)).astype(np.int32)
    net = tiny_qwen3_moe()
    before, classes = snapshot(net), {path: type(cell) for path, cell in net.cells_and_names()}
    base = logits(net, ids)
    pet_hooks.apply(net, dict(EXPERTS, target_modules=".*experts|.*linear_qkv"))
    losses = adam_losses(net, Tensor(ids), lr=1e-2)
    assert losses[-1] < losses[0]
    moved = [p.name for p in pet_hooks.delta_parameters(net) if ".lora_B" in p.name and np.abs(p.asnumpy()).max() > 0]
    assert len(moved) == 2 * 2 + 2                                   # both expert weights and qkv, each layer
    assert_params_equal(before, net)                                 # the base is untouched
    adapted = logits(net, ids)
    rtol, atol = 1e-4, 1e-5                                          # merged against adapted logits, below
    assert np.abs(adapted - base).max() > 20 * (atol + rtol * np.abs(adapted).max())   # the trained adapter shows
    pet_hooks.save_adapter(net, str(tmp_path / "adapter"))
    with pytest.raises(pet_hooks.PetStateError, match=r"layers\.0\.mlp\.experts.*FFNGroupedGEMM.*PEFT"):
        pet_hooks.save_adapter(net, str(tmp_path / "peft"), format="peft")
    fresh = tiny_qwen3_moe()
    pet_hooks.load_adapter(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(logits(fresh, ids), adapted)
    expected = _merged_by_hand(fresh)
    pet_hooks.merge(fresh)                                           # folded into weight1 / weight2 (and qkv's W)
    for name, (weight, value, delta) in expected.items():
        assert np.abs(delta).max() > 20 * 1e-6, name                  # the deltas are there to be seen
        np.testing.assert_allclose(weight.asnumpy(), value, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(logits(fresh, ids), adapted, rtol=rtol, atol=atol)
    pet_hooks.unmerge(fresh)
    for name, (weight, value, delta) in expected.items():
        np.testing.assert_allclose(weight.asnumpy(), value - delta, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(logits(fresh, ids), adapted, rtol=rtol, atol=atol)

    pet_hooks.remove(net)
    assert {path: type(cell) for path, cell in net.cells_and_names()} == classes
    assert_params_equal(before, net)
    np.testing.assert_array_equal(logits(net, ids), base)


def test_petcallback_with_model_train_trains_the_experts_deltas(tmp_path):
    import mindspore.dataset as ds
    from mindspore.train import Model
    from tests.mcore_train import LossOf, batches
    net = tiny_qwen3_moe()
    before = snapshot(net)
    data = ds.GeneratorDataset(batches(3, 2, 8, V), ["input_ids", "labels"], shuffle=False)
    # the callback before the optimizer, as its error says: it installs the recorder that keeps AdamWeightDecay's
    # arguments (built first, the test passed only after another test in the process had installed it)
    callback = pet_hooks.PetCallback(EXPERTS, save_dir=str(tmp_path / "adapter"))
    optimizer = ms.nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)     # every weight, as scripts do
    Model(LossOf(net), optimizer=optimizer).train(1, data, callbacks=[callback], dataset_sink_mode=False)
    deltas = pet_hooks.delta_parameters(net)
    assert len(deltas) == 2 * 4
    assert all(np.abs(p.asnumpy()).max() > 0 for p in deltas if ".lora_B" in p.name)   # every expert weight moved
    assert_params_equal(before, net)                                                    # the base did not
    fresh = tiny_qwen3_moe()
    pet_hooks.load_adapter(fresh, str(tmp_path / "adapter"))
    ids = np.random.default_rng(3).integers(0, V, (2, 8)).astype(np.int32)
    np.testing.assert_array_equal(logits(fresh, ids), logits(net, ids))
