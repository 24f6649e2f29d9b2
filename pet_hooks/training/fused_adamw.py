"""``pet_hooks.optim.AdamW``: torch's AdamW update, with MindSpore's fused kernel and on its ``nn.Optimizer`` base.

    from pet_hooks.optim import AdamW
    opt = AdamW(net.trainable_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

``mindspore.experimental.optim.AdamW`` (torch's formula, what the SmolLM2 benchmark trains with) and
MindFormers' AdamW compile far bigger graphs than ``nn.AdamWeightDecay`` on the CPU: on SmolLM2 with
LoRA q/k/v/o, 8,620 MB of peak memory and a 65 s first step against 7,375 MB and 21 s
(``bench/fused_adamw.py``). ``nn.AdamWeightDecay`` is one fused ``P.AdamWeightDecay`` kernel per tensor,

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   p -= lr' (m / (sqrt(v) + eps') + decay' p)

without bias correction, so another update. Torch's AdamW is

    p *= 1 - lr wd;   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

and the two are the same update when, at step t, ``lr' = lr sqrt(1 - b2^t) / (1 - b1^t)``,
``eps' = eps sqrt(1 - b2^t)`` and ``decay' = lr wd / lr'`` (the decay term does not depend on m, so
applying it before or with the step is the same). This class is ``nn.AdamWeightDecay`` computing those
three scalars each step: torch's (and ``mindspore.experimental.optim.AdamW``'s) arguments and update,
within float rounding, at ``nn.AdamWeightDecay``'s cost. Its state is ``nn.AdamWeightDecay``'s:
``adam_m`` / ``adam_v`` hold what the experimental class calls ``exp_avg`` / ``exp_avg_sq``, and
``global_step`` its ``state_step``. ``lr`` may be a number, a Tensor, a list per step or a
``LearningRateSchedule``; parameter groups as for ``nn`` optimizers. ``amsgrad`` and ``maximize`` are
not provided: use MindSpore's class for them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional

from mindspore import jit, nn, ops
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P

__all__ = ["AdamW", "torch_adamw_classes", "fused_in_place_of", "build_fused_instead"]

_fused_update = ops.MultitypeFuncGraph("pet_hooks_fused_adamw")


@_fused_update.register("Function", "Tensor", "Tensor", "Tensor", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor")
@_fused_update.register("Function", "Tensor", "Tensor", "Tensor", "Tuple", "Tensor", "Number", "Tensor", "Tensor",
                        "Tensor", "Tensor")
def _run_fused(opt, beta1, beta2, eps, scale, lr, decay, param, moment1, moment2, grad):
    """One tensor: the fused kernel with the step's bias-corrected learning rate and epsilon; ``decay`` is the
    group's weight decay (``lr * wd``, divided by the corrected rate, so the kernel's product is torch's)."""
    step_lr = lr * scale[0]
    opt(param, moment1, moment2, step_lr, beta1, beta2, eps * scale[1], lr * decay / step_lr,
        P.Cast()(grad, param.dtype))
    return True


class AdamW(nn.AdamWeightDecay):
    """Torch's AdamW (``mindspore.experimental.optim.AdamW``'s arguments and update) on ``nn.AdamWeightDecay``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        if amsgrad or maximize:
            raise ValueError("pet_hooks.optim.AdamW does not provide amsgrad=True or maximize=True; use "
                             "mindspore.experimental.optim.AdamW for them")
        super().__init__(params, learning_rate=lr, beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
                         weight_decay=weight_decay)
        self.torch_betas = (float(betas[0]), float(betas[1]))

    @jit(backend="ms_backend")
    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = ops.cast(self.global_step, mstype.float32)
        root2 = ops.sqrt(1 - ops.pow(self.torch_betas[1], step))
        # (lr' / lr, eps' / eps) of this step, shared by every tensor
        scale = (root2 / (1 - ops.pow(self.torch_betas[0], step)), root2)
        opt, beta1, beta2, eps = self.fused_opt, self.beta1, self.beta2, self.eps
        if self.is_group and self.is_group_lr:
            return self.hyper_map(ops.partial(_fused_update, opt, beta1, beta2, eps, scale), lr, weight_decay,
                                  self._parameters, self.moments1, self.moments2, gradients)
        if self.is_group:
            return self.hyper_map(ops.partial(_fused_update, opt, beta1, beta2, eps, scale, lr), weight_decay,
                                  self._parameters, self.moments1, self.moments2, gradients)
        return self.hyper_map(ops.partial(_fused_update, opt, beta1, beta2, eps, scale, lr, weight_decay),
                              self._parameters, self.moments1, self.moments2, gradients)


# ----------------------------------------------------------------------------- in place of torch's AdamW classes
#: (module, class) of the AdamW classes with torch's update that config ``fused_optimizer: true`` replaces
_TORCH_ADAMW = (("mindspore.experimental.optim.adamw", "AdamW"), ("mindformers.core.optim.adamw", "AdamW"))


def torch_adamw_classes() -> List[type]:
    """MindSpore's experimental AdamW and MindFormers' AdamW, those of them already imported."""
    import sys
    return [cls for cls in (getattr(sys.modules.get(module), name, None) for module, name in _TORCH_ADAMW)
            if cls is not None]


def _adamw_arguments(cls: type, args: tuple, kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """This class's AdamW arguments for a constructor call of ``cls``, or None when ``cls`` is not one of
    :func:`torch_adamw_classes` (exactly: a subclass may change the update) or the call asks for what this
    class does not do (amsgrad, maximize, MindFormers' host-memory ``swap``), or does not bind."""
    if cls not in torch_adamw_classes():
        return None
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError:
        return None                     # the class itself will say what is wrong with the call
    bound.apply_defaults()
    value = bound.arguments
    if value.get("amsgrad") or value.get("maximize") or value.get("swap"):
        return None
    return {"params": value["params"], "lr": value["lr"] if "lr" in value else value["learning_rate"],
            "betas": value["betas"], "eps": value["eps"], "weight_decay": value["weight_decay"]}


def fused_in_place_of(cls: type, args: tuple, kwargs: Dict[str, Any]) -> Optional[AdamW]:
    """An :class:`AdamW` computing what ``cls(*args, **kwargs)`` would (``fused_optimizer: true``), or None
    when it cannot stand in for that call (then the caller builds ``cls`` as asked)."""
    arguments = _adamw_arguments(cls, args, kwargs)
    return None if arguments is None else AdamW(**arguments)


def build_fused_instead(patches, cls: type, wanted: Callable[[], bool]) -> None:
    """Make ``cls(...)`` build :func:`fused_in_place_of` instead while ``wanted()`` is true (the doors, with
    ``fused_optimizer: true``), through ``patches`` (a ``PatchSet``: undone with it). ``__new__`` is the
    one place a call can return another class's instance; that instance is built completely there, so
    Python does not run ``cls.__init__`` on it."""
    original = cls.__new__

    def __new__(klass, *args, **kwargs):
        if klass is cls and wanted():
            fused = fused_in_place_of(klass, args, kwargs)
            if fused is not None:
                return fused
        return original(klass, *args, **kwargs)

    patches.set(cls, "__new__", staticmethod(__new__))
