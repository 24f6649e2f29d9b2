"""Run checkpoints through the doors: a checkpoint every ``save_steps`` steps, and a killed run resumed.

``PetCallback(cfg, save_dir, save_steps=N, keep=K, resume=True)`` and ``pet-hooks run --save-steps N
--keep K --resume`` each hold a :class:`RunCheckpointer`. It counts the run's steps (across
``Model.train`` calls), writes ``save_dir/checkpoints/step-<n>/`` every ``save_steps`` of them from
rank 0 (``pet_hooks.training.run_checkpoint``), and when resuming finds the newest complete
checkpoint before training starts: its config and adapter name are checked then (a mismatch is an
error before the model is touched), its adapter and optimizer state are loaded at train begin, once
the model has its PET and the train step its optimizer.

Skipping the batches a resumed run has done can only be chosen when ``Model.train`` is called: the
dataset's iterator and the first epoch are fixed before any callback runs. So while steps remain to
skip, a handler sees every ``Model.train`` call (``pet_hooks.doors.train_calls``; removed when nothing
remains to skip, or when ``pet-hooks run`` ends): a call is given the epoch to start at (``initial_epoch``), its dataset the
number of rows to skip (``Dataset.set_init_step``, what MindFormers' own resume uses, which replays
the skipped rows' shuffle) and its callbacks the step count so far; a call whose steps were all
done before is not run, only its adapter loaded. On the CPU, MindSpore runs ``dataset_sink_mode=True``
as a loop over the whole dataset per epoch, which is what the skip counts.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from typing import Any, Optional

from mindspore import nn
from mindspore.train import Callback, RunContext

from . import flow
from ..errors import PetStateError
from ..surgery.core import has_pet
from ..training.run_checkpoint import (CHECKPOINTS_DIR, RunCheckpoint, check_compatible, check_keep,
                                       latest_checkpoint, restore_checkpoint, save_checkpoint, sweep_temporary)
from ..utils.distributed import is_rank_zero
from .train_calls import add_handler, callbacks_of

__all__ = ["RunCheckpointer", "CheckpointCallback", "checkpointing", "check_save_steps"]

logger = logging.getLogger("pet_hooks")


def check_save_steps(save_steps: Any, save_dir: Optional[str], resume: bool = False) -> None:
    """The argument rules PetCallback and ``pet-hooks run`` share; ValueError naming the argument."""
    if save_steps is not None and (isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1):
        raise ValueError(f"save_steps must be a positive integer, got {save_steps!r}")
    if save_steps is not None and save_dir is None:
        raise ValueError("save_steps needs save_dir (the checkpoints go to save_dir/checkpoints)")
    if resume and save_dir is None:
        raise ValueError("resume needs save_dir (the checkpoints are read from save_dir/checkpoints)")


class _Params(dict):
    """Callback parameters for a ``Model.train`` call that is not run (its steps were all done before)."""
    __getattr__ = dict.get

    def __setattr__(self, key, value):
        self[key] = value


class RunCheckpointer:
    """The steps of one run, its checkpoints, and what a resumed run still has to skip."""

    def __init__(self, save_dir: Optional[str], save_steps: Optional[int] = None, keep: int = 2,
                 resume: bool = False, adapter_name: Optional[str] = None, config=None):
        check_save_steps(save_steps, save_dir, resume)
        check_keep(keep)
        self.save_dir, self.save_steps, self.keep = save_dir, save_steps, keep
        self.adapter_name, self.config = adapter_name, config
        self.step = 0                                   # steps of the run done, resumed ones included
        self.checkpoint: Optional[RunCheckpoint] = None  # the one to load at train begin
        self.to_skip = 0                                # steps done before that Model.train calls still hold
        if resume:
            self._find()

    def _find(self) -> None:
        if is_rank_zero():   # what killed saves and deletions left, when no save came after them
            sweep_temporary(os.path.join(self.save_dir, CHECKPOINTS_DIR))
        checkpoint = latest_checkpoint(self.save_dir)
        if checkpoint is None:
            print(f"pet-hooks: no complete checkpoint in {os.path.join(self.save_dir, CHECKPOINTS_DIR)}; "
                  f"starting from step 0", file=sys.stderr, flush=True)
            return
        if self.config is not None or self.adapter_name is not None:
            check_compatible(checkpoint, config=self.config, adapter_name=self.adapter_name)
        self.checkpoint, self.step, self.to_skip = checkpoint, checkpoint.step, checkpoint.step
        print(f"pet-hooks: resuming from {checkpoint.path} (step {checkpoint.step})", file=sys.stderr, flush=True)

    # -- the moments of training ---------------------------------------------------------
    def begin(self, model: nn.Cell, train_network: Optional[nn.Cell]) -> None:
        """At train begin (the model has its PET, the train step its optimizer): load the checkpoint, once."""
        if self.checkpoint is None:
            return
        if not has_pet(model):
            raise PetStateError(f"cannot resume from {self.checkpoint.path}: {type(model).__name__} has no PET")
        checkpoint, self.checkpoint = self.checkpoint, None
        restore_checkpoint(model, train_network, checkpoint)

    def step_end(self, model: nn.Cell, train_network: Optional[nn.Cell], cb_params) -> Optional[str]:
        """After each step: count it; every ``save_steps`` steps write a checkpoint (rank 0). Its folder."""
        self.step += 1
        if not self.save_steps or self.step % self.save_steps:
            return None
        batches = getattr(cb_params, "batch_num", None)
        current = getattr(cb_params, "cur_step_num", None)
        in_epoch = (current - 1) % batches + 1 if isinstance(batches, int) and isinstance(current, int) else None
        return save_checkpoint(model, train_network, self.step, self.save_dir, keep=self.keep,
                               epoch=getattr(cb_params, "cur_epoch_num", None), step_in_epoch=in_epoch,
                               steps_per_epoch=batches, adapter_name=self.adapter_name)

    # -- Model.train ----------------------------------------------------------------------
    def run_train(self, model, bound: inspect.BoundArguments, proceed, callback: Callback):
        """Go on with the ``Model.train`` call (``proceed``), starting where the resumed run stands."""
        if self.to_skip == 0:
            return proceed()
        epoch = bound.arguments["epoch"]
        initial = bound.arguments.get("initial_epoch", 0)
        dataset = bound.arguments["train_dataset"]
        per_epoch = dataset.get_dataset_size()
        total = (epoch - initial) * per_epoch
        if self.to_skip >= total:
            self.to_skip -= total
            print(f"pet-hooks: the {total} steps of this Model.train call were done before the checkpoint; "
                  f"not running it again", file=sys.stderr, flush=True)
            return self._skip_call(model, callback)
        done_epochs, _ = divmod(self.to_skip, per_epoch)
        skip, self.to_skip = self.to_skip, 0
        bound.arguments["initial_epoch"] = initial + done_epochs
        previous = dataset.get_init_step()
        dataset.set_init_step(skip)
        # the callbacks count on from the steps done (Model.train itself always starts them at 0)
        model._train = functools.partial(type(model)._train, model, initial_step=skip)  # pylint: disable=protected-access
        try:
            return proceed()
        finally:
            del model._train  # pylint: disable=protected-access
            dataset.set_init_step(previous)

    @staticmethod
    def _skip_call(model, callback: Callback) -> None:
        """The call's steps were all done: its callback still loads the checkpoint and ends as after training."""
        params = _Params(train_network=model._train_network, network=model._network,  # pylint: disable=protected-access
                         optimizer=model._optimizer,  # pylint: disable=protected-access
                         cur_step_num=0, cur_epoch_num=0, batch_num=0, epoch_num=0, skipped=True)
        context = RunContext(params)
        callback.on_train_begin(context)
        callback.on_train_end(context)


