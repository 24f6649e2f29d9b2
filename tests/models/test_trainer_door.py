"""MindFormers' Trainer on a complete run YAML inside pet_hooks' doors: the seed's own flow, carried by pet_hooks.

``Trainer(args=run_yaml, task="text_generation", train_dataset=ds).train()`` / ``.finetune(...)`` inside
``with pet_hooks.enable():`` and under ``pet-hooks run`` (no --config): the model MindFormers builds from the
YAML's pet_config gets pet_hooks' PET, trains only its deltas, and the adapter lands in output_dir. Against
MindFormers' own PET on the same YAML, base and LoRA values: the same ten losses. The Trainer itself on the
CPU, and MindFormers' own PET on these YAMLs, are in tests/models/test_trainer_yaml.py (whose helper runs both).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
import mindspore as ms

import pet_hooks
from pet_hooks.surgery.core import get_state
from tests.conftest import NEEDS_MINDFORMERS, ROOT
from tests.trainer_yaml import (AtTrainBegin, StopAfter, base_checkpoint, lora_values, plain_llama, read_yaml,
                                run_trainer, token_dataset)

pytestmark = NEEDS_MINDFORMERS
CONFIGS = os.path.join(ROOT, "samples", "configs")
METHODS = ("lora", "ptuning2", "prefixtuning")


def yaml_of(method: str) -> str:
    return os.path.join(CONFIGS, f"run_llama_{method}_cpu.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint of the plain tiny Llama (no PET), as ms.save_checkpoint writes it."""
    return base_checkpoint(yaml_of("lora"), str(tmp_path_factory.mktemp("base") / "base.ckpt"))


def _in_door(*args, **kwargs):
    with pet_hooks.enable() as session:
        run = run_trainer(*args, **kwargs)
    return run, session


def _checkpoint(run, step):
    folder = os.path.join(run.output_dir, "checkpoint", "rank_0")
    name = next(n for n in os.listdir(folder) if n.endswith(f"-1_{step}.ckpt"))
    return ms.load_checkpoint(os.path.join(folder, name))


@pytest.mark.parametrize("method", METHODS)
def test_each_run_yaml_fine_tunes_with_pet_hooks_pet_inside_enable(method, mode, base, tmp_path):
    """.finetune(finetune_checkpoint=base) in enable() with no config: pet_hooks' PET from the YAML's block,
    the base weights the checkpoint's and untouched, only pet_hooks' deltas train, the adapter in output_dir."""
    begin = AtTrainBegin()
    # two steps: every delta moves (LoRA's A at the second, once B is not zero), and the run ends before the
    # fifth step's checkpoint, so MindFormers writes the end's alone
    run, session = _in_door(yaml_of(method), token_dataset(yaml_of(method), steps=2), str(tmp_path / "out"),
                            mode=mode, finetune_checkpoint=base, callbacks=[begin])
    [net] = session.models
    assert type(net).__name__ == "LlamaForCausalLM" and get_state(net).config == pet_hooks.load_config(yaml_of(method))
    assert len(run.losses) == 2 and all(np.isfinite(run.losses))
    saved = {name: value.asnumpy() for name, value in ms.load_checkpoint(base).items()}
    for name, value in saved.items():                   # every base weight loaded by its own name, left alone
        np.testing.assert_array_equal(run.parameters[name], value, err_msg=name)
    deltas = sorted(p.name for p in pet_hooks.delta_parameters(net))
    assert sorted(run.trainable) == deltas and not any("mindpet" in name for name in run.parameters)
    # the adapter in output_dir is the trained one, and MindFormers' checkpoint holds the same deltas
    fresh = pet_hooks.load_adapter(plain_llama(yaml_of(method)), run.output_dir)
    final = _checkpoint(run, 2)
    for param in pet_hooks.delta_parameters(fresh):
        np.testing.assert_array_equal(param.asnumpy(), run.trainable[param.name], err_msg=param.name)
        np.testing.assert_array_equal(final[param.name].asnumpy(), run.trainable[param.name], err_msg=param.name)
    assert all(np.abs(run.trainable[name] - begin.values[name]).max() > 0 for name in deltas)   # they trained


