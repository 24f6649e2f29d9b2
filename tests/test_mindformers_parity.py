"""pet_hooks LoRA against MindFormers' own LoRA (mindformers.pet.get_pet_model) on LlamaForCausalLM.

Same base weights, same LoRA weights: the loss and the gradient of every delta must agree.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import pet_hooks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mindformers") is None,
                                reason="mindformers is not installed")
CFG = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}


def tiny_llama():
    from mindformers import LlamaConfig, LlamaForCausalLM
    ms.set_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_layers=2, hidden_size=32, num_heads=4, vocab_size=64, seq_length=8, intermediate_size=64,
        use_flash_attention=False, use_past=False, compute_dtype="float32", param_init_type="float32",
        layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
        use_rope_slice=True, fused_rms_norm=False, batch_size=2))


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
        if ".lora_" not in param.name:
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
