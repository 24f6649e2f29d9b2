"""``PetCallback``: PET for a script that trains with ``mindspore.train.Model``.

    model = Model(net, loss_fn, opt)
    model.train(2, dataset, callbacks=[PetCallback("pet.yaml", save_dir="run/", save_steps=100, resume=True)])

At train begin it adapts the model inside the train network and gives the train step an
optimizer of the same class and settings over the deltas only; it saves the adapter to
``save_dir`` every ``save_steps`` steps and at train end, and every ``save_steps`` steps a run
checkpoint (adapter, optimizer state, position) to ``save_dir/checkpoints/step-<n>/``, the newest
``keep`` kept (rank 0 only). With ``resume=True`` a run killed at any moment continues after the
newest complete checkpoint, skipping the batches it had done (``pet_hooks.doors.resume``). After step 2 and at train end it warns
about adapted cells that received no gradient (``pet_hooks.training.grad_guard``). It holds no PET
logic of its own: the work is ``pet_hooks.doors.flow``.
"""
from __future__ import annotations

import logging
from typing import Optional

from mindspore.train import Callback

from . import flow
from .resume import RunCheckpointer, checkpointing
from ..training import adalora, recorder
from ..training.grad_guard import GradGuard
from ..utils.ms_compat import force_recompile, release_compiled_graphs
from ..config.pet_config import check_adapter_name, load_config
from ..errors import PetStateError
from ..surgery.core import has_pet, remove
from ..training.run_checkpoint import check_compatible

__all__ = ["PetCallback"]

logger = logging.getLogger("pet_hooks")


class AdaLoraSchedule(Callback):
    """AdaLoRA's budget schedule from the training step: PEFT's ``update_and_allocate(step)`` (steps counted
    from 0) at each step's end (``enable()`` and the launcher add one to each ``Model.train`` call)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def on_train_step_end(self, run_context):
        adalora.update_and_allocate(self.net, run_context.original_args().cur_step_num - 1)


class PetCallback(Callback):
    """Apply PET at train begin and keep the adapter on disk.

    Args:
        cfg: anything ``load_config`` takes (path, mapping, config).
        save_dir: where to save the adapter; None saves nothing.
        save_steps: every this many steps save the adapter and a run checkpoint (needs ``save_dir``).
        adapter_name: train (and save) the adapter of this name: added with ``cfg`` when the network
            does not have it, made the active one when it does (``pet_hooks.multi.adapters``).
        keep: how many run checkpoints to keep (the newest).
        resume: continue after the newest complete checkpoint in ``save_dir/checkpoints`` (none there:
            start from step 0, saying so in one line). A checkpoint of another config or adapter is an
            error here; one of another model or optimizer an error at train begin, the model as it was.
    """

    def __init__(self, cfg, save_dir: Optional[str] = None, save_steps: Optional[int] = None,
                 adapter_name: Optional[str] = None, keep: int = 2, resume: bool = False):
        super().__init__()
        self.config = load_config(cfg)
        # Optimizers built from now on record their arguments (those of other classes than MindSpore's, which
        # keep their own, can then be rebuilt over the deltas at train begin).
        recorder.install_when_imported()
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        self.adapter_name = adapter_name
        self.checkpointer = RunCheckpointer(save_dir, save_steps, keep, resume, adapter_name, self.config)
        self.save_dir = save_dir
        self.save_steps = save_steps
        self.model = None
        self._guard: Optional[GradGuard] = None
        # steps left to skip: Model.train calls holding this callback start where the checkpoint stands
        self._resume_wrap = checkpointing(self.checkpointer, self) if self.checkpointer.to_skip else None

    def on_train_begin(self, run_context):
        params = run_context.original_args()
        train_network = params.train_network
        model = flow.unwrap_model(params.network if params.network is not None else train_network)
        had_pet = has_pet(model)
        flow.adapt(model, self.config, self.adapter_name)
        if self.checkpointer.checkpoint is not None:   # resuming: does it fit this model? (before any change)
            try:
                check_compatible(self.checkpointer.checkpoint, net=model)
            except PetStateError:
                if not had_pet:
                    remove(model)
                raise
        new_optimizer = flow.attach_to_train_step(train_network, model)
        if new_optimizer is not None:
            params.optimizer = new_optimizer
        self.checkpointer.begin(model, train_network)
        release_compiled_graphs(train_network)   # compiled already (Model.build, sink mode): stale now
        force_recompile()
        self.model = model
        # the deltas as training starts (a Model.train call whose steps were all done runs no step)
        self._guard = None if params.get("skipped") else GradGuard(model)

    def on_train_step_end(self, run_context):
        if self._guard is not None:
            self._guard.check_early(run_context.original_args().cur_step_num)
        if self.model is not None:
            params = run_context.original_args()
            if adalora.is_adalora(self.model):       # PEFT's update_and_allocate(step), steps counted from 0
                adalora.update_and_allocate(self.model, params.cur_step_num - 1)
            self.checkpointer.step_end(self.model, params.train_network, params)
            if self.save_steps and self.checkpointer.step % self.save_steps == 0:
                flow.save_for_rank(self.model, self.save_dir, self.adapter_name)

    def on_train_end(self, run_context):
        if self._guard is not None:
            self._guard.check("at train end")
            self._guard = None
        if self.save_dir is not None and self.model is not None:
            flow.save_for_rank(self.model, self.save_dir, self.adapter_name)
