"""``PetCallback``: PET for a script that trains with ``mindspore.train.Model``.

    model = Model(net, loss_fn, opt)
    model.train(2, dataset, callbacks=[PetCallback("pet.yaml", save_dir="adapter/", save_steps=100)])

At train begin it adapts the model inside the train network and gives the train step an
optimizer of the same class and settings over the deltas only; it saves the adapter every
``save_steps`` steps and at train end (rank 0 only). After step 2 and at train end it warns
about adapted cells that received no gradient (``pet_hooks.training.grad_guard``). It holds no PET
logic of its own: the work is ``pet_hooks.doors.flow``.
"""
from __future__ import annotations

import logging
from typing import Optional

from mindspore.train import Callback

from . import flow
from ..training import recorder
from ..training.grad_guard import GradGuard
from ..utils.ms_compat import force_recompile, release_compiled_graphs
from ..config.pet_config import check_adapter_name, load_config

__all__ = ["PetCallback"]

logger = logging.getLogger("pet_hooks")


class PetCallback(Callback):
    """Apply PET at train begin and keep the adapter on disk.

    Args:
        cfg: anything ``load_config`` takes (path, mapping, config).
        save_dir: where to save the adapter; None saves nothing.
        save_steps: also save every this many steps (needs ``save_dir``).
        adapter_name: train (and save) the adapter of this name: added with ``cfg`` when the network
            does not have it, made the active one when it does (``pet_hooks.multi.adapters``).
    """

    def __init__(self, cfg, save_dir: Optional[str] = None, save_steps: Optional[int] = None,
                 adapter_name: Optional[str] = None):
        super().__init__()
        self.config = load_config(cfg)
        # Optimizers built from now on record their arguments (those of other classes than MindSpore's, which
        # keep their own, can then be rebuilt over the deltas at train begin).
        recorder.install_when_imported()
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        self.adapter_name = adapter_name
        if save_steps is not None and (isinstance(save_steps, bool) or not isinstance(save_steps, int)
                                       or save_steps < 1):
            raise ValueError(f"save_steps must be a positive integer, got {save_steps!r}")
        if save_steps is not None and save_dir is None:
            raise ValueError("save_steps needs save_dir")
        self.save_dir = save_dir
        self.save_steps = save_steps
        self.model = None
        self._guard: Optional[GradGuard] = None

    def on_train_begin(self, run_context):
        params = run_context.original_args()
        train_network = params.train_network
        model = flow.unwrap_model(params.network if params.network is not None else train_network)
        flow.adapt(model, self.config, self.adapter_name)
        new_optimizer = flow.attach_to_train_step(train_network, model)
        if new_optimizer is not None:
            params.optimizer = new_optimizer
        release_compiled_graphs(train_network)   # compiled already (Model.build, sink mode): stale now
        force_recompile()
        self.model = model
        self._guard = GradGuard(model)  # the deltas as training starts

    def on_train_step_end(self, run_context):
        if self._guard is not None:
            self._guard.check_early(run_context.original_args().cur_step_num)
        if self.save_steps and self.model is not None:
            step = run_context.original_args().cur_step_num
            if step % self.save_steps == 0:
                flow.save_for_rank(self.model, self.save_dir, self.adapter_name)

    def on_train_end(self, run_context):
        if self._guard is not None:
            self._guard.check("at train end")
            self._guard = None
        if self.save_dir is not None and self.model is not None:
            flow.save_for_rank(self.model, self.save_dir, self.adapter_name)
