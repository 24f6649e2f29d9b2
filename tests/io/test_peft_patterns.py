"""``rank_pattern`` / ``alpha_pattern`` in Hugging Face PEFT's files, through the Llama name map and by hand.

PEFT matches the keys against *its* module names, so pet_hooks writes one entry per cell whose rank or
alpha is not the default, under that cell's PEFT module name (whatever the name map); reading, each module
of the file takes its rank and alpha by PEFT's rule on its PEFT name, and the config holds them under our
cell paths. The MindFormers Llama comparison with PyTorch uses tests/peft_reference.py (its own process).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import pet_hooks
from pet_hooks.errors import AdapterFileError
from pet_hooks.surgery.core import get_state, has_pet
from pet_hooks.tuners.lora.peft_layout import LoraPeftLayout
from tests.conftest import HAS_TORCH_PEFT, NEEDS_MINDFORMERS
from tests.io.test_peft_format import (HERE, LLAMA_ALL, llama_ids, llama_logits, llama_with_weights, randomize,
                                       write_reference_job)
from tests.nets import SIZES, ThreeLayers
from tests.unchanged import unchanged
from tests.torch_runner import run_reference

LLAMA_PATTERNS = {**LLAMA_ALL, "rank_pattern": {"wq": 2, r"layers\.1\.attention\.wv": 6},
                  "alpha_pattern": {"w2": 4}}
#: PEFT's own adapter (q_proj, v_proj; r=4, lora_alpha=16 in tests/peft_reference.py) with PEFT-name keys
THEIRS_FIELDS = {"rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6}, "alpha_pattern": {"v_proj": 8}}


@NEEDS_MINDFORMERS
@pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
def test_llama_patterns_through_the_name_map_equal_pytorch_peft_both_ways(tmp_path, mode):
    net = llama_with_weights()
    ids = llama_ids(3)
    write_reference_job(net, ids, tmp_path)
    (tmp_path / "theirs_fields.json").write_text(json.dumps(THEIRS_FIELDS))
    base = llama_logits(net, ids)
    pet_hooks.apply(net, LLAMA_PATTERNS)
    assert tuple(net.model.layers[1].attention.wv.lora_A.shape) == (6, 32)
    assert tuple(net.model.layers[0].attention.wq.lora_A.shape) == (2, 32)
    randomize(pet_hooks.delta_parameters(net), seed=9, scale=0.2)
    ours = llama_logits(net, ids)
    pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
    doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert doc["r"] == 4 and doc["lora_alpha"] == 8
    assert doc["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2,
                                   "model.layers.1.self_attn.v_proj": 6}
    assert doc["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 4, "model.layers.1.mlp.down_proj": 4}
    out = run_reference([os.path.join(HERE, "peft_reference.py"), str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    torch_ours, torch_theirs = (np.load(tmp_path / f"torch_{k}.npy") for k in ("ours", "theirs"))
    assert np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, torch_ours, rtol=1e-4, atol=1e-5)          # PEFT ran our file: our logits

    back = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "ours")        # and so do we
    np.testing.assert_allclose(llama_logits(back, ids), ours, rtol=1e-5, atol=1e-5)

    theirs_doc = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert theirs_doc["rank_pattern"] == THEIRS_FIELDS["rank_pattern"]
    fresh = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "theirs")      # PEFT's keys, PEFT's names
    cfg = get_state(fresh).config
    ranks = {p.name: tuple(p.shape)[0] for p in pet_hooks.delta_parameters(fresh) if p.name.endswith("lora_A")}
    assert ranks == {"model.layers.0.attention.wq.lora_A": 2, "model.layers.1.attention.wq.lora_A": 2,
                     "model.layers.0.attention.wv.lora_A": 4, "model.layers.1.attention.wv.lora_A": 6}
    assert cfg.for_module("model.layers.0.attention.wv").scaling == 8 / 4
    assert cfg.for_module("model.layers.1.attention.wv").scaling == 8 / 6
    np.testing.assert_allclose(llama_logits(fresh, ids), torch_theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- by hand, on the three layers
def _write_peft(directory, ranks, **fields):
    """A PEFT directory for ThreeLayers with lora_A [r, in] / lora_B [out, r] of ``ranks`` (layer -> r)."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": list(ranks),
           "bias": "none", "task_type": None, **fields}
    (directory / "adapter_config.json").write_text(json.dumps(doc))
    rng = np.random.default_rng(0)
    tensors = {}
    for layer, r in ranks.items():
        din, dout = SIZES[layer]
        tensors[f"base_model.model.{layer}.lora_A.weight"] = rng.standard_normal((r, din)).astype(np.float32)
        tensors[f"base_model.model.{layer}.lora_B.weight"] = rng.standard_normal((dout, r)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def test_a_peft_key_matching_no_module_is_ignored_with_a_warning_as_peft_does(tmp_path, caplog):
    path = _write_peft(tmp_path / "ad", {"k": 2, "v": 5}, rank_pattern={"v": 5, "nothing": 3},
                       alpha_pattern={"^k": 1})
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        net = pet_hooks.load_adapter(ThreeLayers(), path)
    assert "['nothing'] match no module" in caplog.text
    cfg = get_state(net).config
    assert (cfg.for_module("v").lora_rank, cfg.for_module("k").lora_alpha, cfg.for_module("v").lora_alpha) == (5, 1, 4)
    assert cfg.rank_pattern == {"v": 5} and cfg.alpha_pattern == {"k": 1}       # our paths (escaped)


@pytest.mark.parametrize("fields,words", [
    ({"rank_pattern": {"v": "5"}}, ["adapter_config.json", "rank_pattern['v']", "'5'"]),
    ({"rank_pattern": ["v"]}, ["adapter_config.json", "rank_pattern", "['v']"]),
    ({"alpha_pattern": {"v": 0}}, ["adapter_config.json", "alpha_pattern['v']", "got 0"]),
    ({"rank_pattern": {"(": 5}}, ["adapter_config.json", "rank_pattern", "'('"]),
    ({"rank_pattern": {"v": 3}}, ["lora_A", "(5, 10)", "(3, 10)"]),          # the file's shapes disagree
])
def test_bad_peft_patterns_name_the_field_and_leave_the_net(tmp_path, fields, words):
    net = ThreeLayers()
    path = _write_peft(tmp_path / "bad", {"k": 2, "v": 5}, **fields)
    with unchanged(net, path):
        with pytest.raises(ValueError) as err:
            pet_hooks.load_adapter(net, path)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not has_pet(net)


def test_fused_cells_write_each_part_and_refuse_parts_of_different_ranks():
    layout = LoraPeftLayout()
    cfg = pet_hooks.load_config({"pet_type": "lora", "lora_rank": 4, "target_modules": ".*",
                                 "rank_pattern": {"linear_qkv": 2}})
    mapped = {"l.0.linear_qkv#0": "l.0.q_proj", "l.0.linear_qkv#1": "l.0.k_proj", "l.0.fc1": "l.0.up_proj"}
    assert layout.module_fields([], mapped, None, cfg=cfg) == {
        "rank_pattern": {"l.0.k_proj": 2, "l.0.q_proj": 2}, "alpha_pattern": {}}
    doc = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, "k_proj": 2}}
    read = layout.config_from_modules(doc, {"l.0.q_proj": "l.0.linear_qkv", "l.0.k_proj": "l.0.linear_qkv"})
    assert read.for_module("l.0.linear_qkv").lora_rank == 2
    with pytest.raises(AdapterFileError, match="'l.0.k_proj' and 'l.0.q_proj' are parts of one cell 'l.0.linear_qkv'"):
        layout.config_from_modules({**doc, "rank_pattern": {"q_proj": 2}},
                                   {"l.0.q_proj": "l.0.linear_qkv", "l.0.k_proj": "l.0.linear_qkv"})


