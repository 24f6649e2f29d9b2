"""LoRA on a table of tiny nets, each in graph and PyNative mode, against a NumPy reference.

Properties checked per case: output unchanged at init; the LoRA formula with non-zero
deltas; only deltas trainable; training moves only the deltas; remove, merge/unmerge and
disable_adapters; the result is the same in both modes.
"""
from __future__ import annotations


import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.nets import CASES, Case, _get

CASE_PARAMS = [pytest.param(c, id=c.name, marks=[NEEDS_MINDFORMERS] if c.needs_mindformers else [])
               for c in CASES]


def _lora(case: Case, **extra) -> dict:
    return {"pet_type": "lora", "lora_rank": 3, "lora_alpha": 6, "target_modules": case.pattern(), **extra}


def _randomise_deltas(net, case: Case, rng) -> None:
    for path in case.layers:
        cell = _get(net, path)
        for param in (cell.lora_A, cell.lora_B):
            value = rng.standard_normal(param.shape).astype(np.float32) * 0.3
            param.set_data(Tensor(value).astype(param.dtype))


def _out(net, x) -> np.ndarray:
    return net(x).astype(ms.float32).asnumpy()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_init_formula_disable_merge_unmerge_and_remove(mode, case, rng, caplog):
    """One net per case and mode (in graph mode each net and each class change is a compile): the output
    unchanged at init, the formula, disable_adapters, merge / unmerge, then remove restoring everything."""
    net = case.build()
    _get(net, case.layers[0]).weight.requires_grad = False  # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = case.input(rng)
    base = _out(net, x)                                # compiled before apply, on purpose
    pet_hooks.apply(net, _lora(case))
    np.testing.assert_array_equal(_out(net, x), base)  # B = 0: exactly the base output
    for path in case.layers:
        cell = _get(net, path)
        assert cell.lora_A.shape == (3, cell.in_channels) and cell.lora_B.shape == (cell.out_channels, 3)
        assert not cell.lora_B.asnumpy().any() and cell.lora_A.asnumpy().any()
        # case.reference reads the scaling off the cell: pin it to lora_alpha / lora_rank here, or
        # a wrong scaling would be compared with itself
        assert cell.lora_scaling == pytest.approx(6 / 3)
    _randomise_deltas(net, case, rng)
    out = net(x)
    assert out.dtype == case.dtype
    expected = case.reference(net, x.astype(ms.float32).asnumpy())
    assert not np.allclose(expected, base, atol=10 * case.tol), "the deltas should change the output"
    np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), expected, atol=case.tol, rtol=case.tol)

    # disable_adapters, merge / unmerge
    adapted = _out(net, x)
    assert not np.array_equal(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(_out(net, x), base)
    np.testing.assert_array_equal(_out(net, x), adapted)

    weights = {p: _get(net, p).weight.asnumpy().copy() for p in case.layers}
    pet_hooks.merge(net)
    for path in case.layers:  # the merged weight is W + scaling * B @ A (in its own layout)
        cell = _get(net, path)
        delta = cell.lora_scaling * (cell.lora_B.asnumpy() @ cell.lora_A.asnumpy())
        delta = delta if getattr(cell, "transpose_b", True) else delta.T
        np.testing.assert_allclose(cell.weight.asnumpy().astype(np.float32),
                                   weights[path].astype(np.float32) + delta, atol=case.tol * 10, rtol=case.tol)
    np.testing.assert_allclose(_out(net, x), adapted, atol=case.tol * 10, rtol=case.tol * 10)
    with caplog.at_level("WARNING", logger="pet_hooks"):
        pet_hooks.merge(net)
    assert "already merged" in caplog.text
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(_out(net, x), adapted, atol=case.tol * 10, rtol=case.tol * 10)
    for path in case.layers:
        np.testing.assert_allclose(_get(net, path).weight.asnumpy().astype(np.float32),
                                   weights[path].astype(np.float32), atol=case.tol * 10)
    with caplog.at_level("WARNING", logger="pet_hooks"):
        pet_hooks.unmerge(net)
    assert "not merged" in caplog.text

    # remove. Unmerge gives the adapted weights back within float rounding (checked just above), not bit for
    # bit: write them back as they were, so that what remove itself does to the values is checked bit for bit
    # (that apply and training leave every base value bit for bit: test_only_deltas_train_and_base_is_untouched)
    for path in case.layers:
        weight = _get(net, path).weight
        weight.set_data(Tensor(values[weight.name]))
    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert_params_equal(values, net)
    assert not any(hasattr(_get(net, p), "lora_A") for p in case.layers)
    np.testing.assert_array_equal(_out(net, x), base)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_only_deltas_train_and_base_is_untouched(mode, case, rng):
    net = case.build()
    pet_hooks.apply(net, _lora(case))
    names = sorted(p.name for p in net.trainable_params())
    assert names == sorted(f"{layer}.{d}" for layer in case.layers for d in ("lora_A", "lora_B"))
    assert [p.name for p in pet_hooks.delta_parameters(net)] == [f"{layer}.{d}" for layer in case.layers
                                                                 for d in ("lora_A", "lora_B")]
    base = {k: v for k, v in snapshot(net).items() if "lora_" not in k}
    deltas_before = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}
    loss_net = nn.WithLossCell(net, nn.MSELoss())
    step = nn.TrainOneStepCell(loss_net, nn.Momentum(net.trainable_params(), 0.05, 0.9))
    step.set_train(True)
    x = case.input(rng)
    target = Tensor(rng.standard_normal(net(x).shape).astype(np.float32)).astype(case.dtype)
    losses = [float(step(x, target).astype(ms.float32).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert_params_equal(base, net)
    for param in pet_hooks.delta_parameters(net):
        assert not np.array_equal(param.asnumpy(), deltas_before[param.name]), param.name


def test_graph_and_pynative_agree(rng):
    case = CASES[0]
    outs = []
    x = case.input(rng)
    for m in (0, 1):
        ms.set_context(mode=m)
        net = case.build()
        pet_hooks.apply(net, _lora(case, seed=7))
        fixed = np.random.default_rng(5)
        for param in net.get_parameters():  # identical weights and deltas in both runs
            param.set_data(Tensor(fixed.standard_normal(param.shape).astype(np.float32) * 0.3))
        outs.append(_out(net, x))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_dropout_only_on_the_branch(mode, rng):
    net = CASES[0].build()
    x = CASES[0].input(rng)
    base = _out(net, x)
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "lora_dropout": 0.5,
                          "target_modules": ".*dense1|.*dense2"})
    net.set_train(True)
    np.testing.assert_array_equal(_out(net, x), base)  # B = 0: dropout cannot touch the base path
    _randomise_deltas(net, CASES[0], rng)
    first, second = _out(net, x), _out(net, x)
    assert not np.array_equal(first, second), "dropout should make training outputs differ"
    net.set_train(False)
    np.testing.assert_allclose(_out(net, x), CASES[0].reference(net, x.asnumpy()), atol=1e-5)


