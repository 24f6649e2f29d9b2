"""A kind of cell of the user's own, taught to LoRA with ``pet_hooks.register_lora_kind``.

``RectProj`` is a projection pet_hooks does not know: ``relu(x @ K + c)`` with its kernel ``K`` stored
[in, out] under another name. Its kind (``RectProjKind``) says how to recognise it, where its weight
is and how it is stored, and its mixin adds LoRA's branch before the ReLU. Every number is checked
against NumPy, computed here from the parameter values, in graph and PyNative mode: the forward pass,
the gradient of the deltas, merge / unmerge (the kernel in its own layout), disable, remove, and the
adapter files. The dispatcher asks the registered kinds first, also for a subclass of a built-in
class, and a kind unregistered again leaves nets it adapted removable.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import pet_hooks
from pet_hooks.tuners.lora import LoraKind, LoraLayer
from pet_hooks.tuners.lora.dispatch import kind_of
from tests.conftest import assert_params_equal, snapshot

RANK, ALPHA = 4, 8
SCALING = ALPHA / RANK
TOL = 1e-5
LORA = {"pet_type": "lora", "lora_rank": RANK, "lora_alpha": ALPHA, "target_modules": ["proj", "head"]}


class RectProj(nn.Cell):
    """``relu(x @ K + c)``: the kernel stored [in, out], a bias, an activation; not a Dense."""

    def __init__(self, din: int, dout: int, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kernel = Parameter(Tensor(rng.normal(0, 0.3, (din, dout)).astype(np.float32)), name="kernel")
        self.offset = Parameter(Tensor(rng.normal(0, 0.1, (dout,)).astype(np.float32)), name="offset")

    def construct(self, x):
        return ops.relu(ops.matmul(x, self.kernel) + self.offset)


class LoraRectProj(LoraLayer):
    """``RectProj.construct`` with the branch added before the ReLU (inputs of any rank)."""

    def construct(self, x):
        x_shape = ops.shape(x)
        x2 = ops.reshape(x, (-1, x_shape[-1]))
        out = ops.matmul(x2, self.kernel) + self.offset + self._lora_branch(x2)
        return ops.relu(ops.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],)))


class RectProjKind(LoraKind):
    name = "tests.RectProj"
    mixin = LoraRectProj

    def recognises(self, cell):
        return isinstance(cell, RectProj)

    def io_channels(self, cell):
        din, dout = cell.kernel.shape
        return int(din), int(dout)

    def base_weight(self, cell):
        return cell.kernel

    def weight_is_out_in(self, cell):
        return False                    # [in, out]


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.proj = RectProj(6, 5)
        self.head = nn.Dense(5, 3, weight_init="normal", bias_init="normal")

    def construct(self, x):
        return self.head(self.proj(x))


@pytest.fixture
def rect_kind():
    kind = pet_hooks.register_lora_kind(RectProjKind())
    try:
        yield kind
    finally:
        pet_hooks.unregister_lora_kind(kind)


def _x(rng) -> np.ndarray:
    return rng.standard_normal((2, 3, 6)).astype(np.float32)


def _values(net) -> dict:
    return {p.name: p.asnumpy().astype(np.float64) for p in net.get_parameters()}


def _randomise_deltas(net, rng) -> None:
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))


def _reference(v: dict, x: np.ndarray, lora: bool = True):
    """NumPy forward (float64) and what the gradient of sum(output) needs: (output, proj's output relu(z))."""
    x2 = x.reshape(-1, 6).astype(np.float64)
    z = x2 @ v["proj.kernel"] + v["proj.offset"]
    if lora:
        z = z + SCALING * (x2 @ v["proj.lora_A"].T) @ v["proj.lora_B"].T
    y1 = np.maximum(z, 0.0)
    out = y1 @ v["head.weight"].T + v["head.bias"]
    if lora:
        out = out + SCALING * (y1 @ v["head.lora_A"].T) @ v["head.lora_B"].T
    return out.reshape(2, 3, 3), y1


def test_a_cell_of_an_unknown_kind_is_refused_until_its_kind_is_registered(mode):
    net = Net()
    before = snapshot(net)
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'proj'.*RectProj") as err:
        pet_hooks.apply(net, LORA)
    assert "LoRA adapts mindspore.nn.Dense" in str(err.value)
    assert type(net.proj) is RectProj and type(net.head) is nn.Dense
    assert_params_equal(before, net)
    kind = pet_hooks.register_lora_kind(RectProjKind())
    try:
        assert kind_of(net.proj) is kind
        with pytest.raises(ValueError, match="registered already"):
            pet_hooks.register_lora_kind(kind)
        other = Net()
        pet_hooks.apply(other, LORA)
        assert type(other.proj).__name__ == "LoraRectProj_of_RectProj"
    finally:
        pet_hooks.unregister_lora_kind(kind)
    assert kind_of(net.proj) is None
    pet_hooks.remove(other)               # the record keeps the kind: removable after unregistering
    assert type(other.proj) is RectProj and not hasattr(other.proj, "lora_A")
    with pytest.raises(KeyError):
        pet_hooks.unregister_lora_kind(kind)


def test_register_refuses_what_is_not_a_kind():
    with pytest.raises(TypeError, match="not a pet_hooks.tuners.lora.LoraKind"):
        pet_hooks.register_lora_kind(RectProj(2, 2))

    class NoMixin(RectProjKind):
        mixin = None
    with pytest.raises(TypeError, match="needs a mixin"):
        pet_hooks.register_lora_kind(NoMixin())


def test_custom_kind_forward_gradient_disable_and_remove_against_numpy(mode, rect_kind, rng):
    net = Net()
    names_before = sorted(p.name for p in net.get_parameters())
    before = snapshot(net)
    x = _x(rng)
    base = net(Tensor(x)).asnumpy()
    np.testing.assert_allclose(base, _reference(_values(net), x, lora=False)[0], rtol=TOL, atol=TOL)

    pet_hooks.apply(net, LORA)
    assert [(p.name, tuple(p.shape)) for p in pet_hooks.delta_parameters(net)] == [
        ("proj.lora_A", (RANK, 6)), ("proj.lora_B", (5, RANK)), ("head.lora_A", (RANK, 5)), ("head.lora_B", (3, RANK))]
    assert sorted(p.name for p in net.trainable_params()) == sorted(p.name for p in pet_hooks.delta_parameters(net))
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), base, rtol=TOL, atol=TOL)     # B starts at zero

    _randomise_deltas(net, rng)
    adapted = net(Tensor(x)).asnumpy()
    reference, y1 = _reference(_values(net), x)
    np.testing.assert_allclose(adapted, reference, rtol=TOL, atol=TOL)
    assert np.abs(adapted - base).max() > 20 * TOL                 # the adapter shows

    # d sum(out) / d proj.lora_B = s * dz^T @ (x A^T), dz = (1 @ (W_h + s B_h A_h)) * (z > 0)
    v = _values(net)
    def loss(inp):
        return net(inp).sum()

    grads = ms.grad(loss, grad_position=None, weights=[net.proj.lora_B, net.proj.lora_A])(Tensor(x))
    dy1 = np.ones((6, 3)) @ (v["head.weight"] + SCALING * v["head.lora_B"] @ v["head.lora_A"])
    dz = dy1 * (y1 > 0)
    x2 = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(grads[0].asnumpy(), SCALING * dz.T @ (x2 @ v["proj.lora_A"].T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1].asnumpy(), SCALING * (dz @ v["proj.lora_B"]).T @ x2, rtol=1e-4, atol=1e-5)

    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), net(Tensor(x)).asnumpy())
        np.testing.assert_allclose(net(Tensor(x)).asnumpy(), base, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), adapted, rtol=TOL, atol=TOL)

    pet_hooks.remove(net)
    assert type(net.proj) is RectProj and type(net.head) is nn.Dense
    assert sorted(p.name for p in net.get_parameters()) == names_before
    assert not {"lora_A", "lora_B", "pet_lora_scale", "lora_dropout"} & (set(net.proj.__dict__) | set(net.proj._params))
    assert_params_equal(before, net)
    np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), base)


