"""Run checkpoints and resume through PetCallback and the launcher: a run stopped (or killed) and resumed
ends with the uninterrupted run's adapter, in graph and PyNative mode, with and without dataset sink mode.

The reference is the uninterrupted run of the same script: same seeds, same shuffled data over two
epochs. The resumed run must see exactly the batches the stopped one had not finished (the shuffle of
the second epoch included) and start from the checkpoint's optimizer moments and step counters: a
resume that replayed the first batches, restarted Adam's moments or its bias-correction powers, or
lost the learning-rate schedule's position gives other losses and other deltas.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Callback, Model
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks import PetCallback
from samples.data import lm_batches
from samples.tiny_gpt import LMLoss, build
from pet_hooks.surgery.core import has_pet
from tests.conftest import GPT_LORA, SMALL, snapshot, assert_params_equal

CFG = GPT_LORA
BATCHES, EPOCHS, SAVE_STEPS = 3, 2, 2   # a checkpoint inside the second epoch (step 4)


# PyNative ops run synchronously here (tests/conftest.py: synchronous_pynative)
pytestmark = pytest.mark.usefixtures("synchronous_pynative")


def _dataset():
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    return ds.GeneratorDataset([next(batches) for _ in range(BATCHES)], ["ids", "labels"], shuffle=True,
                               num_parallel_workers=1)


class Losses(Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        self.seen.append((params.cur_step_num, float(np.asarray(params.net_outputs.asnumpy()).mean())))


class StopAfter(Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num >= self.step:
            run_context.request_stop()


def _optimizer(net, kind="adam"):
    if kind == "momentum":
        return nn.Momentum(net.trainable_params(), 0.1, momentum=0.9)
    schedule = nn.ExponentialDecayLR(1e-2, 0.8, 2)      # the schedule's position must come back too
    return nn.Adam(net.trainable_params(), schedule)


def _train(save_dir, stop_after=None, resume=False, sink=False, cfg=CFG, optimizer="adam", adapter_name=None,
           net=None):
    ds.config.set_seed(3)
    net = net if net is not None else build(seed=0, **SMALL)
    model = Model(net, LMLoss(), _optimizer(net, optimizer))
    callback = PetCallback(cfg, save_dir=str(save_dir), save_steps=SAVE_STEPS, resume=resume,
                           adapter_name=adapter_name)
    losses = Losses()
    extra = [StopAfter(stop_after)] if stop_after else []
    model.train(EPOCHS, _dataset(), callbacks=[callback, losses] + extra, dataset_sink_mode=sink)
    return net, {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}, losses.seen


_WHOLE = {}


def _whole(mode, tmp_path_factory):
    """The uninterrupted run (once per mode: several tests read it)."""
    if mode not in _WHOLE:
        folder = tmp_path_factory.mktemp("whole")
        _, deltas, losses = _train(folder)
        _WHOLE[mode] = deltas, losses, folder
    return _WHOLE[mode]


@pytest.mark.parametrize("sink", [False, True], ids=["no_sink", "sink"])
def test_stopped_after_step_5_and_resumed_ends_as_the_uninterrupted_run(mode, sink, tmp_path, tmp_path_factory,
                                                                        capsys):
    whole, whole_losses, whole_dir = _whole(mode, tmp_path_factory)
    assert len(whole_losses) == BATCHES * EPOCHS
    _, _, cut_losses = _train(tmp_path, stop_after=5, sink=sink)
    assert cut_losses == whole_losses[:5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-4"]    # keep=2
    _, resumed, resumed_losses = _train(tmp_path, resume=True, sink=sink)
    assert "resuming from" in capsys.readouterr().err
    # step 5 is done again (the checkpoint is step 4's), in the second epoch's shuffled order
    assert resumed_losses == whole_losses[4:]
    assert sorted(resumed) == sorted(whole)
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    final, reference = load_file(str(tmp_path / "adapter_model.safetensors")), \
        load_file(str(whole_dir / "adapter_model.safetensors"))
    for name, value in reference.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


def test_a_script_training_one_epoch_per_call_resumes(mode, tmp_path):
    """Steps are counted over the run, across Model.train calls: resumed at step 4, the first call (steps 1-3)
    is not run (its adapter is loaded), the second starts after its first batch."""
    def run(folder, stop_after=None, resume=False):
        ds.config.set_seed(3)
        net = build(seed=0, **SMALL)
        model = Model(net, LMLoss(), _optimizer(net))
        callback = PetCallback(CFG, save_dir=str(folder), save_steps=SAVE_STEPS, resume=resume)
        losses, data = Losses(), _dataset()
        for epoch in range(EPOCHS):
            stop = [StopAfter(stop_after)] if stop_after and epoch == 1 else []
            model.train(1, data, callbacks=[callback, losses] + stop)
        return {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}, [x for _, x in losses.seen]

    whole, whole_losses = run(tmp_path / "whole")
    _, cut_losses = run(tmp_path / "cut", stop_after=2)       # the second call stops after its 2nd step
    assert cut_losses == whole_losses[:5]
    resumed, resumed_losses = run(tmp_path / "cut", resume=True)
    assert resumed_losses == whole_losses[4:]
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_a_checkpoint_holds_the_adapter_the_optimizer_state_and_the_position(tmp_path):
    """Megabytes, never the base model: the adapter's deltas, Adam's two moments per delta and its counters."""
    net, _, _ = _train(tmp_path, stop_after=2)
    folder = tmp_path / "checkpoints" / "step-2"
    assert sorted(os.listdir(folder)) == ["COMPLETE", "adapter_config.json", "adapter_model.safetensors",
                                          "train_state.safetensors", "trainer_state.json"]
    deltas = {p.name for p in pet_hooks.delta_parameters(net)}
    state = load_file(str(folder / "train_state.safetensors"))
    assert {f"moment1.{name}" for name in deltas} | {f"moment2.{name}" for name in deltas} <= set(state)
    assert {"beta1_power", "beta2_power", "global_step"} <= set(state)
    assert int(np.asarray(state["global_step"]).reshape(-1)[0]) == 2
    base = {p.name for p in net.get_parameters()} - deltas
    assert not base & set(state) and not base & set(load_file(str(folder / "adapter_model.safetensors")))
    meta = json.loads((folder / "trainer_state.json").read_text())
    assert (meta["global_step"], meta["epoch"], meta["step_in_epoch"], meta["steps_per_epoch"]) == (2, 1, 2, 3)
    assert meta["adapter_name"] == "default" and meta["optimizer_class"] == "TrainOneStepCell"
    # load_adapter reads a checkpoint's folder as any adapter
    fresh = pet_hooks.load_adapter(build(seed=0, **SMALL), str(folder))
    for param in pet_hooks.delta_parameters(fresh):
        np.testing.assert_array_equal(param.asnumpy(), load_file(str(folder / "adapter_model.safetensors"))[param.name])


def test_named_adapter_is_recorded_and_resumes(mode, tmp_path, tmp_path_factory):
    """(The first adapter of a net, named or not, starts from the same values: the default run is the reference.)"""
    whole, whole_losses, _ = _whole(mode, tmp_path_factory)
    _train(tmp_path, stop_after=3, adapter_name="task_a")
    meta = json.loads((tmp_path / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert meta["adapter_name"] == "task_a"
    with pytest.raises(pet_hooks.PetStateError, match="trains adapter 'task_a', not 'task_b'"):
        PetCallback(CFG, save_dir=str(tmp_path), resume=True, adapter_name="task_b")
    _, resumed, losses = _train(tmp_path, resume=True, adapter_name="task_a")
    assert losses == whole_losses[2:]
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_a_run_resumed_after_its_last_checkpoint_does_not_train_again(mode, tmp_path, tmp_path_factory, capsys):
    """Killed after the checkpoint of the last step (step 6 of 6, save_steps 3) but before the adapter was
    saved: the resumed Model.train call runs no step, and the model ends with the checkpoint's adapter."""
    global SAVE_STEPS  # pylint: disable=global-statement
    whole, _, _ = _whole(mode, tmp_path_factory)
    saved, SAVE_STEPS = SAVE_STEPS, 3
    try:
        _train(tmp_path)
        (tmp_path / "adapter_model.safetensors").unlink()
        net, resumed, losses = _train(tmp_path, resume=True)
    finally:
        SAVE_STEPS = saved
    assert losses == [] and "not running it again" in capsys.readouterr().err
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == sorted(whole)


