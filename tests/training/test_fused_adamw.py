"""pet_hooks.optim.AdamW against mindspore.experimental.optim.AdamW (torch's formula) and a NumPy AdamW.

The same 20 gradients (random, fixed) are fed to both optimizers over the same starting values, directly
(``opt(grads)``), so that no difference is amplified by a network: after every step the parameters and the
moments must agree within 1e-6 relative, with weight decay and two parameter groups of their own settings. The NumPy reference is torch's AdamW written out. It fails if the fused kernel's per-step
learning rate, epsilon or decay were not the bias-corrected ones (the first steps differ by up to 3x then).
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn
from mindspore.experimental.optim import AdamW as MindSporeAdamW

from pet_hooks.optim import AdamW

SHAPES = [(4, 6), (6,), (3, 2)]
STEPS = 20


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=f"p{i}")
            for i, shape in enumerate(SHAPES)]


def _gradients():
    rng = np.random.default_rng(1)
    return [[rng.standard_normal(shape).astype(np.float32) for shape in SHAPES] for _ in range(STEPS)]


class Step(nn.Cell):
    """The optimizer called on given gradients, as a train step calls it (a compiled graph in graph mode)."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def construct(self, *grads):
        return self.optimizer(grads)


def _groups(params, grouped, ours=False):
    """Two groups of their own learning rate and weight decay (nn optimizers' group keys; betas and eps are the
    optimizer's for every group, so the second group's are set only where both classes take them)."""
    if not grouped:
        return params
    return [{"params": params[:2], "weight_decay": 0.1, "lr": 0.02}, {"params": params[2:], "weight_decay": 0.0}]


def _numpy_adamw(params, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.01, maximize=False, settings=None):
    values = [p.asnumpy().astype(np.float64) for p in params]
    m = [np.zeros_like(v) for v in values]
    v2 = [np.zeros_like(v) for v in values]
    for t, step in enumerate(grads, 1):
        for i, g in enumerate(step):
            g = -g.astype(np.float64) if maximize else g.astype(np.float64)
            rate, (b1, b2), e, decay = settings[i] if settings else (lr, betas, eps, wd)
            values[i] *= 1 - rate * decay
            m[i] = b1 * m[i] + (1 - b1) * g
            v2[i] = b2 * v2[i] + (1 - b2) * g * g
            values[i] -= rate / (1 - b1 ** t) * m[i] / (np.sqrt(v2[i]) / np.sqrt(1 - b2 ** t) + e)
    return values


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "two_groups"])
def test_same_updates_as_mindspores_adamw_and_torchs_formula(mode, grouped):
    maximize = False
    grads = _gradients()
    ours_params, theirs_params = _params(), _params()
    ours = AdamW(_groups(ours_params, grouped, ours=True), lr=1e-2, weight_decay=0.01)
    theirs = MindSporeAdamW(_groups(theirs_params, grouped), lr=1e-2, weight_decay=0.01)
    ours_step, theirs_step = Step(ours), Step(theirs)
    for step in grads:
        ours_step(*[Tensor(g) for g in step])
        theirs_step(*[Tensor(g) for g in step])
        for a, b in zip(ours_params, theirs_params):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=a.name)
    for a, b in zip(list(ours.moments1) + list(ours.moments2), list(theirs.exp_avg) + list(theirs.exp_avg_sq)):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-9, err_msg=a.name)
    assert int(ours.global_step.asnumpy().reshape(-1)[0]) == STEPS
    settings = ([(0.02, (0.9, 0.999), 1e-8, 0.1)] * 2 + [(1e-2, (0.9, 0.999), 1e-8, 0.0)]) if grouped else None
    for value, expected in zip(ours_params, _numpy_adamw(_params(), grads, maximize=maximize, settings=settings)):
        np.testing.assert_allclose(value.asnumpy(), expected, rtol=1e-5, atol=1e-6, err_msg=value.name)


def test_an_nn_optimizer_with_nn_adamweightdecays_state():
    """What makes it cheap: nn.AdamWeightDecay's base and state (adam_m, adam_v, global_step), so the doors and
    Model take it as any nn optimizer."""
    ours = AdamW(_params(), lr=1e-3)
    assert isinstance(ours, nn.AdamWeightDecay)
    names = {p.name for p in ours.get_parameters()}
    assert {f"adam_m.p{i}" for i in range(3)} | {f"adam_v.p{i}" for i in range(3)} | {"global_step"} <= names


def test_amsgrad_and_maximize_are_refused_with_the_class_to_use():
    with pytest.raises(ValueError, match="amsgrad=True or maximize=True; use mindspore.experimental.optim.AdamW"):
        AdamW(_params(), amsgrad=True)
    with pytest.raises(ValueError, match="maximize"):
        AdamW(_params(), maximize=True)