def test_custom_kind_merge_writes_the_kernel_in_its_own_layout_and_the_files_round_trip(mode, rect_kind, rng,
                                                                                         tmp_path):
    net = pet_hooks.apply(Net(), LORA)
    _randomise_deltas(net, rng)
    x = _x(rng)
    adapted = net(Tensor(x)).asnumpy()
    v = _values(net)
    kernel = net.proj.kernel.asnumpy().copy()

    pet_hooks.merge(net)
    expected = v["proj.kernel"] + SCALING * (v["proj.lora_B"] @ v["proj.lora_A"]).T      # [in, out]
    np.testing.assert_allclose(net.proj.kernel.asnumpy(), expected, rtol=1e-6, atol=1e-6)
    assert np.abs(net.proj.kernel.asnumpy() - kernel).max() > 20 * 1e-6
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), adapted, rtol=TOL, atol=TOL)
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(net.proj.kernel.asnumpy(), kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), adapted, rtol=TOL, atol=TOL)

    pet_hooks.save_adapter(net, tmp_path)
    other = Net()                                   # the same base weights (seeded kernel, the head copied)
    other.head.weight.set_data(Tensor(v["head.weight"].astype(np.float32)))
    other.head.bias.set_data(Tensor(v["head.bias"].astype(np.float32)))
    pet_hooks.load_adapter(other, tmp_path)
    assert type(other.proj).__name__ == "LoraRectProj_of_RectProj"
    np.testing.assert_allclose(other(Tensor(x)).asnumpy(), _reference(v, x)[0], rtol=TOL, atol=TOL)


