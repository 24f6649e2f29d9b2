"""Bottleneck adapters (``adapter``, ``low_rank_adapter``) against a NumPy reference, graph and PyNative.

The reference is written from MindPet's documentation (AdapterDense / LowRankAdapterDense):
``y = h + up(act(down(h)))`` after the layer and its activation, ``down``/``up`` dense
(``x @ W^T + b``) or low-rank (``x @ (left @ right) + b``), bottleneck ``width //
reduction_factor`` for the low-rank one. Outputs against the NumPy forward in float64; the
gradient of every adapter parameter against central differences of that NumPy forward.
Then: output unchanged at init, only the adapter trains, disable_adapters, remove, save/load.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.config.pet_config import NON_LINEARITIES
from tests.conftest import HAS_MINDFORMERS, assert_params_equal, snapshot

DIN, WIDTH = 5, 8
ADAPTER = {"pet_type": "adapter", "bottleneck_size": 3, "target_modules": ["layer"]}
LOW_RANK = {"pet_type": "low_rank_adapter", "reduction_factor": 2, "low_rank_size": 2, "target_modules": ["layer"]}


def _gelu_tanh(v):      # MindSpore's nn.GELU() (approximate=True, get_activation's "gelu")
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))


ACTS = {
    "gelu": _gelu_tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "silu": lambda v: v / (1.0 + np.exp(-v)),
    "fast_gelu": lambda v: v / (1.0 + np.exp(-1.702 * np.abs(v))) * np.exp(0.851 * (v - np.abs(v))),
}


class OneLayer(nn.Cell):
    """``layer``: nn.Dense with tanh, or MindFormers' Linear with weight stored [in, out]."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "dense":
            self.layer = nn.Dense(DIN, WIDTH, activation="tanh")
        else:
            from mindformers.modules.layers import Linear
            self.layer = Linear(DIN, WIDTH, transpose_b=False, compute_dtype=ms.float32, bias_init="normal")

    def construct(self, x):
        return self.layer(x)


KINDS = [pytest.param("dense", id="dense_tanh"),
         pytest.param("linear", id="mf_linear_in_out",
                      marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed"))]


def _base(net, x):
    """The layer's own output, float64."""
    cell = net.layer
    w = cell.weight.asnumpy().astype(np.float64)
    w = w if getattr(cell, "transpose_b", True) else w.T
    h = x @ w.T + cell.bias.asnumpy()
    return np.tanh(h) if getattr(cell, "activation_flag", False) else h


def _reference(h, p, act, low_rank):
    """MindPet's adapter on h (float64), parameters p by their leaf names."""
    if low_rank:
        down = h @ (p["low_rank_adapter_down_left"] @ p["low_rank_adapter_down_right"]) + p["low_rank_adapter_down_bias"]
        up_w = p["low_rank_adapter_up_left"] @ p["low_rank_adapter_up_right"]
        return h + ACTS[act](down) @ up_w + p["low_rank_adapter_up_bias"]
    down = h @ p["adapter_down_weight"].T + p["adapter_down_bias"]
    return h + ACTS[act](down) @ p["adapter_up_weight"].T + p["adapter_up_bias"]


def _randomise(net, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    values = {}
    for param in pet_hooks.delta_parameters(net):
        value = (rng.standard_normal(param.shape) * 0.5).astype(np.float32)
        param.set_data(Tensor(value))
        values[param.name.rsplit(".", 1)[-1]] = value.astype(np.float64)
    return values


def _numeric_grads(h, p, g, act, low_rank, eps=1e-6):
    """d sum(reference * g) / d p, central differences in float64."""
    grads = {}
    for name, value in p.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = value.copy(), value.copy()
            plus[name][index] += eps
            minus[name][index] -= eps
            grad[index] = ((_reference(h, plus, act, low_rank) - _reference(h, minus, act, low_rank)) * g).sum() / (2 * eps)
        grads[name] = grad
    return grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [ADAPTER, LOW_RANK], ids=["adapter", "low_rank_adapter"])
def test_output_and_gradients_equal_the_numpy_reference(mode, cfg, kind):
    net = OneLayer(kind)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, DIN)).astype(np.float32)
    g = rng.standard_normal((2, 3, WIDTH)).astype(np.float32)
    base = net(Tensor(x)).asnumpy()
    pet_hooks.apply(net, {**cfg, "non_linearity": "gelu"})
    np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), base)          # up starts at zero
    low_rank = cfg["pet_type"] == "low_rank_adapter"
    shapes = {p.name.rsplit(".", 1)[-1]: p.shape for p in pet_hooks.delta_parameters(net)}
    if low_rank:   # MindPet's sizes: bottleneck = width // reduction_factor, factors of rank low_rank_size
        assert shapes["low_rank_adapter_down_left"] == (WIDTH, 2) and shapes["low_rank_adapter_down_right"] == (2, 4)
        assert shapes["low_rank_adapter_up_left"] == (4, 2) and shapes["low_rank_adapter_up_right"] == (2, WIDTH)
    else:
        assert shapes["adapter_down_weight"] == (3, WIDTH) and shapes["adapter_up_weight"] == (WIDTH, 3)
    p = _randomise(net)

    params = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    _, grads = ms.value_and_grad(loss, None, params)(Tensor(x), Tensor(g))
    h = _base(net, x.astype(np.float64))
    expected = _reference(h, p, "gelu", low_rank)
    assert not np.allclose(expected, base, atol=1e-2)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    numeric = _numeric_grads(h, p, g.astype(np.float64), "gelu", low_rank)
    for param, grad in zip(params, grads):
        leaf = param.name.rsplit(".", 1)[-1]
        np.testing.assert_allclose(grad.asnumpy(), numeric[leaf], rtol=1e-4, atol=1e-4, err_msg=leaf)


