"""save_adapter / load_adapter: the files, the round trip in both modes, atomic writes, and bad adapters."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mindspore import Tensor, nn
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks.io import adapter_io
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import GPT_LORA, SMALL, assert_params_equal

CFG = {**GPT_LORA, "lora_alpha": 8}


def _gpt(seed=0):
    return build(seed=seed, **SMALL)


def _ids(rng, batch=2):
    return Tensor(rng.integers(0, 256, (batch, SMALL["seq_length"])).astype(np.int32))


def _train(net, rng, steps=3):
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
    step.set_train(True)
    for _ in range(steps):
        step(_ids(rng), _ids(rng))
    step.set_train(False)


def test_round_trip_into_a_fresh_net(mode, rng, tmp_path):
    net = _gpt()
    pet_hooks.apply(net, CFG)
    _train(net, rng)
    x = _ids(rng)
    trained = net(x).asnumpy()
    pet_hooks.save_adapter(net, tmp_path / "adapter")

    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["pet_config"]["lora_rank"] == 4 and meta["base_model_class"].endswith("TinyGPT")
    assert meta["pet_hooks_version"] == pet_hooks.__version__
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(p.name for p in pet_hooks.delta_parameters(net))  # only the deltas
    for param in pet_hooks.delta_parameters(net):
        np.testing.assert_array_equal(tensors[param.name], param.asnumpy())
    assert pet_hooks.load_config(str(tmp_path / "adapter" / "adapter_config.json")) == pet_hooks.load_config(CFG)

    fresh = _gpt()                                # same base weights, no PET yet
    base = fresh(x).asnumpy()
    assert not np.allclose(base, trained)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")  # applies the saved config first
    np.testing.assert_allclose(fresh(x).asnumpy(), trained, atol=1e-6)
    assert sorted(p.name for p in fresh.trainable_params()) == sorted(tensors)


def test_load_into_a_net_that_already_has_the_same_pet(mode, rng, tmp_path):
    net = _gpt()
    pet_hooks.apply(net, CFG)
    _train(net, rng, steps=2)
    pet_hooks.save_adapter(net, tmp_path)
    other = pet_hooks.apply(_gpt(), {**CFG, "seed": 99})  # seed only changes the init
    ours, theirs = pet_hooks.delta_parameters(net), pet_hooks.delta_parameters(other)
    assert len(ours) == len(theirs) == 12 and [p.name for p in ours] == [p.name for p in theirs]
    assert not any(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(ours, theirs) if a.name.endswith("lora_A"))
    pet_hooks.load_adapter(other, tmp_path)
    for a, b in zip(ours, pet_hooks.delta_parameters(other)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)


def test_freeze_exclude_params_travel_with_the_adapter(mode, rng, tmp_path):
    net = _gpt()
    pet_hooks.apply(net, {**CFG, "freeze_exclude": ["ln_f.*"]})
    _train(net, rng, steps=2)
    pet_hooks.save_adapter(net, tmp_path)
    assert {"ln_f.gamma", "ln_f.beta"} <= set(load_file(str(tmp_path / "adapter_model.safetensors")))
    fresh = _gpt()
    assert not np.array_equal(fresh.ln_f.gamma.asnumpy(), net.ln_f.gamma.asnumpy())  # training moved it
    pet_hooks.load_adapter(fresh, tmp_path)
    np.testing.assert_array_equal(fresh.ln_f.gamma.asnumpy(), net.ln_f.gamma.asnumpy())
    np.testing.assert_array_equal(fresh.ln_f.beta.asnumpy(), net.ln_f.beta.asnumpy())


def test_save_is_atomic(rng, tmp_path, monkeypatch):
    net = pet_hooks.apply(_gpt(), CFG)
    for param in pet_hooks.delta_parameters(net):                  # the previous adapter: non-zero values
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    previous = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}
    pet_hooks.save_adapter(net, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    net.blocks[0].attention.dense1.lora_B.set_data(Tensor(np.ones((16, 4), np.float32)))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(adapter_io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        pet_hooks.save_adapter(net, tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no temp left
    loaded = pet_hooks.load_adapter(_gpt(), tmp_path)       # the previous adapter is still complete
    assert sorted(p.name for p in pet_hooks.delta_parameters(loaded)) == sorted(previous)
    for param in pet_hooks.delta_parameters(loaded):
        np.testing.assert_array_equal(param.asnumpy(), previous[param.name], err_msg=param.name)


def _saved(tmp_path, rng):
    net = pet_hooks.apply(_gpt(), CFG)
    _train(net, rng, steps=1)
    pet_hooks.save_adapter(net, tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


# Damaged adapters (missing, truncated or corrupt files, wrong shapes and dtypes, configs for
# another method or model): the consolidated table in tests/project/test_bad_input.py.


def test_adapter_for_a_different_config_than_applied(rng, tmp_path):
    _saved(tmp_path, rng)
    net = pet_hooks.apply(_gpt(), {**CFG, "lora_rank": 2})
    deltas = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}
    with pytest.raises(ValueError, match="different PET config"):
        pet_hooks.load_adapter(net, tmp_path)
    assert_params_equal(deltas, net)


def test_missing_directory_and_save_without_pet(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pet_hooks.load_adapter(_gpt(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no PET applied"):
        pet_hooks.save_adapter(_gpt(), tmp_path)
