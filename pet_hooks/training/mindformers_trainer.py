"""MindFormers' train step on the CPU: the runner wrapper ``PetTrainOneStepCell``.

MindFormers' Trainer wraps the network in the wrapper its run YAML names under
``runner_wrapper`` (default ``MFTrainOneStepCell``). That one checks for gradient overflow
with ``NPUGetFloatStatusV2``, an Ascend-only operator, so on the CPU the first step fails with
``RuntimeError: Unsupported op [NPUGetFloatStatusV2] on CPU``; MindSpore's ``TrainOneStepCell``,
also registered, refuses the ``scale_sense`` keyword the Trainer passes it. This module holds the
CPU counterpart, registered with MindFormers under the name **``PetTrainOneStepCell``**
(``MindFormerModuleType.WRAPPER``)::

    import pet_hooks
    pet_hooks.register_mindformers_train_step()    # idempotent; imports MindFormers only here (doors do it too)

    # run YAML
    runner_wrapper:
      type: PetTrainOneStepCell          # instead of MFTrainOneStepCell
      scale_sense: 1.0                   # a number, or {type: DynamicLossScaleUpdateCell, ...}
      use_clip_grad: True
      max_grad_norm: 1.0

It computes what ``MFTrainOneStepCell`` computes for MindFormers' legacy models
(``use_legacy: True``, e.g. ``LlamaForCausalLM``), step for step:

* the loss and the gradients of the wrapped network with the sensitivity ``scale_sense``, the
  gradients cast to float32 and divided by the loss scale (and, with
  ``calculate_per_token_loss``, by the token count the network returns beside the loss sum);
* the gradient reducer of the parallel mode (identity stand-alone, all-reduce in data parallel);
* overflow detection with ``IsFinite`` (what the Ascend 910B "INFNAN" mode does, and what runs
  on the CPU; the flag all-reduced in data parallel), the result fed to a loss-scale update cell
  when ``scale_sense`` is one (``DynamicLossScaleUpdateCell`` divides the scale by its
  ``scale_factor`` on overflow), and the optimizer step skipped on overflow;
* global-norm clipping with MindFormers' own ``ClipGradNorm`` when ``use_clip_grad``
  (``max_grad_norm``, default 1.0), and ``use_skip_data_by_global_norm``;
* the outputs MindFormers' callbacks read from ``cb_params.net_outputs``: ``(loss, overflow,
  loss_scale, learning_rate, global_norm)`` (``MFLossMonitor`` prints them, ``CheckpointMonitor``
  stores ``net_outputs[2]`` as the loss scale to resume with). ``loss_scale`` is the value this
  step ran with, in both modes (MindFormers returns its scale Parameter, which an update cell may
  already have overwritten); ``global_norm`` is None without clipping, as in MindFormers;
  ``learning_rate`` is the rate of this step.

Refused at construction, each with an error naming the setting: ``local_norm`` (the 7-output
variant), ``grouped_lr_scheduler`` and MindFormers' mcore models (``use_legacy: False``, whose
networks return four losses and whose loss monitor reads registered per-loss parameters). The
Ascend-only debugging switches (``dump_local_norm_path``, graceful exit) are not reproduced.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Optional, Union

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F

__all__ = ["NAME", "PetTrainOneStepCell", "register", "register_mindformers_train_step", "registered_class"]

#: the name the wrapper is registered under (``runner_wrapper.type`` in a run YAML)
NAME = "PetTrainOneStepCell"

_unscale = C.MultitypeFuncGraph("pet_unscale")
_nonfinite = C.MultitypeFuncGraph("pet_nonfinite")


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(scale: Tensor, grad: Tensor) -> Tensor:
    # As MindFormers' wrapper: the gradient in float32, divided by the loss scale (times the token count).
    return F.cast(grad, ms.float32) * ops.Reciprocal()(scale)


@_nonfinite.register("Tensor")
def _nonfinite_tensor(grad: Tensor) -> Tensor:
    # 1.0 when the gradient holds an inf or a nan, else 0.0 (IsFinite has a CPU kernel; NPUGetFloatStatusV2 not).
    flag = Tensor(1.0, ms.float32) - F.cast(ops.IsFinite()(grad).all(), ms.float32)
    return F.reshape(flag, (1,))


def _check_unsupported(local_norm: bool, grouped_lr_scheduler: Any) -> None:
    """One clear error for each MFTrainOneStepCell feature this wrapper does not reproduce."""
    if local_norm:
        raise ValueError(f"{NAME}: runner_wrapper.local_norm=True is not supported (MindFormers' 7-output "
                         "local-norm variant); remove local_norm or set it to False")
    if grouped_lr_scheduler is not None:
        raise ValueError(f"{NAME}: grouped learning-rate schedulers (grouped_lr_scheduler, from the YAML's "
                         "grouped_lr_schedule) are not supported; use one lr_schedule")
    from mindformers.core.context.build_context import is_legacy_model
    if not is_legacy_model():
        raise ValueError(f"{NAME}: use_legacy: False (MindFormers' mcore models, whose network returns four "
                         "losses) is not supported; it trains MindFormers' legacy models (use_legacy: True)")


class PetTrainOneStepCell(nn.TrainOneStepWithLossScaleCell):
    """MindFormers' ``MFTrainOneStepCell`` for the CPU (no Ascend-only operator); see the module docstring.

    Args:
        network: the network with its loss (the Trainer's wrapped model).
        optimizer: the optimizer over the parameters to train.
        use_clip_grad: clip the gradients to a global norm of ``max_grad_norm``.
        max_grad_norm: the global norm to clip to.
        scale_sense: the loss scale: a number, a Tensor of shape () or (1,), or a loss-scale update
            cell (``DynamicLossScaleUpdateCell``, ``FixedLossScaleUpdateCell``).
        local_norm: must be False (not supported).
        calculate_per_token_loss: the network returns ``(loss sum, token count)``; the loss is their
            quotient and the gradients are divided by the count.
        global_norm_spike_threshold: with ``use_skip_data_by_global_norm``, the optimizer step is
            skipped when the global norm is not below this.
        use_skip_data_by_global_norm: skip steps whose gradient norm spikes (needs ``use_clip_grad``).
        print_separate_loss: accepted for the Trainer (it only matters for mcore models).
        **kwargs: the Trainer's other keywords (``parallel_config``, ``lr_scheduler``,
            ``grouped_lr_scheduler``); ``grouped_lr_scheduler`` must be None.

    Outputs:
        ``(loss, overflow, loss_scale, learning_rate, global_norm)``, as ``MFTrainOneStepCell``.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, use_clip_grad: bool = False,
                 max_grad_norm: float = 1.0, scale_sense: Union[int, float, Tensor, nn.Cell] = 1.0,
                 local_norm: bool = False, calculate_per_token_loss: bool = False,
                 global_norm_spike_threshold: float = 1.0, use_skip_data_by_global_norm: bool = False,
                 print_separate_loss: bool = False, **kwargs: Any) -> None:  # pylint: disable=unused-argument
        _check_unsupported(local_norm, kwargs.get("grouped_lr_scheduler"))
        if isinstance(scale_sense, bool) or not isinstance(scale_sense, (int, float, Tensor, nn.Cell)):
            raise TypeError(f"{NAME}: runner_wrapper.scale_sense must be a number, a Tensor or a loss-scale "
                            f"update cell, got {scale_sense!r}")
        if isinstance(scale_sense, (int, float)):
            if not scale_sense > 0:
                raise ValueError(f"{NAME}: runner_wrapper.scale_sense must be > 0, got {scale_sense!r}")
            scale_sense = Tensor(float(scale_sense), ms.float32)
        if not isinstance(max_grad_norm, (int, float)) or isinstance(max_grad_norm, bool) or not max_grad_norm > 0:
            raise ValueError(f"{NAME}: runner_wrapper.max_grad_norm must be a number > 0, got {max_grad_norm!r}")
        if use_skip_data_by_global_norm and not use_clip_grad:
            raise ValueError(f"{NAME}: use_skip_data_by_global_norm needs the global norm: set "
                             "runner_wrapper.use_clip_grad: True")
        super().__init__(network, optimizer, scale_sense)
        self.use_clip_grad = bool(use_clip_grad)
        self.max_grad_norm = float(max_grad_norm)
        from mindformers.core.clip_grad import ClipGradNorm     # MindFormers' own clipping, as its wrapper
        self.clip_grad_norm = ClipGradNorm(max_norm=self.max_grad_norm)
        self.calculate_per_token_loss = bool(calculate_per_token_loss)
        self.use_skip_data_by_global_norm = bool(use_skip_data_by_global_norm)
        self.global_norm_spike_threshold = float(global_norm_spike_threshold)
        # As MindFormers: the wrapper's own copy of the learning rate (a schedule cell, or the value).
        self.learning_rate = deepcopy(self.optimizer.learning_rate)
        self.grad_scale_factor = Tensor([1], ms.float32)
        self.zero_t = Tensor([0], ms.float32)
        self.add_n = ops.AddN()

    def construct(self, *inputs):
        scaling_sens = self.scale_sense
        # The loss scale this step ran with (a value: the update cell below may overwrite the Parameter).
        step_scale = F.cast(scaling_sens, ms.float32) * 1.0
        if self.calculate_per_token_loss:
            numerator, denominator = self.network(*inputs)
            loss = numerator / denominator
            sens_numerator = F.cast(C.ones_like(numerator) * F.cast(scaling_sens, F.dtype(numerator)), ms.float32)
            sens_denominator = F.cast(self.zero_t * F.cast(scaling_sens, F.dtype(denominator)), ms.float32)
            grads = self.grad(self.network, self.weights)(*inputs, (sens_numerator, sens_denominator))
            grad_scale_factor = denominator
        else:
            loss = self.network(*inputs)
            sens = C.ones_like(loss) * F.cast(scaling_sens, F.dtype(loss))
            grads = self.grad(self.network, self.weights)(*inputs, sens)
            grad_scale_factor = self.grad_scale_factor
        grads = self.hyper_map(F.partial(_unscale, scaling_sens * grad_scale_factor), grads)
        grads = self.grad_reducer(grads)

        overflow = self.overflow_status(grads)
        overflow = self.process_loss_scale(overflow)

        global_norm = None
        if self.use_clip_grad:
            grads, global_norm = self.clip_grad_norm(grads)

        learning_rate = self.learning_rate
        if self.optimizer.dynamic_lr:     # the rate of this step: the optimizer has not counted it yet
            if self.optimizer.is_group_lr:
                learning_rate = self.learning_rate[-1](self.optimizer.global_step).reshape(())
            else:
                learning_rate = self.learning_rate(self.optimizer.global_step).reshape(())

        if not overflow:
            if self.use_skip_data_by_global_norm:
                if global_norm < self.global_norm_spike_threshold:
                    loss = F.depend(loss, self.optimizer(grads))
            else:
                loss = F.depend(loss, self.optimizer(grads))
        return loss, overflow, step_scale, learning_rate, global_norm

    def overflow_status(self, grads) -> Tensor:
        """True when any gradient (after the reducer) holds an inf or a nan, on every rank alike."""
        flags = self.add_n(self.hyper_map(_nonfinite, grads))
        flag_sum = F.reshape(flags, ())
        if self.is_distributed:
            flag_sum = self.allreduce(flag_sum)
        return self.less_equal(self.base, flag_sum)


