"""The MindSpore internals pet_hooks relies on still behave as pet_hooks assumes (DESIGN.md fact 2)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from pet_hooks._ms_compat import force_recompile, hook_version


class Switch(nn.Cell):
    def __init__(self):
        super().__init__()
        self.double = False

    def construct(self, x):
        if self.double:
            return x * 2
        return x


def test_graph_mode_keeps_a_stale_graph_until_the_hook_version_moves():
    ms.set_context(mode=0)
    net = Switch()
    x = Tensor(np.ones(3, np.float32))
    assert net(x).asnumpy().tolist() == [1, 1, 1]
    net.double = True
    # If this starts failing, MindSpore recompiles on attribute changes by itself and
    # force_recompile may no longer be needed; if the next assertion fails, it no longer works.
    assert net(x).asnumpy().tolist() == [1, 1, 1]
    version = hook_version()
    force_recompile()
    assert hook_version() == version + 1
    assert net(x).asnumpy().tolist() == [2, 2, 2]
