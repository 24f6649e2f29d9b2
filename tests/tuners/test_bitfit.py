"""BitFit against a NumPy reference, in graph and PyNative mode.

Three SGD steps on a tiny Dense net must move the selected biases exactly as plain SGD on the
bias gradients computed by hand in NumPy, and leave every other parameter bit for bit; then
the contract: only the biases train, disable_adapters, remove (values and flags back), the
adapter file holds the biases and loads them back, and target_modules selects among the
cells that have a bias.
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor, nn
from safetensors.numpy import load_file

import pet_hooks
from samples.tiny_gpt import build
from tests.conftest import SMALL, assert_params_equal, snapshot
from tests.nets import TwoDense

LR = 0.1


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)


def _numpy_sgd(net, x, t, steps, train_first=True):
    """Biases after ``steps`` SGD steps on mean squared error, gradients by hand (float64)."""
    w1, b1 = net.dense1.weight.asnumpy().astype(np.float64), net.dense1.bias.asnumpy().astype(np.float64)
    w2, b2 = net.dense2.weight.asnumpy().astype(np.float64), net.dense2.bias.asnumpy().astype(np.float64)
    for _ in range(steps):
        pre = x @ w1.T + b1
        h = np.maximum(pre, 0.0)
        out = h @ w2.T + b2
        d_out = 2.0 * (out - t) / out.size             # d mean((out - t)^2) / d out
        d_b2 = d_out.sum(axis=0)
        d_b1 = ((d_out @ w2) * (pre > 0)).sum(axis=0)
        if train_first:
            b1 = b1 - LR * d_b1
        b2 = b2 - LR * d_b2
    return b1, b2


def _train(net, x, t, steps):
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), LR))
    for _ in range(steps):
        step(Tensor(x), Tensor(t))


@pytest.mark.parametrize("targets", [None, ".*dense2"], ids=["all", "dense2"])
def test_biases_follow_numpy_sgd_and_nothing_else_moves(mode, targets):
    net = TwoDense("relu")
    x, t = _data()
    before = snapshot(net)
    expected_b1, expected_b2 = _numpy_sgd(net, x, t, steps=3, train_first=targets is None)
    cfg = {"pet_type": "bitfit"} if targets is None else {"pet_type": "bitfit", "target_modules": targets}
    pet_hooks.apply(net, cfg)
    trained = sorted(p.name for p in net.trainable_params())
    assert trained == (["dense1.bias", "dense2.bias"] if targets is None else ["dense2.bias"])
    assert [p.name for p in pet_hooks.delta_parameters(net)] == trained
    _train(net, x, t, steps=3)
    np.testing.assert_allclose(net.dense1.bias.asnumpy(), expected_b1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.dense2.bias.asnumpy(), expected_b2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(net.dense2.bias.asnumpy(), before["dense2.bias"])
    assert_params_equal(before, net, [name for name in before if name not in trained])


def test_disable_remove_and_flags(mode):
    net = TwoDense("relu")
    net.dense1.bias.requires_grad = False                  # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x, t = _data()
    base = net(Tensor(x)).asnumpy()
    pet_hooks.apply(net, {"pet_type": "bitfit"})
    assert net.dense1.bias.requires_grad and not net.dense1.weight.requires_grad
    _train(net, x, t, steps=2)
    adapted = net(Tensor(x)).asnumpy()
    assert not np.allclose(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), base)
    np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), adapted)
    with pytest.raises(pet_hooks.PetStateError, match="no weights to merge"):
        pet_hooks.merge(net)
    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), base)


def test_the_adapter_file_holds_the_biases_and_loads_them_back(mode, tmp_path):
    net = pet_hooks.apply(TwoDense("relu"), {"pet_type": "bitfit"})
    x, t = _data()
    _train(net, x, t, steps=2)
    expected = net(Tensor(x)).asnumpy()
    pet_hooks.save_adapter(net, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == ["dense1.bias", "dense2.bias"]
    np.testing.assert_array_equal(saved["dense2.bias"], net.dense2.bias.asnumpy())

    fresh = TwoDense("relu")
    for name in ("dense1.weight", "dense2.weight"):        # the same base, other biases
        fresh.parameters_dict()[name].set_data(net.parameters_dict()[name].data.copy())
    original = snapshot(fresh)
    pet_hooks.load_adapter(fresh, tmp_path)
    np.testing.assert_array_equal(fresh(Tensor(x)).asnumpy(), expected)
    pet_hooks.remove(fresh)
    assert_params_equal(original, fresh)


def test_selection_on_the_sample_gpt():
    net = build(seed=0, **SMALL)
    pet_hooks.apply(net, {"pet_type": "bitfit", "exclude_layers": ["blocks\\.1"]})
    names = sorted(p.name for p in net.trainable_params())
    assert names and all(name.startswith("blocks.0.") and name.endswith(".bias") for name in names)
    assert "blocks.0.ln1.beta" not in names and len(names) == 6     # dense1-3, projection, mapping, projection
    pet_hooks.remove(net)
    with pytest.raises(pet_hooks.UnsupportedCellError, match="'head'.*Dense.*which this method cannot adapt"):
        pet_hooks.apply(net, {"pet_type": "bitfit", "target_modules": ["head"]})   # has_bias=False
    assert not pet_hooks.surgery.has_pet(net)


def test_a_grouped_optimizer_keeps_each_bias_in_its_own_group():
    """Scripts commonly put biases in a group without weight decay; BitFit's biases stay there."""
    from pet_hooks.doors.flow import params_for_optimizer
    net = TwoDense("relu")
    weights = [p for p in net.trainable_params() if p.name.endswith("weight")]
    biases = [p for p in net.trainable_params() if p.name.endswith("bias")]
    groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}]
    pet_hooks.apply(net, {"pet_type": "bitfit"})
    regrouped = params_for_optimizer(groups, net)
    assert len(regrouped) == 1 and regrouped[0]["weight_decay"] == 0.0
    assert [p.name for p in regrouped[0]["params"]] == ["dense1.bias", "dense2.bias"]
