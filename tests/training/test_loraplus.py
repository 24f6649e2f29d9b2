"""LoRA+ (``loraplus_lr_ratio``): PEFT's parameter groups, the learning rates a step really uses, and the
front doors that rebuild the optimizer (issue 19, item 3)."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.errors import OptimizerRebuildError, PetStateError
from tests.conftest import NEEDS_TORCH_PEFT, assert_params_equal, snapshot
from tests.torch_runner import run_reference

LORA = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ".*dense1|.*dense2", "seed": 0}


class Toy(nn.Cell):
    """dense1 -> LayerNorm -> dense2: a weight matrix, biases and a norm, as PEFT's toy below."""

    def __init__(self):
        super().__init__()
        self.dense1 = nn.Dense(6, 8)
        self.ln = nn.LayerNorm((8,))
        self.dense2 = nn.Dense(8, 4)

    def construct(self, x):
        return self.dense2(self.ln(self.dense1(x)))


def _toy(**extra):
    ms.set_seed(0)
    return pet_hooks.apply(Toy(), {**LORA, "freeze_exclude": ["*bias*", "ln.*"], **extra})


_PEFT_GROUPS = textwrap.dedent("""
    import json, torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense1 = torch.nn.Linear(6, 8)
            self.ln = torch.nn.LayerNorm(8)
            self.dense2 = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.dense2(self.ln(self.dense1(x)))

    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["dense1", "dense2"], bias="all",
                                             modules_to_save=["ln"]))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    print(json.dumps({names[id(p)]: [g["lr"], g["weight_decay"]] for g in opt.param_groups for p in g["params"]}))
""")


def _ours_of(peft_name: str) -> str:
    """PEFT's parameter name -> ours (LayerNorm: weight/bias are MindSpore's gamma/beta)."""
    name = peft_name.replace("base_model.model.", "").replace(".base_layer", "").replace(".default", "")
    name = name.replace(".modules_to_save", "").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
    return name.replace("ln.weight", "ln.gamma").replace("ln.bias", "ln.beta")


@NEEDS_TORCH_PEFT
def test_groups_are_peft_create_loraplus_optimizer_groups():
    done = run_reference(["-c", _PEFT_GROUPS], timeout=300)
    done.check_returncode()
    theirs = {_ours_of(name): tuple(v) for name, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    net = _toy()
    ours = {p.name: (group["lr"], group["weight_decay"])
            for group in pet_hooks.loraplus_param_groups(net, lr=1e-3, ratio=16, weight_decay=0.01)
            for p in group["params"]}
    assert sorted(ours) == sorted(theirs)             # the same trainable parameters, each in one group
    for name, (lr, decay) in theirs.items():
        assert ours[name] == (pytest.approx(lr), pytest.approx(decay)), name
    assert sorted({round(v[0], 9) for v in theirs.values()}) == [0.001, 0.016]   # both speeds present
    assert sorted({round(v[1], 9) for v in theirs.values()}) == [0.0, 0.01]      # and both decays


def _one_sgd_step(net, groups, lr):
    """The gradients at the start, the values before, after one step of SGD over ``groups``."""
    x = Tensor(np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32))
    zeros = Tensor(np.zeros((3, 4), np.float32))
    loss_net = nn.WithLossCell(net, nn.MSELoss())
    grads = ms.grad(loss_net, grad_position=None, weights=net.trainable_params())(x, zeros)
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    nn.TrainOneStepCell(loss_net, nn.SGD(groups, learning_rate=lr))(x, zeros)
    return before, {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}


def test_one_sgd_step_moves_b_ratio_times_faster_than_a(mode):
    net = _toy()
    for param in pet_hooks.delta_parameters(net):                # B non-zero: A gets a gradient too
        param.set_data(Tensor(np.random.default_rng(2).standard_normal(param.shape).astype(np.float32)))
    base = snapshot(net)
    lr, ratio = 0.1, 4.0
    before, grads = _one_sgd_step(net, pet_hooks.loraplus_param_groups(net, lr, ratio), lr)
    for param in net.trainable_params():
        fast = param.name.endswith(".lora_B") or len(param.shape) == 1
        expected = before[param.name] - (lr * ratio if fast else lr) * grads[param.name]
        np.testing.assert_allclose(param.asnumpy(), expected, rtol=1e-5, atol=1e-7, err_msg=param.name)
        assert np.abs(grads[param.name]).max() > 0, param.name
    assert_params_equal(base, net, names=["dense1.weight", "dense2.weight"])


def test_enable_gives_the_optimizer_loraplus_groups_with_its_own_lr_and_decay():
    with pet_hooks.enable({**LORA, "loraplus_lr_ratio": 8, "freeze_exclude": ["*bias*"]}):
        ms.set_seed(0)
        net = Toy()
        opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=0.01, weight_decay=0.1)
    lrs = {p.name: float(opt.get_lr_parameter(p).asnumpy()) for p in opt.parameters}
    assert {p.name for p in opt.parameters} == {p.name for p in net.trainable_params()}
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.08 if name.endswith((".lora_B", ".bias")) else 0.01), name
    decays = {p.name: float(d.asnumpy()) for p, d in zip(opt.parameters, opt.weight_decay)}
    assert decays["dense1.lora_A"] == pytest.approx(0.1) and decays["dense1.bias"] == 0.0


def test_a_callback_rebuild_gives_loraplus_groups():
    from pet_hooks.doors.flow import rebuild_optimizer
    net = Toy()
    opt = nn.SGD(net.trainable_params(), learning_rate=0.5)
    pet_hooks.apply(net, {**LORA, "loraplus_lr_ratio": 2})
    new = rebuild_optimizer(opt, net)
    assert type(new) is nn.SGD
    lrs = {p.name: float(new.get_lr_parameter(p).asnumpy()) for p in new.parameters}
    assert lrs == {"dense1.lora_A": 0.5, "dense1.lora_B": 1.0, "dense2.lora_A": 0.5, "dense2.lora_B": 1.0}


def test_what_loraplus_cannot_do_is_one_clear_error():
    with pytest.raises(PetStateError, match="no LoRA applied"):
        pet_hooks.loraplus_param_groups(Toy(), 1e-3, 16)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        pet_hooks.loraplus_param_groups(_toy(), 1e-3, 0)
    from pet_hooks.doors.flow import rebuild_optimizer
    net = Toy()
    schedule = nn.SGD(net.trainable_params(), learning_rate=nn.ExponentialDecayLR(0.1, 0.9, 10))
    grouped = nn.SGD([{"params": net.trainable_params()}], learning_rate=0.1)
    pet_hooks.apply(net, {**LORA, "loraplus_lr_ratio": 2})
    with pytest.raises(OptimizerRebuildError, match="SGD.*learning rate must be a number"):
        rebuild_optimizer(schedule, net)
    with pytest.raises(OptimizerRebuildError, match="SGD.*parameter groups"):
        rebuild_optimizer(grouped, net)


def test_the_ratio_is_a_training_setting_not_part_of_the_adapter():
    assert pet_hooks.load_config({**LORA, "loraplus_lr_ratio": 16}) == pet_hooks.load_config(LORA)
