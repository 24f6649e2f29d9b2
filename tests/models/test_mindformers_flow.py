"""MindFormers' own flow inside the doors: a run YAML's pet_config, built by MindFormers' build_network (what
its Trainer and run_mindformer.py call), gets pet_hooks' PET; outside the doors MindFormers is itself.

Also ``Trainer(model=instance, pet_method=...)`` under a door, and the default targets per model family.
The Trainer on a complete run YAML (train, finetune, resume, parity with MindFormers' own PET) is in
tests/models/test_trainer_yaml.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.config.pet_config import PetConfigError, load_config
from pet_hooks.config.default_targets import config_for_method, family_of
from pet_hooks.surgery.core import get_state, has_pet
from tests.conftest import NEEDS_MINDFORMERS, ROOT, SMALL, assert_params_equal, snapshot

pytestmark = NEEDS_MINDFORMERS
CONFIGS = os.path.join(ROOT, "samples", "configs")
LORA_YAML = os.path.join(CONFIGS, "llama_lora.yaml")


def _doc(path=LORA_YAML):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def write_run_yaml(tmp_path, pet_config=None, name="run.yaml", **model_config):
    """llama_lora.yaml's model with another pet_config (None: none) and model_config entries."""
    doc = _doc()
    doc["model"]["model_config"].update(model_config)
    if pet_config is None:
        doc["model"]["model_config"].pop("pet_config")
    else:
        doc["model"]["model_config"]["pet_config"] = pet_config
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def build_from_yaml(path):
    """What MindFormers' Trainer and run_mindformer.py do with a run YAML's model section."""
    from mindformers import MindFormerConfig
    from mindformers.models import build_network
    ms.set_seed(0)
    return build_network(MindFormerConfig(path).model)


def plain_llama(path=LORA_YAML):
    from samples.llama_train import build_llama
    return build_llama(path)


def _train(net, steps=3, seed=0):
    """Model.train over an optimizer built over every parameter (the doors narrow it); the step losses."""
    seq = net.config.seq_length
    ids = np.random.default_rng(seed).integers(1, 256, (steps, 2, seq + 1)).astype(np.int32)
    data = ds.GeneratorDataset([(row,) for row in ids], ["input_ids"], shuffle=False)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
    Model(net, optimizer=optimizer).train(1, data, dataset_sink_mode=False)
    return optimizer


def _trainer(net, tmp_path, **kwargs):
    from mindformers import Trainer
    from samples.trainer_cpu import token_dataset, training_arguments
    from tests.trainer_yaml import mindformers_context
    mindformers_context(ms.get_context("mode"))     # MindFormers' context, else its Trainer switches to PyNative
    seq = (net.config.seq_length if hasattr(net, "config") else 32)
    return Trainer(model=net, args=training_arguments(str(tmp_path / "out")),
                   train_dataset=token_dataset(4, seq + 1, 2), **kwargs)


def _get_pet_model():
    import mindformers.pet
    return mindformers.pet.__dict__["get_pet_model"]


# ----------------------------------------------------------------------------- item 1: the takeover
@pytest.mark.parametrize("config", ["llama_lora.yaml", "llama_ptuning2.yaml", "llama_prefixtuning.yaml"])
def test_enable_without_config_gives_the_yaml_its_pet_hooks_pet(mode, config):
    path = os.path.join(CONFIGS, config)
    reference = plain_llama(path)               # the same seed, no PET: names and initial values
    with pet_hooks.enable() as session:
        net = build_from_yaml(path)
        base = snapshot(net)
        optimizer = _train(net)
    assert type(net) is type(reference)         # the model itself, not MindFormers' PetModel around it
    assert has_pet(net) and session.models == [net] and session.config == load_config(path)
    assert get_state(net).config.pet_type == load_config(path).pet_type
    assert not any("mindpet" in p.name for p in net.get_parameters())
    deltas = {p.name for p in pet_hooks.delta_parameters(net)}
    assert {p.name for p in optimizer.parameters} == deltas            # the optimizer holds only the deltas
    names = {p.name for p in net.get_parameters()} - deltas - {p.name for p in pet_hooks.surgery.switch_parameters(net)}
    assert names == {p.name for p in reference.get_parameters()}        # base names as in MindFormers' checkpoints
    assert_params_equal(snapshot(reference), net, names=sorted(names))  # ... and untouched by training
    assert any(np.abs(base[name] - p.asnumpy()).max() > 0 for name, p in
               ((p.name, p) for p in pet_hooks.delta_parameters(net)))  # the deltas trained


