"""AdaLoRA's training side: the optimizer step that sees its gradients, and PEFT's rank allocator.

PEFT's AdaLoRA needs two things from a training step that MindSpore does not give a Python caller:

* the gradients (PEFT's ``RankAllocator`` reads ``p.grad`` after ``optimizer.step()``; MindSpore keeps none on
  Parameters). :func:`prepare_optimizer` moves the optimizer onto a generated subclass (as the adapted cells
  are, ``tuners.common.patched_class``) whose ``construct`` first runs :class:`AdaLoraStep` on the gradients,
  then the optimizer's own step: it copies each AdaLoRA delta's gradient into a non-trained buffer Parameter
  of its own (``ops.assign``; the step compiles once, in graph mode as in PyNative);
* the orthogonality regulariser PEFT adds to the loss (``orth_reg_weight`` x the mean of ``||A A^T - I||_F``
  and ``||B^T B - I||_F`` over every ``lora_A`` / ``lora_B``). The same step adds its gradient (``2 M A /
  ||M||`` for ``M = A A^T - I``, ``2 B M / ||M||`` for ``M = B^T B - I``, times ``orth_reg_weight / count``) to
  those deltas' gradients, before copying them, so the optimizer and the allocator see PEFT's gradients of
  ``loss + regulariser`` whatever loss cell computes the loss (the user's own, MindFormers'), and after the
  train step's loss-scale division. The loss value the train step reports is the model's, without the
  regulariser (:func:`orth_reg_value` gives that term).

:func:`update_and_allocate` (``pet_hooks.update_and_allocate(net, step)``, PEFT's ``update_and_allocate``) runs
PEFT's schedule in NumPy after the step: the sensitivities ``|p * grad|`` and their EMAs (``beta1``, ``beta2``),
the cubic budget (``tinit`` / ``tfinal`` / ``deltaT``), ``mask_to_budget`` zeroing the ``lora_E`` entries whose
score is at or under the threshold, and from ``total_step - tfinal`` on the fixed ``rank_pattern``. Masking
writes values (``lora_E``), so graph mode does not recompile. ``PetCallback`` calls it at each step's end.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, ParameterTuple, jit, nn, ops
from mindspore.common import dtype as mstype

from ..errors import PetStateError
from ..surgery.core import get_state, state_owner
from ..tuners.adalora import FACTORS, orth_regularizer
from ..tuners.common import patched_class
from ..utils.ms_compat import write_values

__all__ = ["AdaLoraStep", "RankAllocator", "prepare_optimizer", "adalora_optimizer", "update_and_allocate", "orth_reg_value", "captured_gradients",
           "is_adalora"]

# kinds of an optimizer parameter in AdaLoraStep
_OTHER, _A, _B, _E = 0, 1, 2, 3


def _orth_grad_a(a):
    """d ||A A^T - I||_F / dA = 2 (A A^T - I) A / ||A A^T - I||_F (0 where the norm is 0)."""
    m = ops.matmul(a, ops.transpose(a, (1, 0))) - ops.eye(a.shape[0], a.shape[0], mstype.float32)
    norm = ops.sqrt(ops.reduce_sum(m * m))
    return 2.0 * ops.matmul(m, a) / ops.maximum(norm, 1e-30)


def _orth_grad_b(b):
    """d ||B^T B - I||_F / dB = 2 B (B^T B - I) / ||B^T B - I||_F."""
    m = ops.matmul(ops.transpose(b, (1, 0)), b) - ops.eye(b.shape[1], b.shape[1], mstype.float32)
    norm = ops.sqrt(ops.reduce_sum(m * m))
    return 2.0 * ops.matmul(b, m) / ops.maximum(norm, 1e-30)


_ONE_GRADIENT = ops.MultitypeFuncGraph("pet_hooks_adalora_gradient")


@_ONE_GRADIENT.register("Number", "Number", "Tensor", "Tensor", "Tensor")
def _one_gradient(reg, kind, weight, buffer, grad):
    """One gradient of the optimizer: plus the regulariser's gradient for an ``lora_A`` (kind 1) or ``lora_B``
    (kind 2), kept in ``buffer`` for any AdaLoRA delta (kinds 1-3); another parameter's (kind 0) as it is."""
    if kind == _A:
        grad = grad + ops.cast(reg * _orth_grad_a(weight), ops.dtype(grad))
    if kind == _B:
        grad = grad + ops.cast(reg * _orth_grad_b(weight), ops.dtype(grad))
    if kind != _OTHER:
        grad = ops.depend(grad, ops.assign(buffer, ops.cast(grad, mstype.float32)))
    return grad


