"""PetCallback with Model.train, every optimizer kind, in graph and PyNative mode."""
from __future__ import annotations

import os

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Callback, CheckpointConfig, LossMonitor, Model, ModelCheckpoint
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks import PetCallback
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, LMLoss, build
from tests.conftest import GPT_LORA, SMALL, assert_params_equal, snapshot

CFG = GPT_LORA


# PyNative ops run synchronously here (tests/conftest.py: synchronous_pynative)
pytestmark = pytest.mark.usefixtures("synchronous_pynative")


def _dataset(steps=4):
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    return ds.GeneratorDataset([next(batches) for _ in range(steps)], ["ids", "labels"], shuffle=False)


def _grouped(net):
    decay = [p for p in net.trainable_params() if p.name.endswith("weight")]
    other = [p for p in net.trainable_params() if not p.name.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.01}, {"params": other, "lr": 0.05},
            {"order_params": net.trainable_params()}]


OPTIMIZERS = {
    "momentum": lambda net: nn.Momentum(net.trainable_params(), 0.1, momentum=0.9),
    "adam": lambda net: nn.Adam(net.trainable_params(), 1e-2),
    "adamw": lambda net: nn.AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.1),
    "sgd": lambda net: nn.SGD(net.trainable_params(), 0.1),
    "grouped_adamw": lambda net: nn.AdamWeightDecay(_grouped(net), 1e-2),
}


# Every optimizer kind in both modes; the wiring alternates. How the model is wired (Model(net, loss, opt) or
# Model(net_with_loss, optimizer=opt)) decides how the callback finds the net; the optimizer's kind decides
# how it is rebuilt over the deltas, whatever the wiring: the cross product ran the same rebuild twice.
# Each wiring still meets three kinds in each mode, the grouped one (order_params and all) with both.
WIRED = [("net_loss_opt", "momentum"), ("net_with_loss", "adam"), ("net_loss_opt", "adamw"),
         ("net_with_loss", "sgd"), ("net_loss_opt", "grouped_adamw"), ("net_with_loss", "grouped_adamw")]
assert {opt for _, opt in WIRED} == set(OPTIMIZERS)


@pytest.mark.parametrize("wiring,opt_name", WIRED, ids=[f"{w}-{o}" for w, o in WIRED])
def test_callback_trains_only_the_deltas(mode, tmp_path, opt_name, wiring):
    net = build(seed=0, **SMALL)
    base = snapshot(net)
    optimizer = OPTIMIZERS[opt_name](net)
    model = (Model(net, LMLoss(), optimizer) if wiring == "net_loss_opt"
             else Model(GPTWithLoss(net), optimizer=optimizer))
    callback = PetCallback(CFG, save_dir=str(tmp_path / "adapter"))
    # two epochs of two steps: the callback meets an epoch boundary and B moves at the first step; the four
    # steps an epoch this ran before checked nothing more
    model.train(2, _dataset(2), callbacks=[callback, LossMonitor(2)])

    assert callback.model is net
    assert_params_equal(base, net)                      # every base weight bit for bit
    marks = {block.cell_init_args for block in net.blocks}      # one compiled graph for both blocks
    assert len(marks) == 1 and marks.pop().startswith("lazy_inline_Block_pet_hooks_")
    deltas = pet_hooks.delta_parameters(net)
    assert all(np.abs(p.asnumpy()).sum() > 0 for p in deltas if p.name.endswith("lora_B"))
    new_opt = model.train_network.optimizer
    assert type(new_opt) is type(optimizer)
    assert {p.name for p in new_opt.parameters} == {p.name for p in deltas}
    fresh = build(seed=0, **SMALL)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")
    ids = ms.Tensor(next(lm_batches(8, 2, seed=5))[0])
    np.testing.assert_allclose(fresh(ids).asnumpy(), net(ids).asnumpy(), atol=1e-5)


def test_rebuilt_optimizer_keeps_its_settings(mode):
    net = build(seed=0, **SMALL)
    optimizer = nn.Momentum(_grouped(net), 0.1, momentum=0.8, use_nesterov=True, loss_scale=2.0)
    model = Model(net, LMLoss(), optimizer)
    model.train(1, _dataset(2), callbacks=[PetCallback(CFG)])
    new = model.train_network.optimizer
    assert new is not optimizer and type(new) is nn.Momentum
    assert float(new.momentum.asnumpy()) == pytest.approx(0.8) and new.use_nesterov and new.loss_scale == 2.0
    # every delta sits in the weight-decay group of its layer's weight
    # (MindSpore keeps weight decay per parameter, multiplied by the loss scale)
    assert new.is_group and len(new.group_weight_decay) == len(pet_hooks.delta_parameters(net)) == 12
    assert all(wd == pytest.approx(0.01 * 2.0) for wd in new.group_weight_decay)
    assert not new.is_group_lr  # the lr=0.05 group held no layer weight, so no delta joined it