def test_custom_kind_takes_several_adapters_and_one_per_row(mode, rect_kind, rng):
    """Two adapters of different ranks on the custom cell: each alone, both summed, one per row of a batch."""
    net = pet_hooks.apply(Net(), {**LORA, "target_modules": ["proj"]})
    pet_hooks.add_adapter(net, "other", {**LORA, "lora_rank": 2, "lora_alpha": 6, "target_modules": ["proj"]})
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    values = {name: {"A": rng.normal(0, 0.5, (r, 6)), "B": rng.normal(0, 0.5, (5, r)), "s": s}
              for name, r, s in (("default", RANK, SCALING), ("other", 2, 3.0))}
    for name, v in values.items():              # written through the adapter's own parameters while active
        pet_hooks.set_adapter(net, name)
        net.proj.lora_A.set_data(Tensor(v["A"].astype(np.float32)))
        net.proj.lora_B.set_data(Tensor(v["B"].astype(np.float32)))
    base = _values(net)

    def reference(names, rows):
        z = rows.reshape(-1, 6).astype(np.float64) @ base["proj.kernel"] + base["proj.offset"]
        for name in names:
            v = values[name]
            z = z + v["s"] * (rows.reshape(-1, 6) @ v["A"].T) @ v["B"].T
        out = np.maximum(z, 0.0) @ base["head.weight"].T + base["head.bias"]
        return out.reshape(rows.shape[:-1] + (3,))

    for names in (["default"], ["other"], ["default", "other"]):
        pet_hooks.set_adapter(net, names)
        np.testing.assert_allclose(net(Tensor(x)).asnumpy(), reference(names, x), rtol=TOL, atol=TOL)
    assert np.abs(reference(["other"], x) - reference(["default"], x)).max() > 20 * TOL
    net.set_train(False)
    with pet_hooks.adapter_per_row(net, ["other", "default"]):
        out = net(Tensor(x)).asnumpy()
    np.testing.assert_allclose(out[0], reference(["other"], x[:1])[0], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(out[1], reference(["default"], x[1:])[0], rtol=TOL, atol=TOL)


def test_variants_and_inits_the_kind_does_not_list_are_refused(rect_kind):
    net = Net()
    before = snapshot(net)
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'proj'.*RectProj.*DoRA.*not supported"):
        pet_hooks.apply(net, {**LORA, "use_dora": True})
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'proj'.*RectProj.*pissa"):
        pet_hooks.apply(net, {**LORA, "init_lora_weights": "pissa"})
    assert type(net.proj) is RectProj
    assert_params_equal(before, net)


class ScaledDense(nn.Dense):
    """A Dense with a construct of its own: the built-in Dense kind refuses it."""

    def construct(self, x):
        return super().construct(x) * 2.0


class LoraScaledDense(LoraLayer):
    def construct(self, x):
        out = self.matmul(x, self.weight) + self.bias + self._lora_branch(x)
        return out * 2.0


class ScaledDenseKind(LoraKind):
    name = "tests.ScaledDense"
    mixin = LoraScaledDense

    def recognises(self, cell):
        return isinstance(cell, ScaledDense)


def test_a_registered_kind_is_asked_before_the_built_in_ones(mode, rng):
    net = nn.SequentialCell([ScaledDense(4, 3)])
    with pytest.raises(pet_hooks.UnsupportedCellError, match="overrides Dense.construct"):
        pet_hooks.apply(net, {**LORA, "target_modules": ["0"]})
    kind = pet_hooks.register_lora_kind(ScaledDenseKind())
    try:
        x = rng.standard_normal((5, 4)).astype(np.float32)
        pet_hooks.apply(net, {**LORA, "target_modules": ["0"]})
        _randomise_deltas(net, rng)
        v = _values(net)
        expected = 2.0 * (x @ v["0.weight"].T + v["0.bias"] + SCALING * (x @ v["0.lora_A"].T) @ v["0.lora_B"].T)
        np.testing.assert_allclose(net(Tensor(x)).asnumpy(), expected, rtol=TOL, atol=TOL)
    finally:
        pet_hooks.unregister_lora_kind(kind)
