"""DARE in ``add_weighted_adapter`` (``dare_linear``, ``dare_ties`` and their ``_svd`` forms): what holds
whatever the masks, since pet_hooks draws its own from ``seed`` (the agreement with PEFT on the same
masks is in tests/multi/test_weighted_math.py).

- Statistics, over many seeds: DARE keeps each entry with probability ``p`` and divides it by ``p``,
  so the mean of ``dare_linear``'s A (and B) is ``linear``'s, and the mean delta of ``dare_linear_svd``
  at full rank is the weighted sum of the deltas. ``dare_ties`` is *not* ``ties`` on average (an entry
  kept with fewer others is averaged over fewer); its exact mean and variance per entry come from the
  ``2**n`` keep patterns, enumerated here with a scalar TIES written in the test. Every tolerance is
  derived from the per-entry variance (a z-score bound with a family-wise false-alarm rate of 1e-6),
  and the sum of squared z-scores is checked against its chi-square law, which also tests the variance,
  i.e. that the masks are independent Bernoulli(p).
- Seeds: the same seed gives the same adapter, another seed another one, a cell's masks do not depend
  on the other cells.
- On a net, graph and PyNative mode: ``pet_hooks.add_weighted_adapter`` with a DARE type makes the adapter
  ``combine`` makes from the adapters' A and B (written by the test), and the net's output with it
  active is the NumPy forward with those A and B.
"""
from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from pet_hooks.errors import PetConfigError
from pet_hooks.multi.weighted import AdapterWeights, combine, dare_masks

CELLS = {"fc1": (12, 16), "fc2": (16, 10)}  # path -> (in, out)
RUNS = 1500  # seeds averaged over
FAMILY_ALPHA = 1e-6  # chance that a correct implementation fails a check (all entries together)


def _adapter(rng, name: str, rank: int, alpha: float) -> AdapterWeights:
    tensors = {path: (rng.standard_normal((rank, fan_in)).astype(np.float32),
                      rng.standard_normal((fan_out, rank)).astype(np.float32))
               for path, (fan_in, fan_out) in CELLS.items()}
    return AdapterWeights(name=name, rank=rank, alpha=alpha, scaling=alpha / rank, target_paths=list(CELLS),
                          tensors=tensors)


@pytest.fixture(scope="module")
def three():
    rng = np.random.default_rng(7)
    return [_adapter(rng, "p", 3, 6.0), _adapter(rng, "q", 3, 3.0), _adapter(rng, "r", 3, 4.5)]


WEIGHTS = [0.7, -1.2, 0.5]


def _check_mean(samples: np.ndarray, mean: np.ndarray, variance: np.ndarray, what: str) -> None:
    """``samples`` [runs, ...] have the per-entry ``mean`` and ``variance``: each entry's z-score within a
    Bonferroni bound, and the sum of z^2 (chi-square with one degree per entry) within 6 sd of its mean."""
    runs = samples.shape[0]
    keep = variance > 1e-12  # an entry no mask can change (all values 0) must be exact
    np.testing.assert_allclose(samples.mean(axis=0)[~keep], mean[~keep], rtol=1e-5, atol=1e-6, err_msg=what)
    z = (samples.mean(axis=0)[keep] - mean[keep]) / np.sqrt(variance[keep] / runs)
    n = z.size
    bound = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * n))
    assert np.abs(z).max() < bound, f"{what}: max |z| {np.abs(z).max():.2f} over {n} entries (bound {bound:.2f})"
    chi2 = float((z ** 2).sum())
    assert abs(chi2 - n) < 6 * math.sqrt(2 * n), f"{what}: sum z^2 = {chi2:.1f} for {n} entries"


def _linear_weights(adapters, weights):
    """PEFT's split of w*s into the A and B weights (sign on A only)."""
    factors = [w * a.scaling for a, w in zip(adapters, weights)]
    return ([math.copysign(math.sqrt(abs(f)), f) for f in factors], [math.sqrt(abs(f)) for f in factors])


def test_dare_linear_averages_to_linear(three):
    """E[dare_linear] = linear, entry by entry, for A and B; Var = sum_i w_i^2 x_i^2 (1 - p) / p."""
    density = 0.4
    linear = combine(three, WEIGHTS, "linear")
    runs = [combine(three, WEIGHTS, "dare_linear", density=density, seed=seed) for seed in range(RUNS)]
    weights_a, weights_b = _linear_weights(three, WEIGHTS)
    for path in CELLS:
        for side, weights in ((0, weights_a), (1, weights_b)):
            values = np.stack([a.tensors[path][side].astype(np.float64) for a in three])
            variance = sum(w ** 2 * v ** 2 for w, v in zip(weights, values)) * (1 - density) / density
            samples = np.stack([run.tensors[path][side] for run in runs]).astype(np.float64)
            _check_mean(samples, linear.tensors[path][side].astype(np.float64), variance, f"{path} {'AB'[side]}")


