"""Did every adapted cell receive a gradient? The check the front doors run once training has stepped.

A cell whose parent reads its weights instead of calling it (``out_proj`` inside an attention
cell that pet_hooks does not know) never runs its branch: its deltas get no gradient, and
training "succeeds" while training nothing there. The doors snapshot each adapted cell's
*sentinel* deltas when training starts and compare them after some steps::

    guard = GradGuard(model)            # PetCallback: at train begin; enable(): when an optimizer gets the deltas
    ...  training steps  ...
    guard.check_early(step)             # once, from step 2: only when some cells moved and others did not
    guard.check("at train end")                  # final: every cell still unmoved

The rule (what can be told reliably from values alone): an adapted cell is reported when none
of its sentinel deltas changed bit for bit. The sentinels are what the tuner names in
``grad_sentinels(injection)`` (by default the cell's deltas). For LoRA it is ``lora_B``: it
starts at zero, gets a gradient from the first step whenever the branch is reached (A's
gradient is zero until B moves, so A is no witness), and with no gradient it stays exactly
zero even under weight decay. On an embedding the roles swap (PEFT starts its A at zero and its B
random), so there the sentinel is ``lora_A``. Not caught: a B that starts non-zero (a loaded adapter) under
weight decay changes without any gradient. Frozen deltas are not checked.

An early check with *nothing* moved says nothing about single cells (the optimizer may not
have stepped yet: a loss-scale overflow, a zero warm-up learning rate), so it waits for the
final one. Each cell is reported once, in one ``logging.warning`` on the ``pet_hooks`` logger
naming its delta parameters.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import numpy as np
from mindspore import Parameter, nn

from ..surgery.core import get_state

__all__ = ["GradGuard", "EARLY_STEP"]

logger = logging.getLogger("pet_hooks")

EARLY_STEP = 2  # by the end of step 2 every reached LoRA delta has had a gradient (B at 1, A at 2)


def _sentinels(state, injection) -> List[Parameter]:
    return [p for p in state.tuner.grad_sentinels(injection) if p.requires_grad]


class GradGuard:
    """The sentinel deltas of one adapted model, as they were when training started."""

    def __init__(self, model: nn.Cell):
        self.model = model
        state = get_state(model)
        # path -> (its delta names, [(sentinel, value at start)])
        self._cells: Dict[str, Tuple[List[str], List[Tuple[Parameter, np.ndarray]]]] = {}
        self._reported: set = set()
        self._early_done = False
        if state is None:
            return
        for injection in state.injections:
            sentinels = _sentinels(state, injection)
            if sentinels:
                names = [p.name for p in state.tuner.deltas_of(injection) if p.requires_grad]
                self._cells[injection.path] = (names, [(p, p.asnumpy().copy()) for p in sentinels])

    def unmoved(self) -> List[str]:
        """Paths of the adapted cells none of whose sentinels changed."""
        return [path for path, (_, pairs) in self._cells.items()
                if all(np.array_equal(p.asnumpy(), start) for p, start in pairs)]

    def check_early(self, step: int) -> List[str]:
        """The early check, once, at the first step from ``EARLY_STEP`` on (reading the sentinels
        costs a device sync: not every step)."""
        if self._early_done or step < EARLY_STEP:
            return []
        self._early_done = True
        return self.check(f"after {step} steps", final=False)

    def check(self, when: str, final: bool = True) -> List[str]:
        """Warn about unmoved cells not reported yet; returns their delta names.

        ``final=False`` (an early check) warns only when some cell did move.
        """
        unmoved = [p for p in self.unmoved() if p not in self._reported]
        if not unmoved or (not final and len(self.unmoved()) == len(self._cells)):
            return []
        self._reported.update(unmoved)
        # dict.fromkeys: a shared delta (one prefix encoder for every layer) is named once
        names = list(dict.fromkeys(name for path in unmoved for name in self._cells[path][0]))
        everything = len(self.unmoved()) == len(self._cells)
        logger.warning(
            "pet_hooks: %d adapted cell(s) of %s received no gradient (%s, their deltas unchanged): %s. "
            "Their delta parameters %s train nothing; usually the cell is never called because its parent "
            "reads its weights instead (pet-hooks inspect flags such cells).%s",
            len(unmoved), type(self.model).__name__, when, ", ".join(unmoved), ", ".join(names),
            " No delta changed at all: if the optimizer did step, none of the adapted cells is reached."
            if everything else "")
        return names
