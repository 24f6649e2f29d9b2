"""PEFT-format adapters for the mcore Qwen3 (``name_map="qwen3"``), against transformers + PEFT.

A tiny random Qwen3 is made in Hugging Face's names; MindFormers' own converter
(``TrainingQwen3ForCausalLM.convert_weight_dict``: q/k/v into the fused ``linear_qkv``, gate/up
into the interleaved ``linear_fc1``) loads it into the patched mcore model (``tests/mcore_cpu.py``).
pet_hooks LoRA on every projection is saved in PEFT's format; ``transformers.Qwen3ForCausalLM``
with the same weights and the adapter loaded by ``peft.PeftModel`` must give the same logits, and
an adapter PEFT made itself (q/k/v and gate/up sharing their A) loads into the mcore model and
gives PyTorch's logits. PyTorch runs in its own process (``tests/peft_reference_qwen3.py``).

Tolerance: MindFormers' attention rounds queries, keys and values to float16 (FlashAttention's
input dtype, kept on the CPU), PyTorch computes in float32.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from mindspore import Tensor

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, NEEDS_TORCH_PEFT
from tests.mcore_cpu import TINY, tiny_qwen3
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
CFG = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"}
H, F, N, G, D, V, L = 32, 64, 4, 2, 8, 97, 2       # the TINY geometry


pytestmark = [NEEDS_MINDFORMERS, NEEDS_TORCH_PEFT, pytest.mark.usefixtures("mcore_graph_mode")]


def hf_weights(seed=0) -> dict:
    """A random Qwen3 in Hugging Face's names (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, H)), "model.norm.weight": 1 + 0.1 * rng.normal(size=H),
         "lm_head.weight": rng.normal(0, 0.2, (V, H))}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (N * D, H)),
                  p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (G * D, H)),
                  p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (G * D, H)),
                  p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (H, N * D)),
                  p + "self_attn.q_norm.weight": 1 + 0.1 * rng.normal(size=D),
                  p + "self_attn.k_norm.weight": 1 + 0.1 * rng.normal(size=D),
                  p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=H),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=H),
                  p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (F, H)),
                  p + "mlp.up_proj.weight": rng.normal(0, 0.2, (F, H)),
                  p + "mlp.down_proj.weight": rng.normal(0, 0.2, (H, F))})
    return {k: v.astype(np.float32) for k, v in w.items()}


def mcore_qwen3_with(hf: dict):
    """The patched tiny mcore Qwen3 holding ``hf``'s weights, converted by MindFormers' own converter."""
    net = tiny_qwen3()
    converted = net.convert_weight_dict(dict(hf), qkv_dict={}, condition=threading.Condition())
    params = {p.name: p for p in net.get_parameters()}
    assert set(converted) == set(params)
    for name, value in converted.items():
        params[name].set_data(Tensor(np.asarray(value, np.float32)))
    return net


def logits(net, ids):
    net.set_train(False)
    return net(Tensor(ids)).asnumpy().reshape(ids.shape[0], ids.shape[1], V)


def test_qwen3_adapters_in_peft_format_agree_with_transformers_and_peft(tmp_path):
    hf = hf_weights()
    ids = np.random.default_rng(3).integers(0, V, (2, 8)).astype(np.int32)
    net = pet_hooks.apply(mcore_qwen3_with(hf), CFG)
    base = logits(net, ids)
    rng = np.random.default_rng(1)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.2))
    ours = logits(net, ids)
    pet_hooks.save_adapter(net, str(tmp_path / "ours"), format="peft", name_map="qwen3")
    saved = json.load(open(tmp_path / "ours" / "adapter_config.json", encoding="utf-8"))
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                               "v_proj"]

    job = {"vocab_size": V, "hidden_size": H, "intermediate_size": F, "num_layers": L, "num_heads": N,
           "num_kv_heads": G, "head_dim": D, "rms_norm_eps": TINY["rms_norm_eps"],
           "rope_theta": float(net.config.rope_theta), "max_position_embeddings": TINY["max_position_embeddings"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    np.savez(tmp_path / "base.npz", **hf)
    np.save(tmp_path / "ids.npy", ids)
    out = run_reference([os.path.join(HERE, "peft_reference_qwen3.py"), str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    scale = np.abs(base).max()
    tol = 2e-3 * scale                                   # float16 q/k/v in MindFormers' attention
    np.testing.assert_allclose(base, np.load(tmp_path / "torch_base.npy"), atol=tol)      # the conversion
    assert np.abs(ours - base).max() > 20 * tol                                          # the adapter shows
    np.testing.assert_allclose(ours, np.load(tmp_path / "torch_ours.npy"), atol=tol)

    fresh = mcore_qwen3_with(hf)                          # PEFT's own adapter into the mcore model
    pet_hooks.load_adapter(fresh, str(tmp_path / "theirs"), name_map="qwen3")
    theirs = np.load(tmp_path / "torch_theirs.npy")
    assert np.abs(theirs - np.load(tmp_path / "torch_base.npy")).max() > 20 * tol
    np.testing.assert_allclose(logits(fresh, ids), theirs, atol=tol)


def test_separate_a_for_a_fused_cell_is_refused_naming_it(tmp_path):
    """PEFT LoRAs on q/k/v with different A's are no rank-r LoRA on the fused linear_qkv."""
    net = pet_hooks.apply(tiny_qwen3(), CFG)
    rng = np.random.default_rng(2)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    pet_hooks.save_adapter(net, str(tmp_path / "ad"), format="peft", name_map="qwen3")
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    fresh = tiny_qwen3()
    with pytest.raises(pet_hooks.AdapterFileError, match=r"q_proj and .*k_proj have different lora_A.*"
                                                         r"model\.decoder\.layers\.1\.self_attention\.linear_qkv"):
        pet_hooks.load_adapter(fresh, str(tmp_path / "ad"), name_map="qwen3")
    assert not any(".lora_" in p.name for p in fresh.get_parameters())