def register() -> str:
    """Register :class:`PetTrainOneStepCell` with MindFormers as ``runner_wrapper`` type ``"PetTrainOneStepCell"``.

    Idempotent. Imports MindFormers (only here). Returns the registered name. A different class
    already registered under that name (not this module's) is an error naming it.
    """
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    if MindFormerRegister.is_exist(MindFormerModuleType.WRAPPER, NAME):
        current = MindFormerRegister.get_cls(MindFormerModuleType.WRAPPER, NAME)
        if current is PetTrainOneStepCell:
            return NAME
        if getattr(current, "__module__", None) != __name__:   # this module reloaded: take the new class
            raise ValueError(f"MindFormers already has a runner wrapper named {NAME!r}: "
                             f"{current.__module__}.{current.__qualname__}; pet_hooks will not replace it")
    MindFormerRegister.register_cls(PetTrainOneStepCell, MindFormerModuleType.WRAPPER)
    return NAME


#: the public name of :func:`register` (``pet_hooks.register_mindformers_train_step()``)
register_mindformers_train_step = register


def registered_class() -> Optional[type]:
    """The class MindFormers holds under :data:`NAME` (None when nothing is registered; imports MindFormers)."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    if not MindFormerRegister.is_exist(MindFormerModuleType.WRAPPER, NAME):
        return None
    return MindFormerRegister.get_cls(MindFormerModuleType.WRAPPER, NAME)

