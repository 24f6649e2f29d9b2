"""enable(): models built inside get PET, optimizers built inside get the deltas, everything restored."""
from __future__ import annotations

import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.experimental import optim as experimental
from mindspore.experimental.optim import Optimizer as ExperimentalOptimizer

import pet_hooks
from pet_hooks.utils.patching import PatchSet, is_patched
from pet_hooks.surgery.core import has_pet
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import SMALL, assert_params_equal, snapshot

CFG = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3"}
PATCHED = [(nn.Cell, "__init__"), (nn.Optimizer, "__init__"), (ExperimentalOptimizer, "__init__")]


# PyNative ops run synchronously here (tests/conftest.py: synchronous_pynative)
pytestmark = pytest.mark.usefixtures("synchronous_pynative")


def _originals():
    return {(owner, name): owner.__dict__.get(name) for owner, name in PATCHED}


@pytest.mark.parametrize("params", ["get_parameters", "trainable_params", "grouped"])
def test_models_and_optimizers_built_inside(mode, params):
    before_block = build(seed=0, **SMALL)
    with pet_hooks.enable(CFG) as session:
        net = build(seed=0, **SMALL)
        base = snapshot(net)
        if params == "grouped":
            weights = [p for p in net.trainable_params() if p.name.endswith("weight")]
            rest = [p for p in net.trainable_params() if not p.name.endswith("weight")]
            arg = [{"params": weights, "weight_decay": 0.01}, {"params": rest}]
        else:
            arg = getattr(net, params)()
        optimizer = nn.AdamWeightDecay(arg, 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
        batches = lm_batches(8, 4, seed=2)
        losses = [float(step(*map(Tensor, next(batches))).asnumpy()) for _ in range(6)]
    after_block = build(seed=0, **SMALL)
    assert session.models == [net]
    marks = {block.cell_init_args for block in net.blocks}             # one compiled graph for both blocks
    assert len(marks) == 1 and marks.pop().startswith("lazy_inline_Block_pet_hooks_")
    assert {p.name for p in optimizer.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
    assert_params_equal(base, net)
    assert losses[-1] < losses[0]
    assert not has_pet(before_block) and not has_pet(after_block)
    assert not has_pet(optimizer) and not has_pet(step.network.loss)


@pytest.mark.parametrize("kind", ["AdamW", "SGD_grouped"])
def test_torch_style_optimizers_built_inside_hold_only_the_deltas(mode, kind):
    """mindspore.experimental.optim (torch's formulas, another base class than nn.Optimizer): built in the
    block over the model's parameters, it gets the deltas and the model is adapted then, so a loop in the
    block trains only them. (Before: it kept every base parameter, the model was adapted only when the block
    ended, and the loop fine-tuned the whole model.)"""
    with pet_hooks.enable(CFG):
        net = build(seed=0, **SMALL)
        base = snapshot(net)
        if kind == "AdamW":
            optimizer = experimental.AdamW(net.trainable_params(), lr=1e-2)
        else:
            weights = [p for p in net.trainable_params() if p.name.endswith("weight")]
            rest = [p for p in net.trainable_params() if not p.name.endswith("weight")]
            optimizer = experimental.SGD([{"params": weights, "lr": 0.1}, {"params": rest}], lr=0.05)
        assert has_pet(net)
        loss_of = GPTWithLoss(net)
        grad = ms.value_and_grad(loss_of, None, optimizer.parameters)
        batch = [Tensor(x) for x in next(lm_batches(8, 4, seed=2))]     # one batch: its loss must fall
        losses = []
        for _ in range(4):
            loss, grads = grad(*batch)
            optimizer(grads)
            losses.append(float(loss.asnumpy()))
    assert {p.name for p in optimizer.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
    assert_params_equal(base, net)
    assert losses[-1] < losses[0]
    if kind == "SGD_grouped":   # each delta joined the group of its layer's weight, with that group's lr
        groups = [{p.name for p in g["params"]} for g in optimizer.param_groups]
        assert all(name.endswith(("lora_A", "lora_B")) for name in groups[0]) and len(groups) == 1


def test_model_without_optimizer_is_adapted_at_exit():
    with pet_hooks.enable(CFG) as session:
        net = build(seed=0, **SMALL)
        loss_only = nn.MSELoss()
    assert session.models == [net] and has_pet(net) and not has_pet(loss_only)


def test_every_patch_is_restored_even_when_the_body_raises():
    originals = _originals()
    with pytest.raises(KeyError, match="boom"):
        with pet_hooks.enable(CFG):
            assert all(is_patched(owner.__dict__[name]) for owner, name in PATCHED)
            raise KeyError("boom")
    assert _originals() == originals
    assert all(owner.__dict__.get(name) is originals[(owner, name)] for owner, name in PATCHED)


def test_patch_matrix_enter_exit_reenter():
    originals = _originals()
    for _ in range(3):                                   # enter / exit / re-enter
        with pet_hooks.enable(CFG):
            for owner, name in PATCHED:
                wrapper = owner.__dict__[name]
                assert is_patched(wrapper) and not is_patched(wrapper.__wrapped__)  # not double-wrapped
                assert wrapper.__wrapped__ is originals[(owner, name)]
        assert all(owner.__dict__.get(name) is originals[(owner, name)] for owner, name in PATCHED)
    with pet_hooks.enable(CFG):
        with pytest.raises(RuntimeError, match="does not nest"):
            with pet_hooks.enable(CFG):
                pass
        assert all(is_patched(owner.__dict__[name]) for owner, name in PATCHED)  # the outer block is intact
    assert _originals() == originals


def test_bad_config_patches_nothing():
    originals = _originals()
    with pytest.raises(ValueError, match="lora_rank"):
        with pet_hooks.enable({**CFG, "lora_rank": -1}):
            pass
    assert _originals() == originals


def test_nothing_matches_is_an_error_and_leaves_no_patch():
    originals = _originals()
    with pytest.raises(ValueError, match="'.*nothing' matches no cell"):
        with pet_hooks.enable({**CFG, "target_modules": ".*nothing"}):
            net = build(seed=0, **SMALL)
            nn.Adam(net.trainable_params(), 1e-3)
    assert _originals() == originals and not has_pet(net)


def test_callback_and_enable_adapt_once(mode):
    from mindspore.train import Model
    import mindspore.dataset as ds
    from samples.tiny_gpt import LMLoss
    batches = lm_batches(8, 4, seed=3)
    with pet_hooks.enable(CFG) as session:
        net = build(seed=0, **SMALL)
        optimizer = nn.Adam(net.trainable_params(), 1e-2)
        model = Model(net, LMLoss(), optimizer)
        model.train(1, ds.GeneratorDataset([next(batches) for _ in range(2)], ["a", "b"], shuffle=False),
                    callbacks=[pet_hooks.PetCallback(CFG)])
    assert session.models == [net] and model.train_network.optimizer is optimizer  # nothing rebuilt
    assert len(pet_hooks.delta_parameters(net)) == 8


def test_patchset_restores_inherited_and_own_attributes():
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        pass

    patches = PatchSet()
    patches.wrap(Child, "f", lambda wrapped, instance, args, kwargs: "patched")
    patches.set(Base, "g", 1)
    assert Child().f() == "patched" and Base().f() == "base" and Base.g == 1
    with pytest.raises(RuntimeError, match="already patched"):
        patches.wrap(Child, "f", lambda *a: None)
    patches.undo()
    patches.undo()                                       # twice is harmless
    assert "f" not in Child.__dict__ and not hasattr(Base, "g") and Child().f() == "base"