class AdapterSpy(Callback):
    """After PetCallback at each step end: what the adapter file holds then, and the net's deltas."""

    def __init__(self, directory, pet_callback):
        super().__init__()
        self.directory, self.pet_callback = directory, pet_callback
        self.files, self.deltas = {}, {}

    def on_train_step_end(self, run_context):
        step = run_context.original_args().cur_step_num
        path = os.path.join(self.directory, "adapter_model.safetensors")
        self.files[step] = load_file(path) if os.path.exists(path) else None
        self.deltas[step] = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(self.pet_callback.model)}


def test_callback_with_checkpoint_and_save_steps(mode, tmp_path):
    net = build(seed=0, **SMALL)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    ckpt = ModelCheckpoint(prefix="gpt", directory=str(tmp_path / "ckpt"),
                           config=CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=2))
    callback = PetCallback(CFG, save_dir=str(tmp_path / "ad"), save_steps=2)
    spy = AdapterSpy(str(tmp_path / "ad"), callback)
    model.train(1, _dataset(5), callbacks=[callback, spy, ckpt])
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors", "checkpoints"]
    assert sorted(os.listdir(tmp_path / "ad" / "checkpoints")) == ["step-2", "step-4"]   # run checkpoints too
    # Saved at steps 2 and 4 as they ended (not only at the end): nothing before step 2, the
    # file at steps 2-3 holds step 2's deltas, at step 4 step 4's; every step moved the deltas.
    assert spy.files[1] is None
    for step, saved_at in ((2, 2), (3, 2), (4, 4), (5, 4)):
        assert spy.files[step] is not None, f"no adapter on disk after step {step}"
        assert sorted(spy.files[step]) == sorted(spy.deltas[saved_at]), step
        for name, value in spy.deltas[saved_at].items():
            np.testing.assert_array_equal(spy.files[step][name], value, err_msg=f"step {step}: {name}")
    lora_b = [n for n in spy.deltas[2] if n.endswith("lora_B")]
    assert all(not np.array_equal(spy.deltas[2][n], spy.deltas[4][n]) for n in lora_b)
    final = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))     # and at the end: step 5's
    assert all(np.array_equal(final[n], spy.deltas[5][n]) for n in spy.deltas[5])
    saved = ms.load_checkpoint(str(sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1]))
    assert "blocks.0.attention.dense1.weight" in saved


def test_callback_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="save_steps"):
        PetCallback(CFG, save_steps=0)
    with pytest.raises(ValueError, match="save_dir"):
        PetCallback(CFG, save_steps=5)
    with pytest.raises(ValueError, match="lora_rank"):
        PetCallback({**CFG, "lora_rank": 0})


def test_unrecorded_optimizer_is_a_clear_error(monkeypatch):
    from pet_hooks.doors import flow
    net = build(seed=0, **SMALL)
    optimizer = nn.Adam(net.trainable_params(), 1e-2)
    monkeypatch.setattr(flow, "constructor_arguments", lambda optimizer: None)
    model = Model(net, LMLoss(), optimizer)
    with pytest.raises(ValueError, match="cannot rebuild optimizer Adam"):
        model.train(1, _dataset(1), callbacks=[PetCallback(CFG)])


def test_loss_scale_train_step_cell_gets_the_delta_optimizer():
    """TrainOneStepWithLossScaleCell cannot run on CPU (its overflow check is the Ascend-only
    NPUGetFloatStatusV2), so this checks the wiring the callback does at train begin."""
    from mindspore import Tensor
    from pet_hooks.doors import flow
    net = build(seed=0, **SMALL)
    optimizer = nn.Momentum(net.trainable_params(), 0.1, momentum=0.9, loss_scale=4.0)
    train_cell = nn.TrainOneStepWithLossScaleCell(nn.WithLossCell(net, LMLoss()), optimizer,
                                                  scale_sense=Tensor(np.array(8.0, np.float32)))
    assert flow.unwrap_model(train_cell) is net
    pet_hooks.apply(net, CFG)
    new = flow.attach_to_train_step(train_cell, net)
    assert train_cell.optimizer is new and type(new) is nn.Momentum and new.loss_scale == 4.0
    assert {p.name for p in train_cell.weights} == {p.name for p in pet_hooks.delta_parameters(net)}
    assert flow.attach_to_train_step(train_cell, net) is None  # already over the deltas: nothing rebuilt


def test_optimizer_recorder_installs_once_and_uninstalls():
    from pet_hooks.training import recorder
    from pet_hooks.utils.patching import is_patched
    net = build(seed=0, **SMALL)
    recorder.install()
    installed = nn.Optimizer.__dict__["__new__"]
    recorder.install()                                     # installed already: no double wrap
    assert nn.Optimizer.__dict__["__new__"] is installed and is_patched(installed)
    assert not is_patched(installed.__wrapped__)
    recorder.uninstall()
    try:
        assert "__new__" not in nn.Optimizer.__dict__      # back to Cell.__new__
        assert not recorder.is_installed()
        unrecorded = nn.Adam(net.trainable_params(), 1e-3)
        assert recorder.recorded_arguments(unrecorded) is None
        recorder.uninstall()                               # twice: harmless
    finally:
        recorder.install()
    recorded = nn.Adam(net.trainable_params(), 1e-3)
    assert recorder.recorded_arguments(recorded)[1] == {} and recorder.recorded_arguments(recorded)[0][1] == 1e-3