def _ties_scalar(values, weights, sign_method):
    """TIES' disjoint merge of one entry: majority sign of the (pruned) values, weighted mean of those agreeing."""
    signs = [int(v > 0) - int(v < 0) for v in values]
    elected = sum(values) if sign_method == "total" else sum(signs)
    majority = 1 if elected >= 0 else -1
    agree = [s == majority for s in signs]
    return sum(w * v for w, v, a in zip(weights, values, agree) if a) / max(sum(agree), 1)


def _dare_ties_moments(values: np.ndarray, weights, density: float, sign_method: str):
    """Exact mean and variance of dare_ties per entry: every keep pattern with its probability."""
    n = values.shape[0]
    flat = values.reshape(n, -1).astype(np.float64)
    first, second = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for pattern in itertools.product((0, 1), repeat=n):
        chance = math.prod(density if kept else 1 - density for kept in pattern)
        for j in range(flat.shape[1]):
            out = _ties_scalar([flat[i, j] / density if pattern[i] else 0.0 for i in range(n)], weights, sign_method)
            first[j] += chance * out
            second[j] += chance * out ** 2
    return first.reshape(values.shape[1:]), (second - first ** 2).reshape(values.shape[1:])


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_dare_ties_mean_is_its_exact_expectation(three, sign_method):
    """E[dare_ties] per entry = the enumeration over keep patterns. It is not ties: on entries whose n values
    share a sign it is sum_i w_i x_i (1 - (1-p)^n) / (n p), where ties (nothing pruned) gives sum_i w_i x_i / n."""
    density = 0.5
    runs = [combine(three, WEIGHTS, "dare_ties", density=density, seed=seed, majority_sign_method=sign_method)
            for seed in range(RUNS)]
    weights_a, weights_b = _linear_weights(three, WEIGHTS)
    n = len(three)
    for path in CELLS:
        for side, weights in ((0, weights_a), (1, weights_b)):
            values = np.stack([a.tensors[path][side] for a in three]).astype(np.float64)
            mean, variance = _dare_ties_moments(values, weights, density, sign_method)
            samples = np.stack([run.tensors[path][side] for run in runs]).astype(np.float64)
            _check_mean(samples, mean, variance, f"{path} {'AB'[side]} {sign_method}")
            # the reasoning behind "not ties": where all values share a sign, an adapter kept contributes
            # w x / p divided by 1 + Binomial(n-1, p) kept others: E = sum_i w_i x_i (1 - (1-p)^n) / (n p)
            same = (np.abs(np.sign(values).sum(axis=0)) == n)
            assert same.sum() > 5
            closed = sum(w * v for w, v in zip(weights, values)) * (1 - (1 - density) ** n) / (n * density)
            np.testing.assert_allclose(mean[same], closed[same], rtol=1e-12, atol=1e-12)
            ties_value = sum(w * v for w, v in zip(weights, values)) / n  # ties with density 1 there
            assert not np.allclose(mean[same], ties_value[same])


