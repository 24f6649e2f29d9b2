"""Every front door on the mcore Qwen3: load_config on its run YAML, PetCallback with Model.train,
enable(), the launcher, inspect, and adapters saved and loaded back.

The model is ``TrainingQwen3ForCausalLM`` with the CPU stand-ins of ``tests/mcore_cpu.py``, built
from ``samples/configs/qwen3_lora.yaml`` (a MindFormers run YAML with ``use_legacy: False``) by
``tests/mcore_train.py``, the unmodified ``Model.train`` script the launcher and inspect run. Graph
mode only (the mcore layers run through ``Morph``, which is graph-mode only).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, ROOT, assert_params_equal, snapshot
from tests.mcore_train import LossOf, batches, build_qwen3

YAML = os.path.join(ROOT, "samples", "configs", "qwen3_lora.yaml")
TARGETS = ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"
DELTAS = 2 * 4 * 2          # 2 layers x 4 projections x (A, B)


pytestmark = [NEEDS_MINDFORMERS, pytest.mark.usefixtures("mcore_graph_mode")]   # graph mode, use_legacy False


def _logits(net, seed=7):
    net.set_train(False)
    ids = Tensor(np.random.default_rng(seed).integers(0, 97, (2, 8)).astype(np.int32))
    return net(ids).asnumpy()


def _base_names(net):
    return [p.name for p in net.get_parameters() if ".lora_" not in p.name and not p.name.endswith("pet_lora_scale")]


def test_load_config_reads_the_qwen3_run_yaml():
    cfg = pet_hooks.load_config(YAML)                    # use_legacy: False and arch: beside it are fine
    assert (cfg.pet_type, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules) == ("lora", 4, 8, TARGETS)


def test_callback_with_model_train_then_the_adapter_loads_into_a_fresh_model(tmp_path):
    net = build_qwen3(YAML)
    before = snapshot(net)
    data = ds.GeneratorDataset(batches(3, 2, 8, 97), ["input_ids", "labels"], shuffle=False)
    # the callback before the optimizer, as its error says: it installs the recorder that keeps AdamWeightDecay's
    # arguments (built first, the test passed only after another test in the process had installed it)
    callback = pet_hooks.PetCallback(YAML, save_dir=str(tmp_path / "adapter"))
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)   # the script's: every weight
    Model(LossOf(net), optimizer=optimizer).train(1, data, callbacks=[callback], dataset_sink_mode=False)
    deltas = pet_hooks.delta_parameters(net)
    assert len(deltas) == DELTAS and all(".lora_" in p.name for p in deltas)
    assert all(np.abs(p.asnumpy()).max() > 0 for p in deltas if p.name.endswith("lora_B"))   # B moved
    assert_params_equal(before, net, _base_names(net))   # the base is untouched
    trained = _logits(net)

    fresh = build_qwen3(YAML)
    assert np.abs(_logits(fresh) - trained).max() > 1e-5
    pet_hooks.load_adapter(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(_logits(fresh), trained)
    pet_hooks.remove(fresh)
    assert_params_equal(before, fresh, _base_names(fresh))


def test_enable_hands_the_optimizer_only_the_deltas():
    with pet_hooks.enable(YAML) as session:
        net = build_qwen3(YAML)
        optimizer = nn.Adam(net.get_parameters(), learning_rate=1e-2)
        assert session.models == [net]
        assert [p.name for p in optimizer.parameters] == [p.name for p in pet_hooks.delta_parameters(net)]
        assert len(optimizer.parameters) == DELTAS
        net.set_train(True)

        def forward(ids):
            return net(ids, labels=ids)[0]

        ids = Tensor(np.random.default_rng(0).integers(0, 97, (2, 8)).astype(np.int32))
        _, grads = ms.value_and_grad(forward, None, optimizer.parameters)(ids)
        optimizer(grads)                                 # a step, so that the gradient guard stays quiet


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pet_hooks", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_the_launcher_trains_an_unmodified_qwen3_script(tmp_path):
    ckpt = tmp_path / "after.ckpt"
    out = _run("run", "--config", YAML, "--save-dir", str(tmp_path / "ad"), "tests/mcore_train.py",
               "--yaml", YAML, "--steps", "3", "--save-ckpt", str(ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    saved = ms.load_checkpoint(str(ckpt))
    from safetensors.numpy import load_file
    adapter = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(k for k in saved if ".lora_" in k) and len(adapter) == DELTAS
    for name, value in adapter.items():
        np.testing.assert_array_equal(value, saved[name].asnumpy())
    for param in build_qwen3(YAML).get_parameters():    # the base weights the script saved are the untrained ones
        np.testing.assert_array_equal(saved[param.name].asnumpy(), param.asnumpy(), err_msg=param.name)


def test_inspect_reports_the_mcore_projections():
    out = _run("inspect", "--config", YAML, "--json", "tests/mcore_train.py", "--yaml", YAML)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["model"].endswith("TrainingQwen3ForCausalLM")
    matched = {m["path"]: (m["type"], m["in"], m["out"]) for m in report["matched"]}
    assert matched["model.decoder.layers.0.self_attention.linear_qkv"] == ("ColumnParallelLinear", 32, 64)
    assert matched["model.decoder.layers.1.mlp.linear_fc2"] == ("RowParallelLinear", 64, 32)
    assert len(matched) == 8
    assert [(m["path"], m["in"], m["out"]) for m in report["near_misses"]] == [("model.output_layer", 32, 97)]


def test_enable_without_config_takes_over_mindformers_get_pet_model_on_qwen3():
    """What build_network (the Trainer's) does with the run YAML's pet_config, inside enable(): pet_hooks'
    LoRA on the model itself. (build_network itself builds the PyNative Qwen3 class on this install, which
    needs the hyper_parallel package, so the call it makes is made here.)"""
    import mindformers.pet
    from mindformers import MindFormerConfig
    block = MindFormerConfig(YAML).model.model_config.pet_config
    plain = build_qwen3(YAML)
    net = build_qwen3(YAML)
    original = mindformers.pet.get_pet_model
    with pet_hooks.enable() as session:
        got = mindformers.pet.get_pet_model(net, block)
    assert got is net and session.models == [net]
    assert pet_hooks.surgery.get_state(net).config == pet_hooks.load_config(YAML)
    assert len(pet_hooks.delta_parameters(net)) == DELTAS and not any("mindpet" in p.name for p in net.get_parameters())
    assert sorted(_base_names(net)) == sorted(p.name for p in plain.get_parameters())
    np.testing.assert_allclose(_logits(net), _logits(plain), rtol=1e-6, atol=1e-6)   # B is zero
    assert mindformers.pet.get_pet_model is original                                  # MindFormers' own again


def test_pet_method_default_targets_of_the_mcore_family():
    from pet_hooks.config.default_targets import config_for_method, family_of
    net = build_qwen3(YAML)
    assert family_of(net) == "mcore"
    cfg = config_for_method(net, "lora")
    assert cfg.target_modules == ".*linear_qkv|.*linear_proj"
    pet_hooks.apply(net, cfg)
    adapted = sorted({p.name.rsplit(".", 2)[-2] for p in pet_hooks.delta_parameters(net)})
    assert adapted == ["linear_proj", "linear_qkv"]
