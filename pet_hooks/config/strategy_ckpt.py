"""The strategy-checkpoint rule: with PET, ``strategy_ckpt_config.only_trainable_params`` must be False.

In a (semi-)auto-parallel job MindSpore writes the sharding strategy of the parameters to a
strategy file. With ``only_trainable_params: True`` (MindSpore's default) that file records only
the trainable parameters, which under PET are the deltas: the frozen base weights' sharding is
lost, and the checkpoint can later be neither converted to another layout nor merged. So while a
net carries PET, pet_hooks keeps the flag False::

    apply(net, cfg)        # enforce(net): only_trainable_params True -> False, other keys kept
    remove(net)            # release(net): the True that apply(net) found comes back

A run YAML that asks for ``parallel.strategy_ckpt_config.only_trainable_params: true`` is
warned about when it is read (:func:`check_run_yaml`); the fix itself happens at ``apply``, which
every front door goes through. MindSpore is imported only by the run-time functions, so reading
a config stays cheap.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Mapping

__all__ = ["KEY", "YAML_KEY", "check_run_yaml", "enforce", "release"]

logger = logging.getLogger("pet_hooks")
KEY = "only_trainable_params"
YAML_KEY = "parallel.strategy_ckpt_config.only_trainable_params"
_WHY = ("with PET the trainable parameters are only the deltas, so a strategy file of trainable "
        "parameters would lose the base weights' sharding and the checkpoint could later be neither "
        "converted nor merged")
# Parallel modes in which MindSpore writes or reads a strategy file of its own accord.
_STRATEGY_MODES = ("semi_auto_parallel", "auto_parallel", "hybrid_parallel")

# The nets whose apply() turned the flag off: their remove() turns it back on (the undo of that apply).
_CHANGED_BY: "weakref.WeakSet" = weakref.WeakSet()


def check_run_yaml(doc: Any, where: str) -> bool:
    """Warn when a run YAML sets ``parallel.strategy_ckpt_config.only_trainable_params: true``.

    Returns True when it does. Nothing is changed here: ``apply`` turns the flag off at run time.
    """
    node: Any = doc
    for key in ("parallel", "strategy_ckpt_config", KEY):
        node = node.get(key) if isinstance(node, Mapping) else None
    if node is not True:
        return False
    logger.warning("pet_hooks: %s sets %s: true; pet_hooks sets it to false at run time when PET is applied: %s",
                   where, YAML_KEY, _WHY)
    return True


def _context() -> dict:
    import mindspore as ms
    return dict(ms.get_auto_parallel_context("strategy_ckpt_config"))


def _set_flag(value: bool) -> None:
    import mindspore as ms
    # Only this key: set_strategy_ckpt_config leaves save_file and load_file as they are.
    ms.set_auto_parallel_context(strategy_ckpt_config={KEY: value})


def _in_use(config: Mapping) -> bool:
    """Does the user evidently use strategy files (a file set, or a mode that writes one)?"""
    import mindspore as ms
    return bool(config.get("save_file") or config.get("load_file")) or \
        ms.get_auto_parallel_context("parallel_mode") in _STRATEGY_MODES


def enforce(owner: object) -> None:
    """Turn ``only_trainable_params`` off for as long as ``owner`` carries PET.

    Warns once per change when the user evidently uses strategy files; in a stand-alone run
    with no strategy file (MindSpore's default context, where the flag is True but unused) the
    change is logged at debug level only, so that every plain ``apply`` does not warn.
    """
    config = _context()
    if config.get(KEY) is not True:
        return
    _set_flag(False)
    _CHANGED_BY.add(owner)
    level = logging.WARNING if _in_use(config) else logging.DEBUG
    logger.log(level, "pet_hooks: set strategy_ckpt_config %s=False (was True; save_file=%r, load_file=%r "
               "kept): %s; pet_hooks.remove() puts True back", KEY, config.get("save_file", ""),
               config.get("load_file", ""), _WHY)


def release(owner: object) -> None:
    """``owner`` no longer carries PET: undo what its ``enforce`` changed (the flag back to True).

    Only the net whose ``apply`` turned the flag off turns it back on: a net adapted while it
    was already off changed nothing and restores nothing.
    """
    if owner in _CHANGED_BY:
        _CHANGED_BY.discard(owner)
        _set_flag(True)