@pytest.fixture(scope="module")
def mindformers_lora(base, tmp_path_factory):
    """mode -> MindFormers' own LoRA on the YAML, ten steps from the base checkpoint and seeded LoRA values
    (outside the doors): the reference of the loss comparison, and in graph mode the run whose checkpoint
    folder the load_checkpoint test reads (trained once per mode; the tests only read it)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            runs[mode] = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=10),
                                     str(tmp_path_factory.mktemp(f"theirs{mode}") / "theirs"), mode=mode,
                                     initial_values=lora_values(yaml_of("lora"), seed=1), finetune_checkpoint=base)
        return runs[mode]
    return get


@pytest.mark.parametrize("mode_", [0, 1], ids=["graph", "pynative"])
def test_ten_losses_equal_mindformers_own_lora(mode_, base, mindformers_lora, tmp_path):
    """From the same YAML, base checkpoint and LoRA values: pet_hooks' per-step losses are MindFormers'."""
    values = lora_values(yaml_of("lora"), seed=1)
    theirs = mindformers_lora(mode_)
    ours, _ = _in_door(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=10), str(tmp_path / "ours"),
                       mode=mode_, initial_values=values, finetune_checkpoint=base)
    assert any("mindpet_delta" in name for name in theirs.written.values())      # MindFormers' own LoRA
    assert all(name.endswith((".lora_A", ".lora_B")) for name in ours.written.values())   # pet_hooks'
    assert len(ours.losses) == len(theirs.losses) == 10
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-5)
    for name, value in theirs.trainable.items():          # and the same trained deltas
        ours_name = name.replace(".mindpet_delta_lora_a", ".lora_A").replace(".mindpet_delta_lora_b", ".lora_B")
        np.testing.assert_allclose(ours.trainable[ours_name], value, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def whole_in_door(tmp_path_factory):
    """The YAML's ten-step LoRA run inside enable(), uninterrupted (graph mode): the reference of both resume
    tests below, trained once (they only read it; the interrupted run is cut_in_door's, each resumes itself)."""
    run, _ = _in_door(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=10),
                      str(tmp_path_factory.mktemp("whole") / "whole"))
    return run


@pytest.fixture(scope="module")
def cut_in_door(tmp_path_factory):
    """The same run stopped after step 7, inside enable() and under the launcher's run checkpoints
    (``pet-hooks run --save-steps 3``, in this process): (the run, the run checkpoints' folder). Both resume
    tests below start from it: MindFormers' resume_training from the checkpoints its CheckpointMonitor
    wrote into output_dir (steps 5 and 7), pet_hooks' resume from its own (steps 3 and 6)."""
    from pet_hooks.doors.launcher import run_checkpoints
    root = tmp_path_factory.mktemp("cut")
    saves = str(root / "saves")
    with run_checkpoints(saves, {"save_steps": 3}, None, None):
        cut, _ = _in_door(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=10), str(root / "cut"),
                          callbacks=[StopAfter(7)])
    return cut, saves


