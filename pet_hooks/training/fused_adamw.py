"""``pet_hooks.optim.AdamW``: torch's AdamW update in one fused kernel per tensor (``P.AdamWeightDecay``).

    from pet_hooks.optim import AdamW
    opt = AdamW(net.trainable_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

``mindspore.experimental.optim.AdamW`` (torch's formula, what the SmolLM2 benchmark and the demo train
with) compiles its update as about 25 small kernels per trainable tensor: with LoRA on every block of
a real model that is hundreds of kernels and about a gigabyte of compiled graph on the CPU.
MindSpore's fused ``P.AdamWeightDecay`` kernel (what ``nn.AdamWeightDecay`` runs) computes

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   p -= lr' (m / (sqrt(v) + eps') + decay' p)

without bias correction. Torch's AdamW is

    p *= 1 - lr wd;   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

and the two are the same update when, at step t, ``lr' = lr sqrt(1 - b2^t) / (1 - b1^t)``,
``eps' = eps sqrt(1 - b2^t)`` and ``decay' = lr wd / lr'`` (the decay term does not depend on m,
so applying it before or with the step is the same). This class computes those three scalars per
step and group and calls the fused kernel: the same arguments and the same state (``exp_avg``,
``exp_avg_sq``, ``state_step``; ``max_exp_avg_sq`` kept for the same names, unused) as
``mindspore.experimental.optim.AdamW``, updates equal to it within float rounding. ``amsgrad`` is
not fused: use MindSpore's class for it.
"""
from __future__ import annotations

from mindspore import ops
from mindspore.common import dtype as mstype
from mindspore.experimental.optim import AdamW as ExperimentalAdamW
from mindspore.ops import operations as P

__all__ = ["AdamW"]

_fused_update = ops.MultitypeFuncGraph("pet_hooks_fused_adamw")


@_fused_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor")
def _run_fused(opt, beta1, beta2, eps, lr, decay, param, exp_avg, exp_avg_sq, grad):
    opt(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, ops.cast(grad, param.dtype))
    return True


class AdamW(ExperimentalAdamW):
    """``mindspore.experimental.optim.AdamW`` (same arguments, state and update) in one fused kernel per tensor."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        if amsgrad:
            raise ValueError("pet_hooks.optim.AdamW does not fuse amsgrad=True; use "
                             "mindspore.experimental.optim.AdamW for it")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)
        self.fused_opt = P.AdamWeightDecay()

    def construct(self, gradients):
        self.assignadd(self.state_step, self.increase_tensor)
        step = self.op_cast(self.state_step, mstype.float32)
        for group_id, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            start_id = self.group_start_id[group_id]
            end_id = self.group_start_id[group_id + 1]
            lr = self.lrs[group_id]
            if isinstance(group.get("lr"), float):
                lr = self.op_cast(group.get("lr"), mstype.float32)
            grads = tuple([grad if not group.get("maximize") else ops.neg(grad)
                           for grad in gradients[start_id:end_id]])
            correction1 = 1 - ops.pow(beta1, step)
            root2 = ops.sqrt(1 - ops.pow(beta2, step))
            lr_t = lr * root2 / correction1                       # the step size torch's AdamW takes
            eps_t = group.get("eps") * root2                      # eps outside the corrected sqrt(v)
            decay_t = lr * group.get("weight_decay") / lr_t       # so that lr_t * decay_t = lr * wd
            self.hyper_map(ops.partial(_fused_update, self.fused_opt,
                                       self.op_cast(beta1, mstype.float32), self.op_cast(beta2, mstype.float32),
                                       eps_t, lr_t, decay_t),
                           self.parameters[start_id:end_id], self.exp_avg[start_id:end_id],
                           self.exp_avg_sq[start_id:end_id], grads)
        return True