class AdaLoraStep(nn.Cell):
    """Runs on the optimizer's gradients: adds the regulariser's gradient to each ``lora_A`` / ``lora_B`` and
    copies every AdaLoRA delta's gradient into its buffer. ``kinds`` / ``slots`` are per gradient.

    One ``HyperMap`` over the gradients, as MindSpore's optimizers step their parameters: a Python loop over
    them, unrolled by graph mode with a branch per gradient, nests one graph per iteration, and 30 blocks x
    q/k/v/o (360 AdaLoRA gradients) exceeded MindSpore's call depth limit of 1000 that way."""

    def __init__(self, kinds: Tuple[int, ...], slots: Tuple[int, ...], params: List[Parameter], reg: float):
        super().__init__()
        self.reg = float(reg)
        # no regulariser: an A or a B is only kept (kind 3), no norm computed for it
        self.kinds = tuple(kind if self.reg > 0.0 or kind == _OTHER else _E for kind in kinds)
        self.params = ParameterTuple(params)
        buffers = [Parameter(np.zeros(p.shape if kind != _OTHER else (1,), np.float32),
                             name=f"adalora_grad.{p.name}" if kind != _OTHER else f"adalora_unused.{p.name}",
                             requires_grad=False) for p, kind in zip(params, kinds)]
        self.buffers = ParameterTuple(buffers)
        # slot -> the AdaLoRA delta and its gradient's buffer (what update_and_allocate reads)
        order = sorted((slot, i) for i, (kind, slot) in enumerate(zip(kinds, slots)) if kind != _OTHER)
        self.weights = [params[i] for _, i in order]
        self.grads = [buffers[i] for _, i in order]
        self.map = ops.HyperMap()

    def construct(self, gradients):
        return self.map(ops.partial(_ONE_GRADIENT, self.reg), self.kinds, self.params, self.buffers, gradients)


class AdaLoraOptimizer:
    """Mixin for the generated optimizer classes: AdaLoRA's step on the gradients, then the optimizer's own."""

    pet_hooks_adalora_step = True

    # jit as MindSpore's own optimizers' construct: in PyNative, a jit-decorated original construct compiles the
    # cell's construct, which is this one; compiled once here, the step runs once (measured: twice otherwise)
    @jit
    def construct(self, gradients):
        return self.pet_base_construct(self.pet_adalora_step(gradients))


def is_adalora(net: nn.Cell) -> bool:
    state = get_state(net)
    return state is not None and state.config.pet_type == "adalora"