def test_resume_training_continues_pet_hooks_run_exactly(whole_in_door, cut_in_door, tmp_path):
    """Stopped after step 7, resumed with resume_training: True from the run's own checkpoint folder:
    the remaining losses and the final deltas are the uninterrupted run's (optimizer moments and step
    reloaded by pet_hooks' delta names); the adapter saved at the end is the uninterrupted run's."""
    data = lambda: token_dataset(yaml_of("lora"))   # noqa: E731
    whole = whole_in_door
    cut, _ = cut_in_door
    resumed, _ = _in_door(yaml_of("lora"), data(), str(tmp_path / "resumed"),
                          overrides={"resume_training": True,
                                     "load_checkpoint": os.path.join(cut.output_dir, "checkpoint")})
    assert cut.losses == whole.losses[:7] and resumed.losses == whole.losses[7:]
    for name, value in whole.parameters.items():
        np.testing.assert_array_equal(resumed.parameters[name], value, err_msg=name)
    from safetensors.numpy import load_file
    adapter = load_file(os.path.join(resumed.output_dir, "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(whole.trainable)
    for name, value in adapter.items():
        np.testing.assert_array_equal(value, whole.trainable[name], err_msg=name)


def test_pet_hooks_run_checkpoints_resume_the_trainer(whole_in_door, cut_in_door, tmp_path):
    """pet-hooks run --save-steps 3 --resume around MindFormers' Trainer (the launcher's run_checkpoints, in
    this process): stopped after step 7, run again, it resumes from step 6's run checkpoint (pet_hooks' own,
    not MindFormers' resume_training) and ends with the uninterrupted run's losses and adapter. It fails if
    the Trainer's batches were not skipped or its optimizer (MindFormers' AdamW) state not restored."""
    from pet_hooks.doors.launcher import run_checkpoints
    data = lambda: token_dataset(yaml_of("lora"), steps=10)   # noqa: E731
    whole = whole_in_door
    cut, saves = cut_in_door
    assert cut.losses == whole.losses[:7]
    assert sorted(os.listdir(os.path.join(saves, "checkpoints"))) == ["step-3", "step-6"]
    with run_checkpoints(saves, {"save_steps": 3, "resume": True}, None, None):
        resumed, _ = _in_door(yaml_of("lora"), data(), str(tmp_path / "resumed"))
    assert resumed.losses == whole.losses[6:]
    for name, value in whole.trainable.items():
        np.testing.assert_array_equal(resumed.trainable[name], value, err_msg=name)


def test_load_checkpoint_of_mindformers_own_lora_run_fills_pet_hooks_deltas(mindformers_lora, tmp_path):
    """A run trained with MindFormers' own LoRA (outside the doors), loaded with load_checkpoint inside one:
    its mindpet_delta_lora_a/_b go into pet_hooks' lora_A/_B instead of being skipped as unknown names.
    (The run: the module's graph-mode ten steps of MindFormers' LoRA; its folder's meta.json names the last.)"""
    theirs = mindformers_lora(0)
    begin = AtTrainBegin()
    folder = os.path.join(theirs.output_dir, "checkpoint")
    _in_door(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "ours"),
             overrides={"load_checkpoint": folder}, callbacks=[begin])
    seen = begin.values
    moved = 0
    for name, value in theirs.parameters.items():
        ours = name.replace(".mindpet_delta_lora_a", ".lora_A").replace(".mindpet_delta_lora_b", ".lora_B")
        np.testing.assert_array_equal(seen[ours], value, err_msg=name)
        moved += ours != name
    assert moved == 16


def test_the_strategy_rule_holds_on_the_trainer_path(tmp_path, caplog):
    """The YAML asks for only_trainable_params: true; inside the door the deltas' model is compiled with it
    False (MindFormers' own PET keeps it: tests/models/test_trainer_yaml.py)."""
    seen = {}

    class Look(ms.train.Callback):
        def on_train_begin(self, run_context):
            seen.update(ms.get_auto_parallel_context("strategy_ckpt_config"))

    ms.set_auto_parallel_context(strategy_ckpt_config={"only_trainable_params": True})
    try:
        with caplog.at_level(logging.WARNING, logger="pet_hooks"):
            _in_door(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "out"),
                     overrides={"parallel.strategy_ckpt_config.only_trainable_params": True}, callbacks=[Look()])
    finally:
        ms.set_auto_parallel_context(strategy_ckpt_config={"only_trainable_params": True})
    assert seen["only_trainable_params"] is False
    assert any("only_trainable_params" in r.getMessage() for r in caplog.records)