def test_apply_twice_does_not_double_wrap(mode, rng):
    net = CASES[0].build()
    cfg = _lora(CASES[0])
    x = CASES[0].input(rng)
    pet_hooks.apply(net, cfg)
    cls = type(net.dense1)
    deltas = pet_hooks.delta_parameters(net)
    _randomise_deltas(net, CASES[0], rng)
    once = _out(net, x)
    pet_hooks.apply(net, cfg)
    assert type(net.dense1) is cls
    # One generated class straight over nn.Dense: a second wrap would add a class carrying its
    # own pet_base_construct (the first wrap's construct) to the MRO.
    generated = [k for k in cls.__mro__ if "pet_base_construct" in vars(k)]
    assert len(generated) == 1 and generated[0].pet_base_construct is nn.Dense.construct, cls.__mro__
    assert [k for k in cls.__mro__ if issubclass(k, nn.Cell)][:2] == [cls, nn.Dense]  # nothing in between
    assert len(pet_hooks.delta_parameters(net)) == 4
    assert all(a is b for a, b in zip(pet_hooks.delta_parameters(net), deltas))  # the same Parameters, not new ones
    np.testing.assert_array_equal(_out(net, x), once)  # the branch is added once, with the trained values
    with pytest.raises(ValueError, match="different config"):
        pet_hooks.apply(net, {**cfg, "lora_rank": 5})


def test_rslora_and_init_options(mode):
    net = CASES[0].build()
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "use_rslora": True,
                          "lora_a_init": "normal", "seed": 3, "target_modules": ["dense1"]})
    assert net.dense1.lora_scaling == pytest.approx(8 / 2.0)
    a = net.dense1.lora_A.asnumpy()
    assert abs(a.std() - 0.01) < 0.004  # MindFormers' 'normal' initializer: sigma 0.01
    other = CASES[0].build()
    pet_hooks.apply(other, {"pet_type": "lora", "lora_rank": 4, "target_modules": ["dense1"], "seed": 3})
    bound = 1.0 / np.sqrt(other.dense1.in_channels)  # kaiming_uniform(a=sqrt(5))
    a = other.dense1.lora_A.asnumpy()
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    assert other.dense1.lora_scaling == pytest.approx(16 / 4)
    again = CASES[0].build()
    pet_hooks.apply(again, {"pet_type": "lora", "lora_rank": 4, "target_modules": ["dense1"], "seed": 3})
    np.testing.assert_array_equal(again.dense1.lora_A.asnumpy(), a)  # seeded: same deltas on every rank


def test_freeze_exclude_keeps_named_params_trainable(mode):
    net = CASES[0].build()
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ["dense1"], "freeze_exclude": ["dense2.bias"]})
    assert sorted(p.name for p in net.trainable_params()) == ["dense1.lora_A", "dense1.lora_B", "dense2.bias"]
    assert [p.name for p in pet_hooks.delta_parameters(net)] == ["dense1.lora_A", "dense1.lora_B"]
    pet_hooks.remove(net)
    assert all(p.requires_grad for p in net.get_parameters())


def test_summary_counts(mode):
    net = CASES[0].build()
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 2, "target_modules": ["dense1"]})
    total = 6 * 10 + 10 + 10 * 4 + 4 + 2 * 6 + 10 * 2
    trainable = 2 * 6 + 10 * 2
    assert pet_hooks.trainable_summary(net) == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