def test_the_yaml_method_need_not_be_one_mindformers_knows(mode, tmp_path):
    ia3 = {"pet_type": "ia3", "target_modules": ".*wk|.*wv|.*w2", "feedforward_modules": ".*w2"}
    path = write_run_yaml(tmp_path, ia3)
    with pet_hooks.enable():
        net = build_from_yaml(path)
        _train(net, steps=2)
    assert get_state(net).config == load_config(ia3)
    assert {p.name.rsplit(".", 1)[-1] for p in pet_hooks.delta_parameters(net)} == {"ia3_l"}


def test_an_equal_explicit_config_is_fine_and_a_different_one_names_both(tmp_path):
    with pet_hooks.enable(load_config(LORA_YAML)) as session:
        net = build_from_yaml(LORA_YAML)
    assert has_pet(net) and session.models == [net]
    other = {**_doc()["model"]["model_config"]["pet_config"], "lora_rank": 4}
    with pytest.raises(PetConfigError) as info:
        with pet_hooks.enable(other):
            build_from_yaml(LORA_YAML)
    message = str(info.value)
    assert "lora_rank: 4 vs 8" in message and "LlamaForCausalLM" in message and "enable() with no argument" in message
    assert pet_hooks.doors.context.active_session() is None


def test_outside_the_doors_mindformers_is_itself():
    from mindformers.pet.pet_model import PetModel, get_pet_model
    before = _get_pet_model()
    assert before is get_pet_model                     # MindFormers' own function object
    with pet_hooks.enable():
        assert _get_pet_model() is not before
    assert _get_pet_model() is before
    net = build_from_yaml(LORA_YAML)                   # its own LoRA, as without pet_hooks
    assert isinstance(net, PetModel) and not has_pet(net)
    assert any(p.name.endswith("mindpet_delta_lora_a") for p in net.trainable_params())


def test_a_model_mindformers_pet_adapted_before_the_door_is_still_refused(tmp_path):
    theirs = build_from_yaml(LORA_YAML)                # MindFormers' PetModel, built outside the door
    before = snapshot(theirs)
    with pytest.raises(PetConfigError, match="already carries MindFormers' own PET"):
        with pet_hooks.enable():
            _trainer(theirs, tmp_path, pet_method="lora")
    assert not has_pet(theirs)
    assert_params_equal(before, theirs)


def test_a_base_checkpoint_named_in_the_yaml_loads_into_the_adapted_model(tmp_path):
    base = plain_llama()
    rng = np.random.default_rng(3)
    for param in base.get_parameters():                # values no seed would give
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    ckpt = str(tmp_path / "base.ckpt")
    ms.save_checkpoint(base, ckpt)
    path = write_run_yaml(tmp_path, _doc()["model"]["model_config"]["pet_config"], checkpoint_name_or_path=ckpt)
    with pet_hooks.enable():
        net = build_from_yaml(path)
    assert has_pet(net)
    assert_params_equal(snapshot(base), net)           # every base parameter, by its own name
    # ... and the other way: MindFormers' load of the same file into the adapted model misses only the deltas
    missing, _ = ms.load_param_into_net(net, ms.load_checkpoint(ckpt))
    added = {p.name for p in pet_hooks.delta_parameters(net)} | {p.name for p in pet_hooks.surgery.switch_parameters(net)}
    assert set(missing) == added


# ----------------------------------------------------------------------------- item 3: pet_method


def test_pet_method_lora_on_a_model_instance_uses_the_family_defaults(mode, tmp_path):
    net = plain_llama()
    base = snapshot(net)
    with pet_hooks.enable():
        trainer = _trainer(net, tmp_path, pet_method="lora")
        assert has_pet(net)
        trainer.train()
    state = get_state(net)
    assert state.config.pet_type == "lora" and state.config.target_modules == ".*wq|.*wk|.*wv|.*wo"
    assert sorted({p.name.split(".")[-2] for p in pet_hooks.delta_parameters(net)}) == ["wk", "wo", "wq", "wv"]
    assert_params_equal(base, net)
    assert all(np.abs(p.asnumpy()).sum() > 0 for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_B"))
    # the trained adapter in the Trainer's output_dir, loadable into a fresh model
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    fresh = pet_hooks.load_adapter(plain_llama(), str(out))
    for mine, theirs in zip(pet_hooks.delta_parameters(net), pet_hooks.delta_parameters(fresh)):
        np.testing.assert_array_equal(mine.asnumpy(), theirs.asnumpy(), err_msg=mine.name)


def test_pet_method_takes_the_model_configs_pet_config_of_that_type(tmp_path):
    net = plain_llama()
    net.config.pet_config = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ".*wq"}
    with pet_hooks.enable():
        _trainer(net, tmp_path, pet_method="lora")
    assert get_state(net).config == load_config(net.config.pet_config)