class RankAllocator:
    """PEFT's ``RankAllocator`` in NumPy over one net's AdaLoRA cells (``paths``, in net order)."""

    def __init__(self, cfg, cells: Dict[str, nn.Cell]):
        self.cfg, self.cells = cfg, cells
        self.init_bgt = int(cfg.init_r) * len(cells)
        self.target_bgt = int(cfg.target_r) * len(cells)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: Dict[str, np.ndarray] = {}
        self.exp_avg_ipt: Dict[str, np.ndarray] = {}
        self.exp_avg_unc: Dict[str, np.ndarray] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        tinit, tfinal, total = self.cfg.tinit, self.cfg.tfinal, self.cfg.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.cfg.deltaT == 0

    def update_ipt(self, values: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        """``values`` / ``grads``: ``<path>.<factor>`` -> float32 arrays (the deltas after the step, their grads)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, value in values.items():
            if name not in self.ipt:
                self.ipt[name] = np.zeros_like(value)
                self.exp_avg_ipt[name] = np.zeros_like(value)
                self.exp_avg_unc[name] = np.zeros_like(value)
            self.ipt[name] = np.abs(value * grads[name])
            self.exp_avg_ipt[name] = b1 * self.exp_avg_ipt[name] + (1 - b1) * self.ipt[name]
            self.exp_avg_unc[name] = b2 * self.exp_avg_unc[name] + (1 - b2) * np.abs(
                self.ipt[name] - self.exp_avg_ipt[name])

    def scores(self) -> Dict[str, np.ndarray]:
        """Per cell path, the score of each rank (PEFT's ``triplet_ipt``), [init_r]."""
        out = {}
        for path in self.cells:
            score = {name: self.exp_avg_ipt[f"{path}.{name}"] * self.exp_avg_unc[f"{path}.{name}"]
                     for name in FACTORS}
            ab = np.concatenate([score["lora_A"].mean(axis=1, keepdims=True),
                                 score["lora_B"].mean(axis=0).reshape(-1, 1)], axis=1)
            out[path] = score["lora_E"].reshape(-1) + ab.sum(axis=1)
        return out

    def mask_to_budget(self, budget: int) -> Dict[str, List[bool]]:
        """Zero the ``lora_E`` entries of the ``init_bgt - budget`` lowest scores (ties included, PEFT's ``<=``);
        returns the rank pattern (path -> kept flags)."""
        scores = self.scores()
        k = self.init_bgt - budget
        if k <= 0:
            threshold = -np.inf
        else:
            threshold = np.partition(np.concatenate(list(scores.values())), k - 1)[k - 1]   # torch.kthvalue
        pattern = {path: [bool(v) for v in scores[path] > threshold] for path in self.cells}
        self.apply_pattern(pattern)
        return pattern

    def apply_pattern(self, pattern: Dict[str, List[bool]]) -> None:
        for path, cell in self.cells.items():
            keep = np.asarray(pattern[path], bool).reshape(-1, 1)
            e = cell.lora_E.astype(mstype.float32).asnumpy()
            write_values(cell.lora_E, np.where(keep, e, np.float32(0.0)).astype(np.float32))

    def update_and_allocate(self, step: int, values, grads, force_mask: bool = False):
        if step < self.cfg.total_step - self.cfg.tfinal:
            self.update_ipt(values, grads)
        budget, mask_ind = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if mask_ind or force_mask else None)


class _Record:
    """What one net's AdaLoRA training keeps: its step cell (the gradient buffers) and its allocator."""

    def __init__(self, step: AdaLoraStep, allocator: RankAllocator, names: Dict[str, int]):
        self.step, self.allocator, self.names = step, allocator, names


_RECORDS: "weakref.WeakKeyDictionary[nn.Cell, _Record]" = weakref.WeakKeyDictionary()


def _cells(net: nn.Cell) -> Dict[str, nn.Cell]:
    return {injection.path: injection.cell for injection in get_state(net).injections}


def prepare_optimizer(optimizer: nn.Cell, net: nn.Cell) -> nn.Cell:
    """Make ``optimizer`` (over ``net``'s AdaLoRA deltas) add the regulariser's gradient and keep the gradients
    for :func:`update_and_allocate`; returns it. Nothing for a net without AdaLoRA; once per optimizer."""
    if not is_adalora(net):
        return optimizer
    owner = state_owner(net)
    state = get_state(net)
    params = list(getattr(optimizer, "parameters", None) or [])
    kinds, slots, weights, names = [], [], [], {}
    ids = {id(getattr(i.cell, name)): (i.path, name) for i in state.injections for name in FACTORS}
    for param in params:
        found = ids.get(id(param))
        if found is None:
            kinds.append(_OTHER)
            slots.append(0)
            continue
        kinds.append({"lora_A": _A, "lora_B": _B, "lora_E": _E}[found[1]])
        slots.append(len(weights))
        names[f"{found[0]}.{found[1]}"] = len(weights)
        weights.append(param)
    if len(names) != len(ids):
        raise PetStateError(f"AdaLoRA needs its optimizer over every AdaLoRA delta; {type(optimizer).__name__} holds "
                            f"{len(names)} of {len(ids)}")
    if getattr(type(optimizer), "pet_hooks_adalora_step", False):
        record = _RECORDS.get(owner)
        if record is not None and record.step is optimizer.pet_adalora_step:
            return optimizer
        optimizer.__class__ = optimizer.pet_original_class
    count = 2 * len(state.injections)
    step = AdaLoraStep(tuple(kinds), tuple(slots), params, state.config.orth_reg_weight / count)
    original = type(optimizer)
    optimizer.pet_adalora_step = step
    optimizer.pet_original_class = original
    optimizer.__class__ = patched_class(AdaLoraOptimizer, original)
    _RECORDS[owner] = _Record(step, RankAllocator(state.config, _cells(net)), names)
    return optimizer


def _record(net: nn.Cell, action: str) -> _Record:
    if not is_adalora(net):
        raise PetStateError(f"{action}: {type(net).__name__} has no AdaLoRA adapter")
    record = _RECORDS.get(state_owner(net))
    if record is None:
        raise PetStateError(f"{action} needs the AdaLoRA gradients: call pet_hooks.adalora_optimizer(optimizer, net) "
                            f"once after building the optimizer (the doors do it)")
    return record


def captured_gradients(net: nn.Cell) -> Dict[str, np.ndarray]:
    """``<path>.lora_A`` / ``.lora_E`` / ``.lora_B`` -> the gradient the last optimizer step got (float32)."""
    record = _record(net, "captured_gradients")
    return {name: record.step.grads[i].asnumpy() for name, i in record.names.items()}


def update_and_allocate(net: nn.Cell, global_step: int) -> Optional[Dict[str, List[bool]]]:
    """PEFT's ``update_and_allocate(global_step)``: call it after each optimizer step (``global_step`` counting
    from 0). Returns the rank pattern when this step set one (also kept in the config as ``rank_pattern``)."""
    record = _record(net, "update_and_allocate")
    cfg, allocator = get_state(net).config, record.allocator
    end = cfg.total_step - cfg.tfinal
    pattern = None
    if global_step <= end:
        values = {name: record.step.weights[i].astype(mstype.float32).asnumpy() for name, i in record.names.items()}
        grads = captured_gradients(net)
        _, pattern = allocator.update_and_allocate(global_step, values, grads, force_mask=global_step == end)
        if pattern:
            cfg.rank_pattern = pattern
        if global_step == end:
            allocator.reset_ipt()
    elif cfg.rank_pattern:
        allocator.apply_pattern(cfg.rank_pattern)
    return pattern


def orth_reg_value(net: nn.Cell) -> float:
    """The regulariser term PEFT adds to the loss (``orth_reg_weight`` included) for ``net``'s AdaLoRA now."""
    state = get_state(net)
    if state is None or state.config.pet_type != "adalora":
        raise PetStateError(f"orth_reg_value: {type(net).__name__} has no AdaLoRA adapter")
    return orth_regularizer([i.cell for i in state.injections], state.config.orth_reg_weight)


#: the public name (``pet_hooks.adalora_optimizer``)
adalora_optimizer = prepare_optimizer