@pytest.mark.parametrize("act", NON_LINEARITIES)
def test_every_non_linearity_is_the_documented_one(act):
    net = OneLayer("dense")
    x = np.random.default_rng(2).standard_normal((4, DIN)).astype(np.float32)
    pet_hooks.apply(net, {**ADAPTER, "non_linearity": act})
    p = _randomise(net)
    expected = _reference(_base(net, x.astype(np.float64)), p, act, low_rank=False)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [ADAPTER, LOW_RANK], ids=["adapter", "low_rank_adapter"])
def test_training_disable_remove_and_the_adapter_file(mode, cfg, tmp_path):
    net = OneLayer("dense")
    net.layer.bias.requires_grad = False                  # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((6, DIN)).astype(np.float32))
    target = Tensor(rng.standard_normal((6, WIDTH)).astype(np.float32))
    base = net(x).asnumpy()
    pet_hooks.apply(net, cfg)
    assert {p.name for p in net.trainable_params()} == {p.name for p in pet_hooks.delta_parameters(net)}
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 0.05))
    losses = [float(step(x, target).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)                      # the base bit for bit
    adapted = net(x).asnumpy()
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    pet_hooks.save_adapter(net, tmp_path)
    fresh = OneLayer("dense")
    for name, value in values.items():
        fresh.parameters_dict()[name].set_data(Tensor(value))
    pet_hooks.load_adapter(fresh, tmp_path)
    np.testing.assert_array_equal(fresh(x).asnumpy(), adapted)

    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert_params_equal(values, net)
    assert [p.name for p in net.get_parameters()] == list(values)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def test_initialisation_follows_mindpet_with_the_up_projection_at_zero():
    net = nn.SequentialCell([nn.Dense(4, 64)])
    pet_hooks.apply(net, {"pet_type": "adapter", "bottleneck_size": 32, "target_modules": ["0"], "seed": 0})
    down = net[0].adapter_down_weight.asnumpy()
    assert abs(down.std() - 0.01) < 0.001 and abs(down.mean()) < 0.001           # MindPet's 'normal'
    for name in ("adapter_down_bias", "adapter_up_weight", "adapter_up_bias"):
        assert not getattr(net[0], name).asnumpy().any(), name
    net = nn.SequentialCell([nn.Dense(4, 64)])
    pet_hooks.apply(net, {**LOW_RANK, "target_modules": ["0"], "low_rank_size": 8, "seed": 0})
    cell, bound = net[0], np.sqrt(6.0 / (64 + 8))                                  # xavier_uniform of [64, 8]
    left = cell.low_rank_adapter_down_left.asnumpy()
    assert left.shape == (64, 8) and np.abs(left).max() <= bound and np.abs(left).max() > 0.9 * bound
    assert np.abs(cell.low_rank_adapter_up_left.asnumpy()).max() > 0                # random, as MindPet
    for name in ("low_rank_adapter_up_right", "low_rank_adapter_up_bias", "low_rank_adapter_down_bias"):
        assert not getattr(cell, name).asnumpy().any(), name
    net = nn.SequentialCell([nn.Dense(4, 64)])
    pet_hooks.apply(net, {**LOW_RANK, "target_modules": ["0"], "low_rank_w_init": "normal", "seed": 0})
    assert abs(net[0].low_rank_adapter_down_left.asnumpy().std() - 0.01) < 0.003