def test_resume_with_no_checkpoint_starts_fresh_and_says_so(mode, tmp_path, tmp_path_factory, capsys):
    whole, _, _ = _whole(mode, tmp_path_factory)
    _, deltas, _ = _train(tmp_path, resume=True)
    assert "no complete checkpoint in" in capsys.readouterr().err
    for name, value in whole.items():
        np.testing.assert_array_equal(deltas[name], value, err_msg=name)


def test_bad_checkpoint_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        PetCallback(CFG, save_dir=str(tmp_path), save_steps=2, keep=0)
    with pytest.raises(ValueError, match="save_steps needs save_dir"):
        PetCallback(CFG, save_steps=2)
    with pytest.raises(ValueError, match="resume needs save_dir"):
        PetCallback(CFG, resume=True)


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory):
    """A run's folder with its step-2 checkpoint (stopped after step 3), made once in PyNative (the files do not
    depend on the mode, and no train step is compiled for them); each case resumes a copy in its own mode."""
    before = ms.get_context("mode")
    ms.set_context(mode=1)
    try:
        folder = tmp_path_factory.mktemp("stopped_at_3")
        _train(folder, stop_after=3)
    finally:
        ms.set_context(mode=before)
    return folder


def test_a_checkpoint_of_another_config_model_or_optimizer_is_refused_and_the_net_untouched(mode, tmp_path,
                                                                                            stopped_at_3):
    tmp_path = tmp_path / "run"
    shutil.copytree(stopped_at_3, tmp_path)
    # another config: refused when the callback is built, before any model is touched
    with pytest.raises(pet_hooks.PetStateError, match=r"another PET config \(lora_rank: 4 vs 8"):
        PetCallback({**CFG, "lora_rank": 8}, save_dir=str(tmp_path), resume=True)
    # another model (the same config matches other shapes): refused at train begin, the net as it was
    other = build(seed=0, **{**SMALL, "hidden_size": 32})
    before = snapshot(other)
    with pytest.raises(pet_hooks.PetStateError, match="another model or method: delta .* has shape"):
        _train(tmp_path, resume=True, net=other)
    assert not has_pet(other)
    assert_params_equal(before, other)
    # another optimizer: its state does not fit
    with pytest.raises(pet_hooks.PetStateError, match="another optimizer"):
        _train(tmp_path, resume=True, optimizer="momentum")


