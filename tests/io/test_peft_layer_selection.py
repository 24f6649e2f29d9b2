"""PEFT files and the selection options (``layers_to_transform`` / ``layers_pattern``, ``"all-linear"``,
``exclude_modules``), both ways, against PEFT 0.21.2 on the same MindFormers / Hugging Face Llama weights.

pet_hooks writes the cells it selected as PEFT's ``target_modules`` (the last names when they select
exactly those cells, else the full paths), so PEFT adapts the same modules and gives the same logits;
PEFT's adapters made with the options load here (through the ``llama`` name map), give PEFT's logits,
and adapt exactly the cells pet_hooks' own config with the same options (in MindFormers' names) selects.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import pet_hooks
from pet_hooks.matching.name_maps import resolve_name_map
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_TORCH_PEFT, NEEDS_MINDFORMERS
from tests.io.test_peft_format import llama_ids, llama_logits, llama_with_weights, randomize, write_reference_job
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the configs of tests/peft_reference_layers.py's THEIRS, written in pet_hooks' (MindFormers') names
OURS = {
    "layers": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ["wq", "wv", "w1"],
               "layers_to_transform": [1], "layers_pattern": "layers"},
    "all-linear": {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": "all-linear",
                   "exclude_modules": ["w2"]},
    "exclude-regex": {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 2, "target_modules": ["wq", "wk", "wo", "w3"],
                      "exclude_modules": r"model\.layers\.0\.attention\..*", "layers_to_transform": [0, 1]},
}


def cells_of(net):
    return sorted({p.name.rsplit(".", 1)[0] for p in pet_hooks.delta_parameters(net)})


@NEEDS_MINDFORMERS
def test_the_selection_writes_peft_targets_that_select_the_same_cells(tmp_path):
    net = pet_hooks.apply(llama_with_weights(), OURS["all-linear"])
    pet_hooks.save_adapter(net, tmp_path, format="peft", name_map="llama")
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    # all-linear but w2 (down_proj), without lm_head: the last names select exactly those
    assert doc["target_modules"] == ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert doc["layers_to_transform"] is None and doc["layers_pattern"] is None

    net = pet_hooks.apply(llama_with_weights(), OURS["layers"])
    pet_hooks.save_adapter(net, tmp_path / "layers", format="peft", name_map="llama")
    doc = json.loads((tmp_path / "layers" / "adapter_config.json").read_text())
    _, to_hf = resolve_name_map("llama")
    assert isinstance(doc["target_modules"], str)            # the full paths: the last names would pick layer 0 too
    assert sorted(doc["target_modules"].replace("\\", "").split("|")) == sorted(to_hf(p) for p in cells_of(net))


@NEEDS_MINDFORMERS
@pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
def test_same_modules_and_logits_as_pytorch_peft_both_ways(tmp_path, mode):
    ids = llama_ids(3)
    write_reference_job(llama_with_weights(), ids, tmp_path)
    _, to_hf = resolve_name_map("llama")
    ours = {}
    for index, (name, cfg) in enumerate(sorted(OURS.items())):
        net = pet_hooks.apply(llama_with_weights(), cfg)
        randomize(pet_hooks.delta_parameters(net), seed=20 + index, scale=0.2)
        ours[name] = (llama_logits(net, ids), [to_hf(p) for p in cells_of(net)], cells_of(net))
        pet_hooks.save_adapter(net, tmp_path / "ours" / name, format="peft", name_map="llama")
    out = run_reference([os.path.join(HERE, "peft_reference_layers.py"), str(tmp_path)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    base = np.load(tmp_path / "torch_base.npy")

    for name, (logits, modules, cells) in ours.items():           # ours, read by PEFT
        assert json.loads((tmp_path / f"modules_ours_{name}.json").read_text()) == sorted(modules), name
        assert np.abs(logits - base).max() > 1e-2
        np.testing.assert_allclose(logits, np.load(tmp_path / f"torch_ours_{name}.npy"), rtol=1e-4, atol=1e-5)

    for name, (_, _, cells) in ours.items():                       # PEFT's, read here
        theirs_dir = tmp_path / "theirs" / name
        doc = json.loads((theirs_dir / "adapter_config.json").read_text())
        assert any(doc.get(key) for key in ("layers_to_transform", "exclude_modules")), doc
        net = pet_hooks.load_adapter(llama_with_weights(), theirs_dir)
        # PEFT adapted exactly the cells pet_hooks' own config with the same options selects
        peft_modules = json.loads((tmp_path / f"modules_theirs_{name}.json").read_text())
        assert sorted(to_hf(p) for p in cells_of(net)) == peft_modules
        assert cells_of(net) == cells, name
        theirs = llama_logits(net, ids)
        assert np.abs(theirs - base).max() > 1e-2
        np.testing.assert_allclose(theirs, np.load(tmp_path / f"torch_theirs_{name}.npy"), rtol=1e-4, atol=1e-5)
        assert get_state(net).config.lora_rank == doc["r"]


@NEEDS_MINDFORMERS
@pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
def test_all_linear_on_the_mcore_qwen3_is_read_by_peft_as_the_same_adapter(tmp_path, mcore_graph):
    """The mcore projections under "all-linear" and a layer, through the qwen3 name map (fused q/k/v and
    gate/up split into PEFT's modules): PEFT on transformers' Qwen3 gives the same logits."""
    from tests.mcore_cpu import TINY
    from tests.models.test_mcore_peft import D, F, G, H, L, N, V, hf_weights, logits as qwen_logits, mcore_qwen3_with
    hf = hf_weights()
    ids = np.random.default_rng(4).integers(0, V, (2, 8)).astype(np.int32)
    net = pet_hooks.apply(mcore_qwen3_with(hf), {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                                                 "target_modules": "all-linear", "layers_to_transform": [1],
                                                 "exclude_modules": ["linear_proj"]})
    assert cells_of(net) == [f"model.decoder.layers.1.{leaf}" for leaf in
                             ("mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_qkv")]
    base = qwen_logits(net, ids)
    randomize(pet_hooks.delta_parameters(net), seed=8, scale=0.2)
    ours = qwen_logits(net, ids)
    pet_hooks.save_adapter(net, str(tmp_path / "ours"), format="peft", name_map="qwen3")
    job = {"vocab_size": V, "hidden_size": H, "intermediate_size": F, "num_layers": L, "num_heads": N,
           "num_kv_heads": G, "head_dim": D, "rms_norm_eps": TINY["rms_norm_eps"],
           "rope_theta": float(net.config.rope_theta), "max_position_embeddings": TINY["max_position_embeddings"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    np.savez(tmp_path / "base.npz", **hf)
    np.save(tmp_path / "ids.npy", ids)
    out = run_reference([os.path.join(HERE, "peft_reference_qwen3.py"), str(tmp_path)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    tol = 2e-3 * np.abs(base).max()                     # float16 q/k/v in MindFormers' attention (test_mcore_peft)
    assert np.abs(ours - base).max() > 20 * tol
    np.testing.assert_allclose(ours, np.load(tmp_path / "torch_ours.npy"), atol=tol)