def test_pet_method_ptuning2_on_a_model_instance(mode, tmp_path):
    net = plain_llama()
    with pet_hooks.enable():
        _trainer(net, tmp_path, pet_method="ptuning2").train()
    assert get_state(net).config == load_config({"pet_type": "ptuning2"})
    assert pet_hooks.delta_parameters(net)


def test_outside_the_doors_pet_method_is_left_to_mindformers(tmp_path):
    net = plain_llama()
    _trainer(net, tmp_path, pet_method="lora")         # MindFormers only warns that it ignores it
    assert not has_pet(net)


def test_default_targets_per_family():
    from samples.tiny_gpt import build
    assert family_of(plain_llama()) == "llama" and family_of(build(**SMALL)) == "gpt2"
    assert config_for_method(build(**SMALL), "lora").target_modules == ".*dense1|.*dense2|.*dense3"
    pet_hooks.apply(build(**SMALL), config_for_method(build(**SMALL), "lora"))   # the defaults select cells
    ia3 = config_for_method(plain_llama(), "ia3")
    assert (ia3.target_modules, ia3.feedforward_modules) == (".*wk|.*wv|.*w2", ".*w2")
    assert config_for_method(plain_llama(), "bitfit").target_modules is None     # needs no targets


def test_pet_method_without_defaults_names_the_model_class():
    class Plain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.proj = nn.Dense(4, 4)

        def construct(self, x):
            return self.proj(x)

    with pytest.raises(PetConfigError, match=r"Plain.*target_modules"):
        config_for_method(Plain(), "lora")


# ----------------------------------------------------------------------------- the launcher, no --config
BUILD_AND_TRAIN = """\
import sys
import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Model
from mindformers import MindFormerConfig           # imported after the hooks started: the takeover waits for it
from mindformers.models import build_network

ms.set_device("CPU")
ms.set_context(mode=int(sys.argv[2]))
ms.set_seed(0)
net = build_network(MindFormerConfig(sys.argv[1]).model)
ids = np.random.default_rng(0).integers(1, 256, (4, 2, net.config.seq_length + 1)).astype(np.int32)
data = ds.GeneratorDataset([(row,) for row in ids], ["input_ids"], shuffle=False)
Model(net, optimizer=nn.AdamWeightDecay(net.trainable_params(), 1e-2)).train(1, data, dataset_sink_mode=False)
ms.save_checkpoint(net, sys.argv[3])
print("built", type(net).__name__)
"""


def test_launcher_without_config_takes_the_run_yamls_pet_config(tmp_path, mode):
    import subprocess
    import sys
    script = tmp_path / "build_and_train.py"
    script.write_text(BUILD_AND_TRAIN)
    ckpt = tmp_path / "after.ckpt"
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--save-dir", str(tmp_path / "adapter"),
                          str(script), LORA_YAML, str(mode), str(ckpt)],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built LlamaForCausalLM" in out.stdout and "adapter saved to" in out.stderr
    saved = ms.load_checkpoint(str(ckpt))
    assert not any("mindpet" in name for name in saved)
    reference = plain_llama()
    for param in reference.get_parameters():             # the base weights did not move
        np.testing.assert_array_equal(saved[param.name].asnumpy(), param.asnumpy(), err_msg=param.name)
    fresh = pet_hooks.load_adapter(plain_llama(), str(tmp_path / "adapter"))
    assert get_state(fresh).config == load_config(LORA_YAML)
    for param in pet_hooks.delta_parameters(fresh):     # the adapter holds the trained deltas
        np.testing.assert_array_equal(param.asnumpy(), saved[param.name].asnumpy(), err_msg=param.name)
    assert any(np.abs(saved[p.name].asnumpy()).sum() > 0 for p in pet_hooks.delta_parameters(fresh)
               if p.name.endswith("lora_B"))
