"""pet_hooks.save_checkpoint / load_checkpoint for a hand-written loop, and the checkpoint folder's rules.

The hand-written loop is the documented one (docs/front_doors.md): a TrainOneStepCell over an optimizer
built after ``apply``; four steps straight are the reference, three steps (a checkpoint at step 2), then a new
process's worth of objects (a fresh net, the same config applied, a fresh optimizer) loading it and doing
steps 3-4, must end with the same deltas, losses and optimizer state. It fails if the adapter, the
moments or the step counter (Adam's bias correction, the schedule) are not restored.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.training.run_checkpoint import latest_checkpoint
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import GPT_LORA, SMALL

BATCHES = [next(b) for b in [lm_batches(seq_length=8, batch_size=4, seed=1)] for _ in range(4)]


def _fresh():
    net = build(seed=0, **SMALL)
    pet_hooks.apply(net, GPT_LORA)
    optimizer = nn.Adam(net.trainable_params(), nn.ExponentialDecayLR(1e-2, 0.8, 2))
    step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
    step.set_train()
    return net, optimizer, step


def _loop(save_dir, stop=None):
    """The documented loop: load (0 when fresh), train the steps after it, save every 2 steps."""
    net, optimizer, train_step = _fresh()
    start = pet_hooks.load_checkpoint(net, optimizer, save_dir)
    losses = []
    for step, (ids, labels) in enumerate(BATCHES, 1):
        if step <= start:
            continue                        # done before the checkpoint
        losses.append(float(train_step(Tensor(ids), Tensor(labels)).asnumpy()))
        if step % 2 == 0:
            pet_hooks.save_checkpoint(net, optimizer, step, save_dir)
        if step == stop:
            break
    return net, optimizer, losses


def _values(net, optimizer):
    return {p.name: p.asnumpy().copy() for p in list(pet_hooks.delta_parameters(net)) + list(
        p for p in optimizer.get_parameters() if p.name.startswith(("moment", "beta", "global_step")))}


def test_a_hand_written_loop_resumes_with_three_lines(mode, tmp_path):
    net, optimizer, whole_losses = _loop(str(tmp_path / "whole"))
    whole = _values(net, optimizer)
    _, _, cut_losses = _loop(str(tmp_path / "cut"), stop=3)          # killed during step 4, say
    assert cut_losses == whole_losses[:3]
    net, optimizer, resumed_losses = _loop(str(tmp_path / "cut"))
    assert resumed_losses == whole_losses[2:]
    resumed = _values(net, optimizer)
    assert sorted(resumed) == sorted(whole) and any(k.startswith("moment1.") for k in whole)
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_no_checkpoint_means_step_0_with_one_line(tmp_path, caplog):
    net, optimizer, _ = _fresh()
    with caplog.at_level("WARNING", logger="pet_hooks"):
        assert pet_hooks.load_checkpoint(net, optimizer, str(tmp_path)) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"pet_hooks: no complete checkpoint in {tmp_path / 'checkpoints'}; starting from step 0"]


def test_the_newest_keep_are_kept_and_leftovers_of_killed_saves_are_swept(tmp_path):
    net, optimizer, _ = _fresh()
    root = tmp_path / "checkpoints"
    os.makedirs(root / ".step-9.tmp-123" / "junk")          # what a save killed midway leaves
    for step in (2, 4, 6, 8):
        pet_hooks.save_checkpoint(net, optimizer, step, str(tmp_path), keep=3)
    assert sorted(os.listdir(root)) == ["step-4", "step-6", "step-8"]
    assert latest_checkpoint(str(tmp_path)).step == 8
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        pet_hooks.save_checkpoint(net, optimizer, 10, str(tmp_path), keep=0)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        pet_hooks.save_checkpoint(net, optimizer, -1, str(tmp_path))


def test_only_rank_0_writes(tmp_path, monkeypatch):
    net, optimizer, _ = _fresh()
    monkeypatch.setenv("RANK_ID", "1")
    assert pet_hooks.save_checkpoint(net, optimizer, 3, str(tmp_path)) is None
    assert not os.path.exists(tmp_path / "checkpoints")


def test_the_random_states_a_step_can_read_come_back(tmp_path):
    """NumPy's, Python's and MindSpore's default generator: restored by load_checkpoint, so what a loop draws
    from them after resuming is what it drew in the uninterrupted run. (The CPU Dropout kernels keep their
    own state, which MindSpore does not expose: docs/front_doors.md says which runs are exact.)"""
    net, optimizer, _ = _fresh()
    np.random.seed(5)
    random.seed(5)
    ms.set_seed(5)
    pet_hooks.save_checkpoint(net, optimizer, 1, str(tmp_path))
    expected = (np.random.rand(3), random.random(), ms.get_rng_state().asnumpy())
    np.random.seed(99)
    random.seed(99)
    ms.set_seed(99)
    pet_hooks.load_checkpoint(net, optimizer, str(tmp_path))
    np.testing.assert_array_equal(np.random.rand(3), expected[0])
    assert random.random() == expected[1]
    np.testing.assert_array_equal(ms.get_rng_state().asnumpy(), expected[2])


def test_a_net_without_pet_cannot_resume(tmp_path):
    with pytest.raises(pet_hooks.PetStateError, match="has no PET applied"):
        pet_hooks.load_checkpoint(build(seed=0, **SMALL), None, str(tmp_path))
    with pytest.raises(pet_hooks.PetStateError, match="no PET"):
        pet_hooks.save_checkpoint(build(seed=0, **SMALL), None, 1, str(tmp_path))