@NEEDS_MINDFORMERS
@pytest.mark.usefixtures("mcore_graph")
def test_a_fused_mcore_cell_writes_each_part_under_its_peft_name(tmp_path):
    """mcore Qwen3's fused linear_qkv is three PEFT modules (q/k/v_proj sharing A): a pattern on it is written
    for each part, and read back (the parts agree) as the cell's own rank."""
    from tests.mcore_cpu import tiny_qwen3
    cfg = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*linear_qkv|.*linear_fc2",
           "rank_pattern": {r"layers\.1\.self_attention\.linear_qkv": 2}, "alpha_pattern": {"linear_fc2": 2}}
    net = pet_hooks.apply(tiny_qwen3(), cfg)
    randomize(pet_hooks.delta_parameters(net), seed=4, scale=0.2)
    ids = np.random.default_rng(3).integers(0, 97, (2, 8)).astype(np.int32)
    from mindspore import Tensor
    net.set_train(False)
    expected = net(Tensor(ids)).asnumpy()
    pet_hooks.save_adapter(net, tmp_path / "hf", format="peft", name_map="qwen3")
    doc = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert doc["rank_pattern"] == {f"model.layers.1.self_attn.{m}_proj": 2 for m in "qkv"}
    assert doc["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 2 for i in range(2)}
    fresh = pet_hooks.load_adapter(tiny_qwen3(), tmp_path / "hf")
    ranks = {p.name: tuple(p.shape)[0] for p in pet_hooks.delta_parameters(fresh) if p.name.endswith("lora_A")}
    assert sorted(ranks.values()) == [2, 4, 4, 4] and all(
        r == 2 for name, r in ranks.items() if "layers.1.self_attention.linear_qkv" in name), ranks
    fresh.set_train(False)
    np.testing.assert_allclose(fresh(Tensor(ids)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