def test_pet_method_with_a_run_yaml_without_pet_config_uses_the_family_defaults(tmp_path):
    """Trainer(args=yaml without pet_config, pet_method="lora"): the model MindFormers builds gets LoRA on
    Llama's default targets when the optimizer is built for it."""
    from mindformers import Trainer
    from tests.trainer_yaml import mindformers_context
    doc = read_yaml(yaml_of("lora"))
    doc["model"]["model_config"].pop("pet_config")
    doc["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    mindformers_context(0)
    with pet_hooks.enable() as session:
        Trainer(args=str(path), task="text_generation", train_dataset=token_dataset(str(path), steps=2),
                pet_method="lora").train()
    [net] = session.models
    assert get_state(net).config.target_modules == ".*wq|.*wk|.*wv|.*wo"
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_a_trainer_without_mindformers_context_is_warned_about(tmp_path, monkeypatch, caplog):
    from mindformers.core.context.build_context import MFContextOperator
    from pet_hooks.doors import mindformers as door
    monkeypatch.setattr(MFContextOperator, "get_mf_ctx_instance", classmethod(lambda cls: None))
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        door._warn_without_context()    # pylint: disable=protected-access
    assert any("build_context" in r.getMessage() and "PyNative" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the launcher, msrun
def test_pet_hooks_run_an_unmodified_trainer_script(tmp_path):
    """samples/trainer_run.py (build_context + Trainer, no PET code) under `pet-hooks run`, no --config."""
    doc = read_yaml(yaml_of("lora"))
    doc["output_dir"] = str(tmp_path / "out")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", os.path.join(ROOT, "samples", "trainer_run.py"),
                          "--config", str(run_yaml), "--steps", "4"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"adapter saved to {tmp_path / 'out'}" in out.stderr
    fresh = pet_hooks.load_adapter(plain_llama(yaml_of("lora")), str(tmp_path / "out"))
    final = _checkpoint(type("Run", (), {"output_dir": str(tmp_path / "out")}), 4)
    for param in pet_hooks.delta_parameters(fresh):     # the adapter holds the deltas the Trainer trained
        np.testing.assert_array_equal(param.asnumpy(), final[param.name].asnumpy(), err_msg=param.name)
    assert any(np.abs(final[p.name].asnumpy()).sum() > 0 for p in pet_hooks.delta_parameters(fresh)
               if p.name.endswith("lora_B"))
    reference = plain_llama(yaml_of("lora"))            # YAML seed 42 built the base: compare with the checkpoint
    assert not any("mindpet" in name for name in final)
    assert {p.name for p in reference.get_parameters()} <= set(final)


MSRUN_SCRIPT = """\
import json, sys
sys.path.insert(0, {root!r})
import mindspore as ms
from mindspore.communication import get_rank
from mindformers import MindFormerConfig, Trainer, build_context
from tests.trainer_yaml import LossRecorder, token_dataset
build_context(MindFormerConfig(sys.argv[1]))
recorder = LossRecorder()
trainer = Trainer(args=sys.argv[1], task="text_generation", train_dataset=token_dataset(sys.argv[1], 3, seed=get_rank()),
                  callbacks=[recorder])
trainer.train()
print("STATE " + json.dumps({{"rank": get_rank(), "strategy": ms.get_auto_parallel_context("strategy_ckpt_config"),
      "losses": recorder.losses, "trainable": sorted(p.name for p in trainer.trainer.network.trainable_params())}}),
      flush=True)
"""


def test_data_parallel_under_pet_hooks_run_and_msrun(tmp_path):
    """`pet-hooks run -- msrun ... script run.yaml` with use_parallel: True: both workers get the hooks (the
    bootstrap, no --config), train pet_hooks' deltas, and compile with only_trainable_params False although the
    YAML says True; rank 0 saves the adapter into output_dir."""
    doc = read_yaml(yaml_of("lora"))
    doc.update(use_parallel=True, output_dir=str(tmp_path / "out"))
    doc["parallel"]["strategy_ckpt_config"]["only_trainable_params"] = True
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    script = tmp_path / "train.py"
    script.write_text(MSRUN_SCRIPT.format(root=ROOT))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--", "msrun", "--worker_num=2",
                          "--local_worker_num=2", "--master_port=8251", "--join=True",
                          f"--log_dir={tmp_path / 'msrun_log'}", str(script), str(run_yaml)],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    states = []
    for rank in (0, 1):
        log = (tmp_path / "msrun_log" / f"worker_{rank}.log").read_text()
        states += [json.loads(line.split("STATE ", 1)[1]) for line in log.splitlines() if "STATE " in line]
    assert out.returncode == 0 and len(states) == 2, out.stdout[-3000:] + out.stderr[-3000:]
    for state in states:
        assert len(state["losses"]) == 3 and state["strategy"]["only_trainable_params"] is False
        assert len(state["trainable"]) == 16 and all(n.endswith((".lora_A", ".lora_B")) for n in state["trainable"])
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_the_train_step_is_public_and_the_doors_register_it():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert pet_hooks.register_mindformers_train_step() == "PetTrainOneStepCell"
    assert MindFormerRegister.get_cls(MindFormerModuleType.WRAPPER, "PetTrainOneStepCell") is pet_hooks.PetTrainOneStepCell
