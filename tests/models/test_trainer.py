"""MindFormers' Trainer with pet_hooks on the CPU: PetCallback beside it, and a Trainer built inside enable()."""
from __future__ import annotations

import os

import numpy as np
import pytest

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, ROOT, assert_params_equal, snapshot

pytestmark = NEEDS_MINDFORMERS
YAML = os.path.join(ROOT, "samples", "configs", "llama_lora.yaml")


def _lora_b_moved(net):
    return all(np.abs(p.asnumpy()).sum() > 0 for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_B"))


def test_trainer_with_pet_callback(mode, tmp_path):
    from mindformers import Trainer
    from tests.trainer_yaml import mindformers_context
    mindformers_context(mode)       # else the Trainer builds MindFormers' context mid-run, in PyNative mode
    from samples.llama_train import build_llama
    from samples.trainer_cpu import token_dataset, training_arguments
    net = build_llama(YAML)
    base = snapshot(net)
    trainer = Trainer(model=net, args=training_arguments(str(tmp_path / "out")),
                      train_dataset=token_dataset(6, net.config.seq_length + 1, 2),
                      callbacks=[pet_hooks.PetCallback(YAML, save_dir=str(tmp_path / "adapter"))])
    trainer.train()
    assert_params_equal(base, net)
    assert _lora_b_moved(net) and len(pet_hooks.delta_parameters(net)) == 16
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))   # the trained deltas
    assert sorted(saved) == sorted(p.name for p in pet_hooks.delta_parameters(net))
    for param in pet_hooks.delta_parameters(net):
        np.testing.assert_array_equal(saved[param.name], param.asnumpy(), err_msg=param.name)


def test_trainer_built_inside_enable(mode, tmp_path):
    from mindformers import Trainer
    from tests.trainer_yaml import mindformers_context
    mindformers_context(mode)
    from samples.llama_train import build_llama
    from samples.trainer_cpu import token_dataset, training_arguments
    with pet_hooks.enable(YAML) as session:
        net = build_llama(YAML)
        base = snapshot(net)
        trainer = Trainer(model=net, args=training_arguments(str(tmp_path / "out")),
                          train_dataset=token_dataset(6, net.config.seq_length + 1, 2))
        trainer.train()
    assert session.models == [net]
    assert_params_equal(base, net, names=[n for n in base if ".lora_" not in n])
    assert _lora_b_moved(net)


def test_default_trainer_wrapper_cannot_run_on_cpu(tmp_path):
    """Documents why the CPU wrapper is needed: if this starts passing, the README's note is stale."""
    from mindformers import Trainer
    from samples.llama_train import build_llama
    from samples.trainer_cpu import token_dataset, training_arguments
    net = build_llama(YAML)
    trainer = Trainer(model=net, args=training_arguments(str(tmp_path / "out"), wrapper_type="MFTrainOneStepCell"),
                      train_dataset=token_dataset(2, net.config.seq_length + 1, 2),
                      callbacks=[pet_hooks.PetCallback(YAML)])
    with pytest.raises(RuntimeError, match="NPUGetFloatStatusV2"):
        trainer.train()
