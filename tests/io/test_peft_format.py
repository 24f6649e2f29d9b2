"""Hugging Face PEFT-format adapters: the files, round trips, the Llama name map, PyTorch's logits, bad input.

The comparison with PyTorch runs where torch, transformers and peft are installed (the
``interop`` extra): the same tiny Llama weights in MindFormers and in transformers, one
adapter written by pet_hooks and read by PEFT, one written by PEFT and read by pet_hooks.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

import pet_hooks
from pet_hooks.surgery.core import get_state, has_pet
from samples.tiny_gpt import build
from tests.conftest import HAS_TORCH_PEFT, NEEDS_MINDFORMERS, snapshot
from tests.unchanged import unchanged
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
LLAMA_ALL = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}
GPT_CFG = os.path.join(os.path.dirname(HERE), "samples", "configs", "lora.yaml")

# MindFormers -> Hugging Face parameter names, written out here as MindFormers'
# convert_reversed.py does it (an independent reference for the built-in name map).
HF_RENAMES = [("model.tok_embeddings.embedding_weight", "model.embed_tokens.weight"),
              (".attention.wq.", ".self_attn.q_proj."), (".attention.wk.", ".self_attn.k_proj."),
              (".attention.wv.", ".self_attn.v_proj."), (".attention.wo.", ".self_attn.o_proj."),
              (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w2.", ".mlp.down_proj."),
              (".feed_forward.w3.", ".mlp.up_proj."), (".attention_norm.", ".input_layernorm."),
              (".ffn_norm.", ".post_attention_layernorm."), ("model.norm_out.", "model.norm.")]


def hf_name(name: str) -> str:
    for ours, theirs in HF_RENAMES:
        name = name.replace(ours, theirs)
    return name


def randomize(params, seed: int, scale: float = 0.2) -> None:
    rng = np.random.default_rng(seed)
    for param in params:
        param.set_data(Tensor((rng.standard_normal(param.shape) * scale).astype(np.float32)))


def llama_with_weights():
    """tiny_llama with base weights large enough that attention and rotary matter."""
    from tests.nets import tiny_llama
    net = tiny_llama()
    randomize(net.get_parameters(), seed=3, scale=0.3)
    return net


def llama_ids(seed: int) -> np.ndarray:
    # No token 0: it is MindFormers' pad_token_id, masked out of attention there and not in transformers.
    return np.random.default_rng(seed).integers(1, 64, (2, 8)).astype(np.int32)


def llama_logits(net, ids) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(ids))[0].asnumpy()


def write_reference_job(net, ids: np.ndarray, directory) -> None:
    """What tests/peft_reference*.py read: the Llama's geometry, its weights under Hugging Face's names, the ids."""
    config = net.config
    job = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                           "num_heads", "rms_norm_eps", "theta", "seq_length")}
    (directory / "job.json").write_text(json.dumps(job))
    np.savez(directory / "base.npz", **{hf_name(p.name): p.asnumpy() for p in net.get_parameters()})
    np.save(directory / "ids.npy", ids)


def gpt_logits(net, ids) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(ids)).asnumpy()


# ----------------------------------------------------------------------------- the files
def test_peft_files_and_round_trip_on_the_sample_gpt(tmp_path, mode):
    net = pet_hooks.apply(build(seed=0), GPT_CFG)
    randomize(pet_hooks.delta_parameters(net), seed=1, scale=0.1)
    ids = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    expected = gpt_logits(net, ids)
    pet_hooks.save_adapter(net, tmp_path, format="peft", base_model_name_or_path="samples/tiny_gpt")

    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["peft_type"] == "LORA" and doc["task_type"] == "CAUSAL_LM" and doc["r"] == 8
    assert doc["lora_alpha"] == 16 and doc["lora_dropout"] == 0.0 and doc["use_rslora"] is False
    assert doc["bias"] == "none" and doc["fan_in_fan_out"] is False
    assert doc["base_model_name_or_path"] == "samples/tiny_gpt"
    assert doc["target_modules"] == ["dense1", "dense2", "dense3", "mapping", "projection"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as handle:
        assert handle.metadata() == {"format": "pt"}
        keys = set(handle.keys())
        for param in pet_hooks.delta_parameters(net):           # every delta, PEFT's key, same values
            path, ab = param.name.rsplit(".", 1)
            key = f"base_model.model.{path}.{ab}.weight"
            np.testing.assert_array_equal(handle.get_tensor(key), param.asnumpy())
            keys.discard(key)
    assert not keys

    fresh = build(seed=0)
    pet_hooks.load_adapter(fresh, tmp_path)                        # detected as PEFT, identity names
    np.testing.assert_allclose(gpt_logits(fresh, ids), expected, rtol=1e-5, atol=1e-6)
    assert get_state(fresh).config.lora_rank == 8 and get_state(fresh).config.lora_alpha == 16
    with pet_hooks.disable_adapters(fresh):                        # and it really is an adapter
        assert np.abs(gpt_logits(fresh, ids) - expected).max() > 1e-3


def test_target_modules_is_a_regex_when_the_last_names_would_select_more(tmp_path):
    net = pet_hooks.apply(build(seed=0), {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 2,
                                          "target_modules": r"blocks\.1\.attention\.dense1"})
    pet_hooks.save_adapter(net, tmp_path, format="peft")
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["target_modules"] == r"blocks\.1\.attention\.dense1"


@NEEDS_MINDFORMERS
def test_llama_name_map_both_ways(tmp_path, mode):
    net = pet_hooks.apply(llama_with_weights(), LLAMA_ALL)
    randomize(pet_hooks.delta_parameters(net), seed=5, scale=0.2)
    ids = llama_ids(1)
    expected = llama_logits(net, ids)
    pet_hooks.save_adapter(net, tmp_path, format="peft", name_map="llama")
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    wanted = {f"base_model.model.{hf_name(p.name.rsplit('.', 1)[0] + '.')}{p.name.rsplit('.', 1)[1]}.weight"
              for p in pet_hooks.delta_parameters(net)}
    assert set(saved) == wanted and len(wanted) == 2 * 7 * 2
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    fresh = llama_with_weights()
    pet_hooks.load_adapter(fresh, tmp_path)                          # the llama map is found
    np.testing.assert_allclose(llama_logits(fresh, ids), expected, rtol=1e-5, atol=1e-5)
    already = pet_hooks.apply(llama_with_weights(), LLAMA_ALL)       # into a net that has the LoRA already
    pet_hooks.load_adapter(already, tmp_path, name_map="llama")
    np.testing.assert_allclose(llama_logits(already, ids), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PyTorch
@NEEDS_MINDFORMERS
@pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
def test_same_logits_as_pytorch_peft_both_ways(tmp_path, mode):
    net = llama_with_weights()
    ids = llama_ids(2)
    write_reference_job(net, ids, tmp_path)
    base = llama_logits(net, ids)

    pet_hooks.apply(net, LLAMA_ALL)
    randomize(pet_hooks.delta_parameters(net), seed=6, scale=0.2)
    ours = llama_logits(net, ids)
    pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
    out = run_reference([os.path.join(HERE, "peft_reference.py"), str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    torch_base, torch_ours, torch_theirs = (np.load(tmp_path / f"torch_{k}.npy") for k in ("base", "ours", "theirs"))
    np.testing.assert_allclose(base, torch_base, rtol=1e-4, atol=1e-5)      # the same model to begin with
    assert np.abs(ours - base).max() > 1e-2                                 # the adapter changes the logits ...
    np.testing.assert_allclose(ours, torch_ours, rtol=1e-4, atol=1e-5)      # ... the same way in PyTorch
    print(f"max |logits MindSpore - PyTorch| with the adapter: {np.abs(ours - torch_ours).max():.2e}")

    fresh = llama_with_weights()                                           # PEFT's own adapter, read here
    pet_hooks.load_adapter(fresh, tmp_path / "theirs")
    assert sorted(p.name.rsplit(".", 2)[-2] for p in pet_hooks.delta_parameters(fresh))[::4] == ["wq", "wv"]
    theirs = llama_logits(fresh, ids)
    assert np.abs(theirs - base).max() > 1e-2
    np.testing.assert_allclose(theirs, torch_theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_a_name_map_leaving_a_cell_unmapped_names_it(tmp_path):
    net = pet_hooks.apply(build(seed=0), GPT_CFG)
    with unchanged(net, tmp_path / "ad"):
        with pytest.raises(ValueError, match=r"name_map 'llama' leaves cell 'blocks\.0\.attention\.dense1'.*"
                                             r"blocks\.0\.attention\.dense1\.lora_A"):
            pet_hooks.save_adapter(net, tmp_path / "ad", format="peft", name_map="llama")
    assert not (tmp_path / "ad").exists()
    pet_hooks.save_adapter(net, tmp_path / "ad")             # an adapter there already: the refusals keep it
    with unchanged(net, tmp_path / "ad"):
        with pytest.raises(ValueError, match="unknown name_map 'gpt9'.*llama"):
            pet_hooks.save_adapter(net, tmp_path / "ad", format="peft", name_map="gpt9")
        with pytest.raises(ValueError, match="maps both"):
            pet_hooks.save_adapter(net, tmp_path / "ad", format="peft", name_map=lambda path: "same")
        with pytest.raises(ValueError, match="leaves cell 'blocks.0.attention.dense1'"):
            pet_hooks.save_adapter(net, tmp_path / "ad", format="peft", name_map={"mlp.mapping": "mlp.fc_in"})


def _write_peft(directory, tensors, **fields):
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["c_attn"],
           "bias": "none", "task_type": "CAUSAL_LM"}
    doc.update(fields)
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    return directory


GPT2_KEYS = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((2, 64), np.float32),
             "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": np.zeros((192, 2), np.float32)}


def test_an_adapter_for_another_architecture_names_the_module(tmp_path):
    net = build(seed=0)
    before = snapshot(net)
    path = _write_peft(tmp_path / "gpt2", GPT2_KEYS)
    with unchanged(net, path):
        with pytest.raises(ValueError, match=r"module 'transformer\.h\.0\.attn\.c_attn'.*TinyGPT.*another architecture"):
            pet_hooks.load_adapter(net, path)
    assert not has_pet(net)
    assert len(net.trainable_params()) == len(before)


@pytest.mark.parametrize("fields,keys,words", [
    ({"peft_type": "BOFT"}, GPT2_KEYS, ["peft_type 'BOFT'", "LORA, IA3"]),
    ({"init_lora_weights": "loftq"}, GPT2_KEYS, ["adapter_config.json", "init_lora_weights", "loftq"]),
    ({"use_dora": True}, {"base_model.model.blocks.0.attention.dense1.lora_A.weight": np.zeros((2, 64), np.float32),
                          "base_model.model.blocks.0.attention.dense1.lora_B.weight": np.zeros((64, 2), np.float32)},
     ["no tensor", "blocks.0.attention.dense1.lora_magnitude_vector"]),
    ({}, {"base_model.model.blocks.0.attention.dense1.weight": np.zeros((2, 2), np.float32)},
     ["key 'base_model.model.blocks.0.attention.dense1.weight' is not a PEFT LoRA weight"]),
    ({}, {"base_model.model.blocks.0.attention.dense1.lora_A.weight": np.zeros((2, 64), np.float32)},
     ["module 'blocks.0.attention.dense1' has no lora_B.weight"]),
    ({}, {"base_model.model.blocks.0.attention.dense1.lora_A.weight": np.zeros((2, 63), np.float32),
          "base_model.model.blocks.0.attention.dense1.lora_B.weight": np.zeros((64, 2), np.float32)},
     ["blocks.0.attention.dense1.lora_A", "(2, 63)"]),
])
def test_bad_peft_directories_name_the_culprit_and_leave_the_net(tmp_path, fields, keys, words):
    net = build(seed=0)
    path = _write_peft(tmp_path / "bad", keys, **fields)
    with unchanged(net, path):
        with pytest.raises(ValueError) as err:
            pet_hooks.load_adapter(net, path)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not has_pet(net)


def test_a_different_scaling_on_an_adapted_net_is_refused(tmp_path):
    net = pet_hooks.apply(build(seed=0), GPT_CFG)
    pet_hooks.save_adapter(net, tmp_path / "ad", format="peft")
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    doc["lora_alpha"] = 32
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(doc))
    other = pet_hooks.apply(build(seed=0), GPT_CFG)
    with unchanged(other, tmp_path / "ad"):
        with pytest.raises(ValueError, match="scaling 4 .*lora_alpha=32"):
            pet_hooks.load_adapter(other, tmp_path / "ad")


def test_peft_only_options_are_refused_for_the_own_format(tmp_path):
    net = pet_hooks.apply(build(seed=0), GPT_CFG)
    for directory in (tmp_path / "new", tmp_path / "kept"):     # a directory to be made, one holding an adapter
        if directory.name == "kept":
            pet_hooks.save_adapter(net, directory)
        with unchanged(net, directory):
            with pytest.raises(ValueError, match="format='peft' only"):
                pet_hooks.save_adapter(net, directory, name_map="llama")
            with pytest.raises(ValueError, match="unknown adapter format 'hf'"):
                pet_hooks.save_adapter(net, directory, format="hf")


def _bf16_safetensors(path, tensors):
    """Write float32 arrays as a bfloat16 safetensors file by hand (NumPy has no bfloat16)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        blob = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_a_bfloat16_peft_adapter_is_read_exactly(tmp_path):
    rng = np.random.default_rng(4)
    path = "blocks.0.attention.dense1"
    # values that bfloat16 holds exactly: float32 with the low 16 bits cleared
    a = (rng.standard_normal((2, 64)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    b = (rng.standard_normal((64, 2)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    directory = _write_peft(tmp_path / "bf16", {"base_model.model.x.lora_A.weight": np.zeros((1, 1), np.float32)},
                            target_modules=["dense1"])
    _bf16_safetensors(os.path.join(directory, "adapter_model.safetensors"),
                      {f"base_model.model.{path}.lora_A.weight": a, f"base_model.model.{path}.lora_B.weight": b})
    net = pet_hooks.load_adapter(build(seed=0), directory)
    params = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    assert sorted(params) == [f"{path}.lora_A", f"{path}.lora_B"]
    np.testing.assert_array_equal(params[f"{path}.lora_A"], a)
    np.testing.assert_array_equal(params[f"{path}.lora_B"], b)
    assert get_state(net).config.scaling == 2.0


@NEEDS_MINDFORMERS
@pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
def test_the_interop_sample_prints_what_the_readme_shows(tmp_path):
    from samples.llama_train import build_llama
    yaml = os.path.join(os.path.dirname(HERE), "samples", "configs", "llama_lora.yaml")
    net = pet_hooks.apply(build_llama(yaml), yaml)
    randomize(pet_hooks.delta_parameters(net), seed=8, scale=0.1)
    pet_hooks.save_adapter(net, tmp_path / "ours")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "samples", "peft_interop.py"),
                          "--yaml", yaml, "--adapter", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "target_modules=['k_proj', 'o_proj', 'q_proj', 'v_proj']" in out.stdout
    assert "read back into MindSpore: max |logits difference| 0.0e+00" in out.stdout
    found = re.search(r"PyTorch \(transformers \+ peft\) vs MindSpore: \|logits difference\| max ([0-9.e+-]+)",
                      out.stdout)
    assert found and float(found.group(1)) < 1e-4, out.stdout
