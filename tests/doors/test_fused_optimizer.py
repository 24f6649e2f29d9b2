"""Config ``fused_optimizer: true``: the doors build pet_hooks.optim.AdamW where a script builds torch's AdamW.

Under ``enable`` (so the launcher) a call of ``mindspore.experimental.optim.AdamW`` or MindFormers' ``AdamW``
returns pet_hooks' fused AdamW over the deltas; PetCallback's rebuild does the same for MindFormers' class.
The reference is the class the script asked for, trained on the same model and batches without the
setting: the deltas must agree after every step (the update is the same, only the kernels differ). Without the setting, and after the block, the classes build themselves.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from mindspore.experimental.optim import AdamW as ExperimentalAdamW

import pet_hooks
from pet_hooks.optim import AdamW as FusedAdamW
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import GPT_LORA, NEEDS_MINDFORMERS

SMALL = dict(num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
IDS = Tensor(np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32))


# PyNative ops run synchronously here (tests/conftest.py: synchronous_pynative)
pytestmark = pytest.mark.usefixtures("synchronous_pynative")


def _built_in_block(fused: bool, make_optimizer):
    with pet_hooks.enable({**GPT_LORA, "seed": 0, "fused_optimizer": fused}):
        net = build(seed=0, **SMALL)
        optimizer = make_optimizer(net.get_parameters())
    return net, optimizer


def _train(net, optimizer, steps=4):
    """value_and_grad + optimizer(grads), the way torch-style optimizers are driven (MindSpore's tutorials)."""
    loss_net = GPTWithLoss(net)
    loss_net.set_train(True)
    grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)
    deltas = []
    for _ in range(steps):
        _, grads = grad_fn(IDS, IDS)
        optimizer(grads)
        deltas.append({p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)})
    return deltas


def _assert_same_training(ours, theirs):
    assert ours[-1].keys() == theirs[-1].keys() and ours[-1]
    moved = [name for name in ours[-1] if not np.array_equal(ours[-1][name], ours[0][name])]
    assert moved, "the deltas did not train"
    # float rounding through the network (the optimizers alone agree within 1e-6, test_fused_adamw.py); an update
    # without the bias correction would be off by up to 3x at these first steps
    for step_ours, step_theirs in zip(ours, theirs):
        for name, value in step_ours.items():
            np.testing.assert_allclose(value, step_theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_experimental_adamw_becomes_the_fused_one_and_trains_the_same(mode):
    def make(params):
        return ExperimentalAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05)
    net, optimizer = _built_in_block(True, make)
    assert type(optimizer) is FusedAdamW
    assert {id(p) for p in optimizer.parameters} == {id(p) for p in net.trainable_params()}
    assert all("lora" in p.name for p in optimizer.parameters)
    reference_net, reference = _built_in_block(False, make)
    assert type(reference) is ExperimentalAdamW
    _assert_same_training(_train(net, optimizer), _train(reference_net, reference))


def test_what_it_cannot_stand_in_for_is_built_as_asked():
    net, optimizer = _built_in_block(True, lambda params: ExperimentalAdamW(params, lr=1e-2, amsgrad=True))
    assert type(optimizer) is ExperimentalAdamW                 # amsgrad: MindSpore's class, over the deltas
    assert all("lora" in p.name for p in optimizer.parameters)

    class MyAdamW(ExperimentalAdamW):                           # a subclass may change the update
        pass
    _, optimizer = _built_in_block(True, lambda params: MyAdamW(params, lr=1e-2))
    assert type(optimizer) is MyAdamW


def test_after_the_block_the_class_builds_itself():
    assert "__new__" not in vars(ExperimentalAdamW)
    _built_in_block(True, lambda params: ExperimentalAdamW(params, lr=1e-2))
    assert "__new__" not in vars(ExperimentalAdamW)
    net = build(seed=0, **SMALL)
    assert type(ExperimentalAdamW(net.get_parameters(), lr=1e-2)) is ExperimentalAdamW


@NEEDS_MINDFORMERS
def test_mindformers_adamw_through_enable_and_through_the_callbacks_rebuild(mode):
    from mindformers.core.optim import AdamW as MindFormersAdamW          # a factory: builds the class below
    from mindformers.core.optim.adamw import AdamW as BasicAdamW
    from pet_hooks.doors.flow import rebuild_optimizer

    def make(params):
        return MindFormersAdamW(params, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    net, optimizer = _built_in_block(True, make)
    assert type(optimizer) is FusedAdamW
    reference_net, reference = _built_in_block(False, make)
    assert type(reference) is BasicAdamW
    _assert_same_training(_train(net, optimizer), _train(reference_net, reference))

    # PetCallback's path: an optimizer built over every weight before PET, rebuilt over the deltas
    pet_hooks.PetCallback({**GPT_LORA, "fused_optimizer": True})   # built first, as a script does: it records
    plain = build(seed=0, **SMALL)                                  # the optimizer's arguments from then on
    built_before = make(plain.trainable_params())
    pet_hooks.apply(plain, {**GPT_LORA, "seed": 0, "fused_optimizer": True})
    rebuilt = rebuild_optimizer(built_before, plain)
    assert type(rebuilt) is FusedAdamW and rebuilt.torch_betas == (0.9, 0.95)
    assert {id(p) for p in rebuilt.parameters} == {id(p) for p in plain.trainable_params()}


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_value_that_is_not_a_bool_names_the_field(value):
    with pytest.raises(TypeError, match="fused_optimizer must be"):
        pet_hooks.load_config({**GPT_LORA, "fused_optimizer": value})