def test_train_step_returning_gradients_names_the_deltas(mode):
    """TrainOneStepCell(return_grad=True) pairs its gradients with weights_name: it must name the deltas."""
    from pet_hooks.doors import flow
    net = build(seed=0, **SMALL)
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2), return_grad=True)
    pet_hooks.apply(net, CFG)
    flow.attach_to_train_step(step, net)
    ids, labels = next(lm_batches(seq_length=8, batch_size=4, seed=1))
    _, grads = step(ms.Tensor(ids), ms.Tensor(labels))
    assert sorted(grads) == sorted(p.name for p in pet_hooks.delta_parameters(net))


@pytest.fixture
def recorder_off():
    """No recorder (as after ``import pet_hooks`` before any door); as it was afterwards."""
    from pet_hooks.training import recorder
    was = recorder.is_installed()
    recorder.uninstall()
    yield recorder
    if was:
        recorder.install()


def test_an_optimizer_built_before_any_door_is_rebuilt_from_mindspores_own_record(recorder_off):
    """MindSpore's optimizers keep their arguments (opt_init_args_register): no patch is needed to rebuild
    one built before pet_hooks did anything, groups, schedule and every setting included."""
    from pet_hooks.doors import flow
    net = build(seed=0, **SMALL)
    schedule = nn.ExponentialDecayLR(0.1, 0.9, 4)
    weights = [p for p in net.trainable_params() if not p.name.endswith("bias")]
    biases = [p for p in net.trainable_params() if p.name.endswith("bias")]
    optimizer = nn.Momentum([{"params": weights, "weight_decay": 0.01}, {"params": biases}], schedule,
                            momentum=0.7, loss_scale=4.0, use_nesterov=True)
    assert recorder_off.recorded_arguments(optimizer) is None
    pet_hooks.apply(net, CFG)
    new = flow.rebuild_optimizer(optimizer, net)
    assert type(new) is nn.Momentum and new.learning_rate is schedule
    assert np.isclose(float(new.momentum.asnumpy()), 0.7) and new.use_nesterov is True and new.loss_scale == 4.0
    assert {p.name for p in new.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
    assert not recorder_off.is_installed()                 # and nothing was patched for it


# (nn.AdamWeightDecay keeps no record: the recorder a door installs is its only source, tested below)
MINDSPORE_OPTIMIZERS = {**{key: make for key, make in OPTIMIZERS.items() if "adamw" not in key},
                        "lazy_adam": lambda net: nn.LazyAdam(net.trainable_params(), 1e-2, weight_decay=0.0),
                        "adagrad": lambda net: nn.Adagrad(net.trainable_params(), accum=0.2, learning_rate=0.05),
                        "rmsprop": lambda net: nn.RMSProp(net.trainable_params(), 0.01, decay=0.8, centered=True)}


@pytest.mark.parametrize("opt_name", list(MINDSPORE_OPTIMIZERS))
def test_every_mindspore_optimizer_built_before_any_door_is_rebuilt_from_its_record(recorder_off, opt_name):
    """nn.Adam's record holds its **kwargs as one dict ('kwargs': {}): it is spread back, not passed as a
    keyword named 'kwargs' (which Adam refuses). The rebuilt optimizer has the original's settings."""
    from pet_hooks.doors import flow
    net = build(seed=0, **SMALL)
    optimizer = MINDSPORE_OPTIMIZERS[opt_name](net)
    assert recorder_off.recorded_arguments(optimizer) is None
    pet_hooks.apply(net, CFG)
    new = flow.rebuild_optimizer(optimizer, net)
    assert type(new) is type(optimizer)
    assert {p.name for p in new.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
    settings = {key: value for key, value in optimizer.init_args.items() if not isinstance(value, dict)}
    assert {key: new.init_args[key] for key in settings} == settings
    assert new.init_learning_rate == optimizer.init_learning_rate


def test_another_optimizer_class_needs_the_recorder_a_door_installs(recorder_off):
    from pet_hooks.doors import flow

    class Scaled(nn.Optimizer):                           # no opt_init_args_register: keeps nothing
        def __init__(self, params, learning_rate, scale):
            super().__init__(learning_rate, params)
            self.scale = scale

        def construct(self, gradients):
            return True

    net = build(seed=0, **SMALL)
    before = Scaled(net.trainable_params(), 0.1, scale=3.0)
    pet_hooks.apply(net, CFG)
    with pytest.raises(pet_hooks.OptimizerRebuildError, match=r"Scaled.*build PetCallback before the optimizer"):
        flow.rebuild_optimizer(before, net)
    PetCallback(CFG)                                       # a door that rebuilds optimizers: the recorder now
    after = Scaled(net.get_parameters(), 0.1, scale=3.0)
    new = flow.rebuild_optimizer(after, net)
    assert type(new) is Scaled and new.scale == 3.0
    assert {p.name for p in new.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