class CheckpointCallback(Callback):
    """What ``pet-hooks run --save-steps/--resume`` adds to every ``Model.train`` of the script: the run's
    checkpoints for the model the script adapted (under ``enable``, its optimizer holds the deltas)."""

    def __init__(self, checkpointer: RunCheckpointer):
        super().__init__()
        self.checkpointer = checkpointer
        self.model: Optional[nn.Cell] = None

    def on_train_begin(self, run_context):
        params = run_context.original_args()
        model = flow.unwrap_model(params.network if params.network is not None else params.train_network)
        if not has_pet(model):
            logger.warning("pet_hooks: %s has no PET; no run checkpoints for this Model.train", type(model).__name__)
            self.model = None
            return
        self.model = model
        self.checkpointer.begin(model, params.train_network)

    def on_train_step_end(self, run_context):
        if self.model is not None:
            params = run_context.original_args()
            self.checkpointer.step_end(self.model, params.train_network, params)


class checkpointing:  # pylint: disable=invalid-name
    """Every ``Model.train`` call for a checkpointer: without ``callback`` each call gets a
    :class:`CheckpointCallback` (``pet-hooks run``); with one (a PetCallback) only calls holding it are
    changed, to skip what was done, until nothing remains to skip. ``undo()`` stops it."""

    def __init__(self, checkpointer: RunCheckpointer, callback: Optional[Callback] = None):
        self.checkpointer = checkpointer
        self.callback = callback or CheckpointCallback(checkpointer)
        self._add = callback is None
        self.undo = add_handler(self._handle)

    def _handle(self, model, bound, proceed):
        callbacks = callbacks_of(bound)
        if self._add:
            bound.arguments["callbacks"] = callbacks + [self.callback]
        elif all(cb is not self.callback for cb in callbacks):
            return proceed()
        try:
            return self.checkpointer.run_train(model, bound, proceed, self.callback)
        finally:
            if not self._add and self.checkpointer.to_skip == 0:
                self.undo()       # a PetCallback's: nothing left to skip