@pytest.mark.parametrize("how", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_svd_at_full_rank_averages_the_deltas(three, how):
    """At a rank holding the whole merged delta the SVD reproduces it, so the mean delta is E[merge of the
    deltas]: the weighted sum of w_i s_i B_i A_i for dare_linear_svd, the enumeration for dare_ties_svd."""
    density = 0.6
    runs = [combine(three, WEIGHTS, how, density=density, seed=seed, svd_rank=16, svd_full_matrices=False)
            for seed in range(RUNS // 3)]
    for path in CELLS:
        deltas = np.stack([a.scaling * (a.tensors[path][1].astype(np.float64) @ a.tensors[path][0]) for a in three])
        if how == "dare_linear_svd":
            mean = sum(w * d for w, d in zip(WEIGHTS, deltas))
            variance = sum(w ** 2 * d ** 2 for w, d in zip(WEIGHTS, deltas)) * (1 - density) / density
        else:
            mean, variance = _dare_ties_moments(deltas, WEIGHTS, density, "total")
        samples = np.stack([run.scaling * (run.tensors[path][1].astype(np.float64) @ run.tensors[path][0])
                            for run in runs])
        _check_mean(samples, mean, variance, f"{how} {path}")


def test_seeds(three):
    """Same seed, same adapter (bit for bit); another seed, another one; density 1 is linear (PEFT: no
    pruning); a cell's masks do not depend on which other cells the adapters have."""
    for how in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        first = combine(three, WEIGHTS, how, density=0.5, seed=3)
        again = combine(three, WEIGHTS, how, density=0.5, seed=3)
        other = combine(three, WEIGHTS, how, density=0.5, seed=4)
        for path in CELLS:
            for side in (0, 1):
                assert np.array_equal(first.tensors[path][side], again.tensors[path][side]), (how, path)
                assert not np.allclose(first.tensors[path][side], other.tensors[path][side]), (how, path)
    with pytest.warns(UserWarning, match="no pruning"):
        full = combine(three, WEIGHTS, "dare_linear", density=1.0, seed=3)
    linear = combine(three, WEIGHTS, "linear")
    for path in CELLS:
        for side in (0, 1):
            assert np.array_equal(full.tensors[path][side], linear.tensors[path][side])
    only_fc2 = [AdapterWeights(**dict(vars(a), target_paths=["fc2"], tensors={"fc2": a.tensors["fc2"]}))
                for a in three]
    alone = combine(only_fc2, WEIGHTS, "dare_ties", density=0.5, seed=3)
    with_fc1 = combine(three, WEIGHTS, "dare_ties", density=0.5, seed=3)
    for side in (0, 1):
        assert np.array_equal(alone.tensors["fc2"][side], with_fc1.tensors["fc2"][side])
    masks = dare_masks(9, "fc1", [(200, 50)], 0.3)
    assert masks[0].dtype == np.float32 and set(np.unique(masks[0])) == {0.0, 1.0}
    assert dare_masks(9, "fc1", [(4, 4)], 1.0) == []


def test_one_adapter_is_linear_without_seed(three):
    """As PEFT, one adapter means linear: no masks, so no seed needed."""
    assert combine(three[:1], [2.0], "dare_ties", density=0.5).combination_type == "linear"


# ----------------------------------------------------------------------------- on a MindSpore net
def _forward(x, net_weights, adapter, scaling):
    """NumPy TwoDense (tanh after dense1) with one LoRA adapter on both layers."""
    h = x
    for layer in ("dense1", "dense2"):
        w, b = net_weights[layer]
        a_mat, b_mat = adapter[layer]
        h = h @ w.T + b + scaling * (h @ a_mat.T) @ b_mat.T
        if layer == "dense1":
            h = np.tanh(h)
    return h


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties_svd"])
def test_add_weighted_adapter_dare_on_a_net(mode, how):
    import mindspore as ms
    from mindspore import Tensor
    import pet_hooks
    from pet_hooks.multi import slots as lora_slots
    from pet_hooks.surgery.core import get_state
    from tests.nets import TwoDense

    ms.set_seed(0)
    net = TwoDense(act="tanh", din=6, dh=10, dout=4)
    net.set_train(False)
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    net_weights = {layer: (base[f"{layer}.weight"], base[f"{layer}.bias"]) for layer in ("dense1", "dense2")}
    cfg = {"pet_type": "lora", "target_modules": "dense1|dense2", "lora_rank": 3, "lora_alpha": 6}
    rng = np.random.default_rng(5)
    written, inputs = {}, []
    for index, name in enumerate(("p", "q")):
        if index == 0:
            pet_hooks.apply(net, cfg, adapter_name=name)
        else:
            pet_hooks.add_adapter(net, name, cfg)
            pet_hooks.set_adapter(net, name)
        for param in pet_hooks.delta_parameters(net):
            value = (0.3 * rng.standard_normal(param.shape)).astype(np.float32)
            param.set_data(Tensor(value))
            layer, leaf = param.name.rsplit(".", 1)
            written.setdefault(name, {}).setdefault(layer, {})[leaf] = value
        inputs.append(AdapterWeights(name=name, rank=3, alpha=6.0, scaling=2.0, target_paths=["dense1", "dense2"],
                                     tensors={layer: (v["lora_A"], v["lora_B"]) for layer, v in written[name].items()}))
    args = dict(density=0.5, seed=21) if how == "dare_linear" else dict(density=0.5, seed=21, svd_rank=3)
    pet_hooks.add_weighted_adapter(net, ["p", "q"], [0.9, -0.4], "m1", combination_type=how, **args)
    pet_hooks.add_weighted_adapter(net, ["p", "q"], [0.9, -0.4], "m2", combination_type=how, **args)
    pet_hooks.add_weighted_adapter(net, ["p", "q"], [0.9, -0.4], "m3", combination_type=how, **dict(args, seed=22))
    expected = combine(inputs, [0.9, -0.4], how, **args)
    state = get_state(net)
    made = {name: lora_slots.adapter_arrays(state, name) for name in ("m1", "m2", "m3")}
    for layer in ("dense1", "dense2"):
        for side, leaf in enumerate(("lora_A", "lora_B")):
            assert np.array_equal(made["m1"][layer][leaf], expected.tensors[layer][side])
            assert np.array_equal(made["m2"][layer][leaf], made["m1"][layer][leaf])
            assert not np.allclose(made["m3"][layer][leaf], made["m1"][layer][leaf])
    pet_hooks.set_adapter(net, "m1")
    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
    out = net(Tensor(x)).asnumpy()
    scaling = state.adapters["m1"].config.scaling
    ref = _forward(x.astype(np.float64), net_weights,
                   {layer: expected.tensors[layer] for layer in ("dense1", "dense2")}, scaling)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # the base is untouched
    for p in net.get_parameters():
        if p.name in base:
            assert np.array_equal(p.asnumpy(), base[p.name]), p.name
    with pytest.raises(PetConfigError, match="pass seed"):
        pet_hooks.add_weighted_adapter(net, ["p", "q"], [0.9, -0.4], "m4", combination_type=how, density=0.5)
    assert "m4" not in pet_hooks.list_adapters(net)
