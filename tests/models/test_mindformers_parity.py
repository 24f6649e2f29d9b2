"""pet_hooks LoRA against MindFormers' own LoRA (mindformers.pet.get_pet_model) on LlamaForCausalLM.

Same base weights, same LoRA weights: the loss and the gradient of every delta must agree.
"""
from __future__ import annotations


import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import pet_hooks
from tests.nets import tiny_llama
from tests.conftest import NEEDS_MINDFORMERS, ROOT

pytestmark = NEEDS_MINDFORMERS
CFG = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}


def mindformers_name(name: str) -> str:
    return name.replace(".lora_A", ".mindpet_delta_lora_a").replace(".lora_B", ".mindpet_delta_lora_b")


def loss_and_grads(net, ids):
    params = net.trainable_params()

    def forward(x):
        return net(x)

    loss, grads = ms.value_and_grad(forward, None, params)(ids)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def test_same_loss_and_delta_gradients_as_mindformers_lora(mode):
    from mindformers.pet import get_pet_model
    ours = pet_hooks.apply(tiny_llama(), CFG)
    theirs = get_pet_model(tiny_llama(), dict(CFG))
    their_params = {p.name: p for p in theirs.get_parameters()}
    rng = np.random.default_rng(0)
    for param in pet_hooks.delta_parameters(ours):          # the same non-zero deltas in both
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
        their_params[mindformers_name(param.name)].set_data(param.data.copy())
    for param in ours.get_parameters():                     # and the same base weights
        if ".lora_" not in param.name and not param.name.endswith("pet_lora_scale"):   # (our on/off switch)
            np.testing.assert_array_equal(param.asnumpy(), their_params[param.name].asnumpy())
    assert sorted(mindformers_name(p.name) for p in ours.trainable_params()) == sorted(
        p.name for p in theirs.trainable_params())

    ids = Tensor(rng.integers(0, 64, (2, 9)).astype(np.int32))
    ours.set_train(True)
    theirs.set_train(True)
    our_loss, our_grads = loss_and_grads(ours, ids)
    their_loss, their_grads = loss_and_grads(theirs, ids)
    assert our_loss == pytest.approx(their_loss, rel=1e-6)
    assert len(our_grads) == 2 * 7 * 2
    for name, grad in our_grads.items():
        assert np.abs(grad).max() > 0, name
        np.testing.assert_allclose(grad, their_grads[mindformers_name(name)], rtol=1e-5, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------- checkpoints both ways
def _mindformers_lora_with_random_deltas(seed=1):
    from mindformers.pet import get_pet_model
    theirs = get_pet_model(tiny_llama(), dict(CFG))
    rng = np.random.default_rng(seed)
    for param in theirs.get_parameters():
        if "mindpet_delta" in param.name:
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    return theirs


def _logits(net, ids):
    net.set_train(False)
    return net(ids)[0].asnumpy()


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_load_a_mindformers_lora_checkpoint(mode, tmp_path, fmt):
    theirs = _mindformers_lora_with_random_deltas()
    ids = Tensor(np.random.default_rng(2).integers(0, 64, (2, 8)).astype(np.int32))
    expected = _logits(theirs, ids)
    path = str(tmp_path / f"mf_lora.{fmt}")
    if fmt == "ckpt":
        ms.save_checkpoint(theirs, path)                 # the whole model, as MindFormers saves it
    else:
        from safetensors.numpy import save_file
        save_file({p.name: p.asnumpy() for p in theirs.get_parameters() if "mindpet_delta" in p.name}, path)
    ours = tiny_llama()
    with pytest.raises(ValueError, match="carries no PET config"):
        pet_hooks.load_adapter(ours, path)
    assert not pet_hooks.surgery.has_pet(ours)
    pet_hooks.load_adapter(ours, path, cfg=CFG)
    np.testing.assert_allclose(_logits(ours, ids), expected, atol=1e-6)
    wrong_rank = tiny_llama()
    with pytest.raises(ValueError, match=r"model.layers.0.attention.wq.lora_A' has shape \(4, 32\).*\(2, 32\)"):
        pet_hooks.load_adapter(wrong_rank, path, cfg={**CFG, "lora_rank": 2})
    assert not pet_hooks.surgery.has_pet(wrong_rank)


def test_a_checkpoint_without_lora_tensors_is_refused(tmp_path):
    path = str(tmp_path / "plain.ckpt")
    ms.save_checkpoint(tiny_llama(), path)
    with pytest.raises(ValueError, match="plain.ckpt holds no MindFormers LoRA tensors"):
        pet_hooks.load_adapter(tiny_llama(), path, cfg=CFG)
    (tmp_path / "broken.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="broken.ckpt: not a readable checkpoint"):
        pet_hooks.load_adapter(tiny_llama(), str(tmp_path / "broken.ckpt"), cfg=CFG)


def test_merged_checkpoint_loads_into_plain_mindformers(mode, tmp_path):
    ours = pet_hooks.apply(tiny_llama(), CFG)
    rng = np.random.default_rng(3)
    for param in pet_hooks.delta_parameters(ours):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    ids = Tensor(rng.integers(0, 64, (2, 8)).astype(np.int32))
    adapted = _logits(ours, ids)
    before = {p.name: p.asnumpy().copy() for p in ours.get_parameters()}
    pet_hooks.save_merged_checkpoint(ours, str(tmp_path / "merged.ckpt"))
    for param in ours.get_parameters():                 # the net itself is untouched
        np.testing.assert_array_equal(param.asnumpy(), before[param.name])

    plain = tiny_llama()                                 # no pet_hooks on it
    not_loaded, _ = ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")))
    assert not not_loaded
    assert not any("lora" in name for name in ms.load_checkpoint(str(tmp_path / "merged.ckpt")))
    np.testing.assert_allclose(_logits(plain, ids), adapted, atol=1e-5, rtol=1e-5)


def test_seed_yamls_load_unchanged():
    import os
    configs = os.path.join(ROOT, "samples", "configs")
    gpt2 = pet_hooks.load_config(os.path.join(configs, "gpt2_lora_mindformers.yaml"))
    ptuning2 = pet_hooks.load_config(os.path.join(configs, "llama_ptuning2.yaml"))
    prefix = pet_hooks.load_config(os.path.join(configs, "llama_prefixtuning.yaml"))
    assert (gpt2.pet_type, gpt2.target_modules) == ("lora", ".*dense1|.*dense2|.*dense3")
    assert (ptuning2.pet_type, ptuning2.pre_seq_len, ptuning2.prefix_projection) == ("ptuning2", 16, False)
    assert (prefix.pet_type, prefix.prefix_token_num, prefix.mid_dim) == ("prefixtuning", 16, 128)
    assert ptuning2.model_hints == {"num_layers": 2, "num_heads": 4, "hidden_size": 64}


def test_a_pattern_that_matches_no_llama_cell_names_it_and_the_real_names():
    net = tiny_llama()
    values = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    with pytest.raises(ValueError) as info:
        pet_hooks.apply(net, {**CFG, "target_modules": ".*q_proj|.*v_proj"})   # Hugging Face names
    message = str(info.value)
    assert "'.*q_proj|.*v_proj' matches no cell of LlamaForCausalLM" in message
    assert all(name in message for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    assert not pet_hooks.surgery.has_pet(net)
    assert {p.name for p in net.get_parameters()} == set(values)