# ----------------------------------------------------------------------------- a process killed
SCRIPT = '''
import sys, json, os, signal
import numpy as np, mindspore as ms, mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Callback, Model
sys.path.insert(0, {root!r})
from samples.data import lm_batches
from samples.tiny_gpt import LMLoss, build
from tests.conftest import SMALL
ms.set_context(mode=int(os.environ["MODE"]), device_target="CPU")
ds.config.set_seed(3)
ms.set_seed(0)

class Kill(Callback):
    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num == int(os.environ.get("KILL_AT", "0")):
            os.kill(os.getpid(), signal.SIGKILL)

batches = lm_batches(seq_length=8, batch_size=4, seed=1)
data = ds.GeneratorDataset([next(batches) for _ in range(3)], ["ids", "labels"], shuffle=True, num_parallel_workers=1)
net = build(seed=0, **SMALL)
model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), nn.ExponentialDecayLR(1e-2, 0.8, 2)))
model.train(2, data, callbacks=[Kill()])
'''


def test_the_launcher_resumes_a_run_killed_with_sigkill(tmp_path):
    """pet-hooks run --save-steps 2 --resume, the script unmodified (graph mode; PyNative: the fault test,
    tests/doors/test_resume_faults.py): killed with SIGKILL at the end of step 5, run again with the same
    command, it ends with the uninterrupted run's adapter."""
    mode_name = "graph"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    (tmp_path / "pet.json").write_text(json.dumps({"pet_config": CFG}))
    env = {**os.environ, "MODE": "0" if mode_name == "graph" else "1"}

    def run(folder, kill_at=0, resume=False):
        command = [sys.executable, "-m", "pet_hooks", "run", "--config", str(tmp_path / "pet.json"),
                   "--save-dir", str(tmp_path / folder), "--save-steps", "2"] + (["--resume"] if resume else []) \
            + [str(script)]
        return subprocess.run(command, env={**env, "KILL_AT": str(kill_at)}, capture_output=True, text=True,
                              timeout=300)

    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run("cut", kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()       # it died before the end
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step-2", "step-4"]
    resumed = run("cut", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "step-4 (step 4)" in resumed.stderr
    reference = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    final = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-6, atol=0, err_msg=name)
